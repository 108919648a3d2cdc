"""Floating-point and codebook formats with per-block absmax scales.

- FP8 E4M3 (max 448) and E5M2 (max 57344), stored as the raw float8 bytes.
- FP4 E2M1: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, code = sign << 3 | magnitude index,
  the bit layout of the OCP microscaling spec.
- NF4: the 16 normal-float levels of QLoRA (Dettmers et al., 2023, appendix E).

A block is a group along the last dimension with the same ``group_size`` rules as
the integer formats (``-1`` per-channel, ragged last block allowed). Each block
stores ``scale = absmax / max_level``.
"""

from __future__ import annotations

import torch

from lowbit.formats.integer import _full, check_group_size, scale_storage_dtype, to_groups

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def codebook(name: str) -> torch.Tensor:
    """Value of each code, indexed by code: ``[16]`` for nf4 and fp4."""
    if name == "nf4":
        return torch.tensor(NF4_LEVELS)
    if name == "fp4":
        mags = torch.tensor(FP4_MAGNITUDES)
        return torch.cat([mags, -mags])
    raise ValueError(f"unknown codebook format {name!r}; choose nf4 or fp4")


def max_level(name: str) -> float:
    if name in FP8_DTYPES:
        return float(torch.finfo(FP8_DTYPES[name]).max)
    return float(codebook(name).abs().max())


def absmax_scale(w: torch.Tensor, name: str, group_size: int | None) -> torch.Tensor:
    """Per-block ``scale = absmax / max_level``: ``[rows, nblocks]``."""
    check_group_size(group_size)
    if group_size is None:
        amax = w.abs().max().reshape(1, 1).float()
    else:
        amax = to_groups(w.float(), group_size).abs().amax(-1)
    scale = amax / max_level(name)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(scale_storage_dtype(scale)).float()


def quantize_codebook(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element of ``x`` (ties go to the lower level)."""
    order = torch.argsort(levels)
    ordered = levels[order]
    mids = (ordered[1:] + ordered[:-1]) / 2
    return order[torch.bucketize(x, mids, right=False)].to(torch.uint8)


def quantize(w: torch.Tensor, scale: torch.Tensor, name: str, group_size: int | None):
    s = _full(scale, w.shape, group_size)
    x = w.float() / s
    if name in FP8_DTYPES:
        limit = max_level(name)
        return x.clamp(-limit, limit).to(FP8_DTYPES[name]).view(torch.uint8)
    return quantize_codebook(x, codebook(name))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, name: str, group_size: int | None):
    s = _full(scale.float(), codes.shape, group_size)
    if name in FP8_DTYPES:
        return codes.view(FP8_DTYPES[name]).float() * s
    return codebook(name).to(codes.device)[codes.long()] * s
