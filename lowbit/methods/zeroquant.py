"""ZeroQuant (Yao et al., 2022, "ZeroQuant: Efficient and Affordable Post-Training
Quantization for Large-Scale Transformers").

Fine-grained, hardware-friendly quantization of both operands of every linear:

- weights: symmetric, group-wise (one scale per group of ``group_size`` input
  channels of each output row, round-to-nearest);
- activations: symmetric, token-wise and dynamic (one scale per token, computed
  at run time), so no calibration data is needed.

lowbit's integer kernel takes a scale per (output row, weight group) inside the
integer matmul, so the groups run at integer speed. The paper's own groups are
blocks of whole output rows (48 groups for BERT-base in DeepSpeed's configs),
a coarser special case of lowbit's per-channel scales; groups along the input
dimension are the finer form ZeroQuant-V2 and DeepSpeed later adopted.
Layer-by-layer knowledge distillation (the paper's LKD, for INT4 weights) is not
implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight, check_finite


@register
@dataclass
class ZeroQuant(MethodConfig):
    """ZeroQuant: symmetric group-wise weights (``bits``, ``group_size``) and per-token dynamic
    activations (``act_bits``)."""

    name = "zeroquant"

    bits: int = 8
    group_size: int = 128
    symmetric: bool = True
    act_bits: int | None = 8
    act_granularity: str | None = "token"  # the paper's, on every model family

    def __post_init__(self):
        if self.act_bits is None:
            raise ValueError("ZeroQuant quantizes activations token-wise; give act_bits (8 in the paper)")
        if self.act_granularity != "token" or self.act_dynamic is False:
            raise ValueError("ZeroQuant's activations are token-wise and dynamic; use act_granularity='token'")
        if not self.symmetric:
            raise ValueError("ZeroQuant's weights are symmetric; drop --asym")
        super().__post_init__()

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        check_finite(w)
        return QuantizedWeight.quantize(w, self.weight_format)
