"""REx (Yvinec et al., "REx: Data-Free Residual Quantization Error Expansion", NeurIPS 2023).

A weight is quantized, then what the quantization left, ``R = W - Q(W)``, is quantized again in
the same format and added back: ``W ~ Q(W) + Q(R)``, an expansion whose second term carries the
first one's error at its own ``bits`` (each extra order multiplies the error by roughly the
grid's relative step). The paper's trade-off knob is group sparsity: only a fraction
``ratio`` of the output rows -- those whose first-order error is largest -- get the second
term, so the cost is ``ratio * bits`` bits per weight on top (plus their scales and a 32-bit row
index each) and can be set anywhere between one and two orders. Data-free: no calibration.

lowbit stores the expansion term as a second quantized weight over the chosen rows
(``QuantizedWeight.residual``), run on the same integer kernel as the first and added to
those rows' outputs. The first order is RTN with the MSE clip search (``mse``) when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.formats.spec import WeightFormat
from lowbit.methods.base import register
from lowbit.methods.rtn import RTN
from lowbit.quantized_weight import QuantizedWeight, Residual


@register
@dataclass
class REx(RTN):
    """RTN plus a second, quantized order of its error on the ``ratio`` of rows whose error is
    largest (1.0: every row, two full orders)."""

    name = "rex"
    supports_scale_bits = False

    ratio: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio ({self.ratio}) must lie in [0, 1]: the fraction of rows given a second order")
        if self.format != "int":
            raise ValueError(f"rex expands integer grids, not {self.format!r}")

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        first = super().quantize_weight(w)
        rows = round(self.ratio * w.shape[0])
        if rows == 0:
            return first
        resid = w.float() - first.dequantize()
        chosen = torch.topk(resid.pow(2).sum(1), rows).indices.sort().values
        sub = replace(self, ratio=0.0)
        second = RTN.quantize_weight(sub, resid[chosen])
        fmt = WeightFormat(first.fmt.kind, first.fmt.bits, first.fmt.group_size, first.fmt.symmetric)
        assert second.fmt == fmt
        return replace(first, residual=Residual(chosen.to(torch.int32), second))
