"""FQ-ViT (Lin et al., "FQ-ViT: Post-Training Quantization for Fully Quantized Vision
Transformer", IJCAI 2022): the LayerNorm inputs and the attention maps quantized too.

- **Power-of-Two Factor (PTF)** for LayerNorm inputs (the residual sums), whose
  channels differ in range by orders of magnitude: one zero point and a finest
  scale ``s_1`` for the tensor, each channel on ``s_1 2^alpha_c`` with ``alpha_c``
  in 0..3 chosen by squared error (``observers.ptf_params``). An integer LayerNorm
  aligns the channels with bit shifts.
- **Log-Int-Softmax (LIS)**: the attention probabilities on a 4-bit log2 grid
  (``x^ = 2^-q``, ``q`` in 0..15, smaller values 0), so attention times value is a
  shift per element. The integer exponential of the paper's integer-only softmax
  belongs to integer-only inference; the quantization it feeds is simulated here.

Everything else is the paper's baseline: weights per output channel on their
min-max range, activations static per tensor, asymmetric, on their min-max range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.activation import ActFormat
from lowbit.methods.base import register, static_act_format
from lowbit.methods.rtn import RTN


@register
@dataclass
class FQViT(RTN):
    """FQ-ViT: power-of-two factors on LayerNorm inputs, a 4-bit log2 attention map, min-max
    elsewhere."""

    name = "fq_vit"
    needs_calibration = True

    act_observer: str | None = "minmax"
    attn_bits: int = 4  # the log2 attention map (LIS), whatever the other activations' width
    ptf: bool = True
    log_softmax: bool = True

    def refuses(self, family: str) -> str | None:
        if family != "vit":
            return ("it quantizes LayerNorm inputs and attention maps at the residual and softmax sites, "
                    "which only the vision-transformer adapters name")  # fmt: skip
        return None

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "quantizes LayerNorm inputs and attention maps statically")
        for site in unit.sites().values():
            q = site.output_q
            if q is None or q.fmt is None:
                continue
            if self.log_softmax and site.role == "softmax":
                q.fmt = ActFormat(self.attn_bits, "tensor", dynamic=False, symmetric=False, kind="log2")
                q.set_static(torch.ones(1), torch.zeros(1))  # probabilities: the top code is 1
                q.locked = True
            elif self.ptf and site.role == "residual" and not q.fmt.symmetric:
                q.observer = "ptf"
        unit.changed()
