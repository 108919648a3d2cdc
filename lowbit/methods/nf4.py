"""QLoRA's storage (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023,
section 3): NF4 codes in blocks of 64 with each block's absmax scale, and double quantization of
those scales -- 8-bit codes in runs of 256 (``formats.double``) -- which brings the scales' cost
from 0.5 to 0.127 bits per weight (4.127 in all, the paper's figure). Calibration-free.

The NF4 levels are the 16 quantiles of a normal distribution (``formats.floating.NF4_LEVELS``);
lowbit's second level is an affine 8-bit grid per run of 256 scales (fp16 base and step) where
the paper uses an 8-bit float after subtracting the mean: the same 8 bits per scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight, check_finite


@register
@dataclass
class NF4(MethodConfig):
    """NF4 in blocks of 64 with double-quantized scales (``scale_bits`` 8 in runs of 256; 0 keeps
    fp16 scales)."""

    name = "nf4"
    supports_scale_bits = True

    format: str = "nf4"
    group_size: int = 64
    scale_bits: int | None = 8
    scale_group_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.format not in ("nf4", "fp4"):
            raise ValueError(f"nf4 stores nf4 (or fp4) codes, not {self.format!r}")

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        check_finite(w)
        return QuantizedWeight.quantize(w, self.weight_format)
