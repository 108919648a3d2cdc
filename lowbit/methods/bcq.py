"""Binary-coding quantization for LUT-GEMM (Park et al., "LUT-GEMM: Quantized Matrix Multiplication
based on LUTs for Efficient Inference in Large-Scale Generative Language Models", ICLR 2024;
BCQ fitting after Xu et al., "Alternating Multi-bit Quantization for Recurrent Neural Networks",
ICLR 2018).

Each row (or group of ``group_size`` weights) is ``bits`` sign planes with their own scales
plus an offset, ``w = z + sum_i alpha_i b_i`` (LUT-GEMM's eq. 3: the offset makes BCQ cover the
uniform asymmetric grids too). The alphas and offset are fitted by alternating least squares
from a greedy start (``formats.binary.fit``). Calibration-free.

Serving: the ``2^bits`` signed sums of each group are a look-up table, so the weight runs on
lowbit's table kernels: LUT-GEMM's point -- multiplying by a table read instead of
dequantizing each weight to a grid -- with the table built from the alphas once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import binary
from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight, check_finite


@register
@dataclass
class BCQ(MethodConfig):
    """Binary-coding weights (``format="bcq"``): ``bits`` sign planes, an alpha per plane and an
    offset per group. ``iters``: alternating least-squares rounds."""

    name = "bcq"

    format: str = "bcq"
    iters: int = 15

    def __post_init__(self):
        super().__post_init__()
        if self.format != "bcq":
            raise ValueError(f"bcq stores binary-coded weights (format bcq), not {self.format!r}")
        if self.iters < 0:
            raise ValueError(f"iters ({self.iters}) must be at least 0")

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        params = binary.fit(w.float(), fmt.bits, fmt.group_size, self.iters)
        return QuantizedWeight.quantize(w, fmt, scale=params)
