"""The one clipping-range search: shrink a range ``[lo, hi]`` by factors ``p <= 1`` and keep,
per element of ``lo``, the factor whose quantization error is smallest.

Weights (round-to-nearest's MSE clipping, the grid of the GPTQ reference quantizer,
Frantar et al. 2022), AWQ's clipping against the output error, and the activation
MSE observer all differ only in the error they measure; they share this loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def shrink_factors(steps: int, step: float) -> torch.Tensor:
    """``1, 1 - step, ..., 1 - (steps - 1) * step``."""
    return 1 - torch.arange(steps, dtype=torch.float64) * step


def grid_factors(grid: int, maxshrink: float) -> torch.Tensor:
    """``p = 1 - i / grid`` for ``i = 0 .. int(maxshrink * grid)`` (both ends included)."""
    return shrink_factors(int(maxshrink * grid) + 1, 1 / grid)


def shrink_search(
    lo: torch.Tensor,
    hi: torch.Tensor,
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    factors: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``(p * lo, p * hi)`` minimising ``error(p * lo, p * hi)`` (same shape as ``lo``)
    independently for each element; the first factor wins ties."""
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full(lo.shape, float("inf"), device=lo.device, dtype=torch.float64)
    for p in factors.tolist():
        err = error(p * lo, p * hi).double()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, p * lo, best_lo)
        best_hi = torch.where(better, p * hi, best_hi)
    return best_lo, best_hi
