"""LLM.int8() (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale").

Vector-wise quantization: int8 weights with one scale per output row, int8
activations with one scale per token, int32 accumulation. Mixed-precision
decomposition: the feature columns where any activation exceeds ``threshold``
(6.0 in the paper) are multiplied in floating point instead, which keeps the
rare huge activation channels of large transformers from wrecking the int8 grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight


@register
@dataclass
class LLMInt8(MethodConfig):
    """LLM.int8(). ``threshold``: activation magnitude above which a feature column stays in float."""

    name = "llmint8"

    bits: int = 8
    group_size: int = -1
    symmetric: bool = True
    act_bits: int | None = 8
    threshold: float = 6.0

    def refuses(self, family: str) -> str | None:
        if family == "cnn":
            return ("its mixed-precision decomposition keeps outlier feature columns of a linear's input in float; convs "
                    "have no such column path")
        return None

    def __post_init__(self):
        if self.bits != 8 or self.format != "int":
            raise ValueError(f"LLM.int8() quantizes weights to int8; bits={self.bits} is not supported (use --bits 8)")
        if self.group_size != -1:
            raise ValueError("LLM.int8() uses one scale per output row; use --group-size -1")
        if self.act_bits != 8:
            raise ValueError("LLM.int8() multiplies int8 activations; act_bits must be 8")
        if self.threshold <= 0:
            raise ValueError(f"threshold {self.threshold} must be positive (the paper uses 6.0)")
        super().__post_init__()

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight.quantize(w, self.weight_format)
