"""Round-to-nearest: min-max ranges, optionally shrunk per group to minimise error.

The clipping search follows the grid used by the GPTQ reference quantizer
(Frantar et al., 2022): try ranges ``p * [min, max]`` for ``p`` from 1 down to
``1 - maxshrink`` and keep, per group, the one with the smallest ``|w - q(w)|^norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import floating, integer
from lowbit.formats.search import grid_factors
from lowbit.formats.spec import SCALED_CODEBOOKS
from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight, check_finite


def mse_clip_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, grid: int = 100,
                    maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-group scale and zero (``[out, ngroups]``) minimising ``sum |w - q(w)|^norm``."""
    return integer.mse_params(w, bits, group_size, symmetric, grid_factors(grid, maxshrink), norm)


@register
@dataclass
class RTN(MethodConfig):
    """Round-to-nearest. ``mse=True`` searches a clipping range per group (integer formats) or
    a scale per group (the scaled codebooks: nf4, fp4 and the pot / apot / log grids)."""

    name = "rtn"
    supports_scale_bits = True

    mse: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.4

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        fmt = self.weight_format
        check_finite(w)
        if fmt.kind == "int" and self.mse:
            scale, zero = mse_clip_params(
                w, fmt.bits, fmt.group_size, fmt.symmetric, self.mse_grid, self.mse_maxshrink, self.mse_norm
            )
            return QuantizedWeight.quantize(w, fmt, scale, zero)
        if fmt.kind in SCALED_CODEBOOKS and self.mse:  # nf4, fp4, pot, apot, log: the scale searched
            factors = grid_factors(self.mse_grid, self.mse_maxshrink)
            scale = floating.mse_scale(w, fmt.kind, fmt.group_size, fmt.bits, factors, self.mse_norm)
            return QuantizedWeight.quantize(w, fmt, scale)
        if fmt.kind != "int" and self.mse:
            raise ValueError(f"the MSE clipping search supports integer and scaled-codebook formats "
                             f"({', '.join(SCALED_CODEBOOKS)}), not {fmt.kind}")  # fmt: skip
        return QuantizedWeight.quantize(w, fmt)
