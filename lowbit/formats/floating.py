"""Floating-point and codebook formats with per-block absmax scales.

- FP8 E4M3 (max 448) and E5M2 (max 57344), stored as the raw float8 bytes.
- FP4 E2M1: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, code = sign << 3 | magnitude index,
  the bit layout of the OCP microscaling spec.
- NF4: the 16 normal-float levels of QLoRA (Dettmers et al., 2023, appendix E).
- Fixed non-uniform grids of any width from 2 to 8 bits (``GRIDS``), sign and magnitude
  (``code = sign << (bits - 1) | magnitude index``, magnitudes ascending from 0; the code of
  -0 decodes to 0):
  - ``pot``: powers of two, ``{0} u {2^-j}`` (Miyashita et al. 2016's log2 weights; the grid
    of INQ, Zhou et al. 2017);
  - ``log``: powers of sqrt(2), ``{0} u {2^(-j/2)}``, the finer log grid of Miyashita et al.;
  - ``apot``: additive powers of two (Li et al., ICLR 2020): the ``bits - 1`` magnitude bits
    split into ``n`` terms of 2 bits (the last of 1 when odd), term ``i`` one of
    ``{0} u {2^-(i + 1 + j n)}``; a level is the sum of one value of each term (every sum
    distinct: the terms use disjoint powers), the grid divided by its largest level.
  Power-of-two levels make each product a shift in hardware; here they are a codebook like
  NF4, so they run on the same look-up-table kernel.

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

GRIDS = ("pot", "apot", "log")  # fixed sign-magnitude grids of 2 to 8 bits


def grid_magnitudes(name: str, bits: int) -> list[float]:
    """The ``2^(bits - 1)`` magnitudes of a fixed grid, ascending, the largest 1."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"a {name} grid has 2 to 8 bits (a sign and at least one magnitude bit), not {bits}")
    m = bits - 1
    count = 1 << m
    if name == "pot":
        return sorted([0.0] + [2.0**-j for j in range(count - 1)])
    if name == "log":
        return sorted([0.0] + [2.0 ** (-j / 2) for j in range(count - 1)])
    terms = (m + 1) // 2  # apot: 2-bit terms, the last 1-bit when m is odd
    sums = [0.0]
    for i in range(terms):
        width = 2 if 2 * (i + 1) <= m else 1
        values = [0.0] + [2.0 ** -(i + 1 + j * terms) for j in range((1 << width) - 1)]
        sums = [a + b for a in sums for b in values]
    top = max(sums)
    return sorted(v / top for v in sums)


def codebook(name: str, bits: int = 4) -> torch.Tensor:
    """Value of each code, indexed by code: ``[16]`` for nf4 and fp4, ``[2^bits]`` for a grid."""
    if name == "nf4":
        return torch.tensor(NF4_LEVELS)
    if name == "fp4":
        mags = torch.tensor(FP4_MAGNITUDES)
        return torch.cat([mags, -mags])
    if name in GRIDS:
        mags = torch.tensor(grid_magnitudes(name, bits), dtype=torch.float64).float()
        return torch.cat([mags, -mags])
    raise ValueError(f"unknown codebook format {name!r}; choose nf4, fp4 or one of {', '.join(GRIDS)}")


def max_level(name: str, bits: int = 4) -> float:
    if name in FP8_DTYPES:
        return float(torch.finfo(FP8_DTYPES[name]).max)
    return float(codebook(name, bits).abs().max())


def absmax_scale(w: torch.Tensor, name: str, group_size: int | None, bits: int = 4) -> torch.Tensor:
    """Per-block ``scale = absmax / max_level``: ``[rows, nblocks]``."""
    check_group_size(group_size)
    if group_size is None:
        amax = w.abs().max().reshape(1, 1).float()
    else:
        amax = to_groups(w.float(), group_size).abs().amax(-1)
    scale = amax / max_level(name, bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(scale_storage_dtype(scale)).float()


def mse_scale(
    w: torch.Tensor, name: str, group_size: int | None, bits: int, factors: torch.Tensor, norm: float = 2.0
) -> torch.Tensor:
    """Per-block scale ``p * absmax / max_level`` with the factor ``p`` (of ``factors``) that
    minimises ``sum |w - q(w)|^norm`` in each block: on a non-uniform grid the absmax scale
    spends the widest gap on the few largest weights."""
    from lowbit.formats.search import shrink_search

    if name in FP8_DTYPES:
        raise ValueError(f"the scale search is for codebook formats, not {name}")
    base = absmax_scale(w, name, group_size, bits)  # [rows, nblocks]
    levels = codebook(name, bits).to(w.device)
    blocks = w.float().reshape(1, 1, -1) if group_size is None else to_groups(w.float(), group_size)

    def error(_lo: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.to(scale_storage_dtype(s)).float().unsqueeze(-1)
        q = levels[quantize_codebook(blocks / s, levels).long()] * s
        return ((blocks - q).abs() ** norm).sum(-1)

    _, best = shrink_search(base, base, error, factors)
    return best.to(scale_storage_dtype(best)).float()


def quantize_codebook(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element of ``x`` (ties go to the lower level)."""
    order = torch.argsort(levels)
    ordered = levels[order]
    mids = (ordered[1:] + ordered[:-1]) / 2
    return order[torch.bucketize(x, mids, right=False)].to(torch.uint8)


def quantize(w: torch.Tensor, scale: torch.Tensor, name: str, group_size: int | None, bits: int = 4):
    s = _full(scale, w.shape, group_size)
    x = w.float() / s
    if name in FP8_DTYPES:
        limit = max_level(name)
        return x.clamp(-limit, limit).to(FP8_DTYPES[name]).view(torch.uint8)
    return quantize_codebook(x, codebook(name, bits).to(w.device))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, name: str, group_size: int | None, bits: int = 4):
    s = _full(scale.float(), codes.shape, group_size)
    if name in FP8_DTYPES:
        return codes.view(FP8_DTYPES[name]).float() * s
    return codebook(name, bits).to(codes.device)[codes.long()] * s
