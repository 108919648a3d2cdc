"""Activation observers: a static int8 scale per tensor from calibration statistics.

- ``minmax``: the largest magnitude seen.
- ``percentile``: the 99.99th percentile of magnitudes (outliers clipped).
- ``mse``: the clipping range minimising the mean squared quantization error
  of the observed values.

The statistics are the running absolute maximum and a fixed-size random sample
of the observed values (``LinearStats``).
"""

from __future__ import annotations

import torch

OBSERVERS = ("minmax", "percentile", "mse")


def _fake_quant(x: torch.Tensor, scale: float, qmax: int) -> torch.Tensor:
    return torch.round(x / scale).clamp(-qmax, qmax) * scale


def static_scale(abs_max: float, samples: torch.Tensor, observer: str = "minmax", bits: int = 8,
                 percentile: float = 99.99, grid: int = 100) -> float:  # fmt: skip
    """Symmetric per-tensor scale for ``bits``-bit activations."""
    if observer not in OBSERVERS:
        raise ValueError(f"unknown activation observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    qmax = (1 << (bits - 1)) - 1
    if abs_max <= 0:
        return 1.0
    if observer == "minmax" or samples.numel() == 0:
        return abs_max / qmax
    mags = samples.abs().float()
    if observer == "percentile":
        return max(torch.quantile(mags, percentile / 100).item(), 1e-8) / qmax
    best, best_err = abs_max / qmax, float("inf")
    for i in range(grid):
        clip = abs_max * (1 - i / grid)
        err = (_fake_quant(samples, clip / qmax, qmax) - samples).pow(2).mean().item()
        if err < best_err:
            best, best_err = clip / qmax, err
    return best
