"""Integer quantization: affine (zero-point) and symmetric, 2-8 bits.

Codes are unsigned integers in ``[0, 2**bits - 1]``; a weight is recovered as
``(code - zero) * scale``. The zero point is an integer, so 0.0 is always exactly
representable. Symmetric formats use the fixed zero ``2**(bits-1)``.

Granularity is expressed through ``group_size`` along the last dimension:
``-1`` is per-channel (one group per row), ``None`` is per-tensor, and a positive
size splits each row into groups of that size, the last one possibly shorter
(a *ragged* group), so ``group_size`` need not divide the row length.
"""

from __future__ import annotations

import math

import torch

PER_CHANNEL = -1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported; choose an integer from 2 to 8")


def check_group_size(group_size: int | None) -> None:
    if group_size is None or group_size == PER_CHANNEL:
        return
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size {group_size!r} is invalid; use a positive size, or -1 for per-channel")


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def num_groups(in_features: int, group_size: int | None) -> int:
    if group_size is None or group_size == PER_CHANNEL or group_size >= in_features:
        return 1
    return math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int | None) -> int:
    if group_size is None or group_size == PER_CHANNEL or group_size >= in_features:
        return in_features
    return group_size


def to_groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``x: [rows, in]`` as ``[rows, ngroups, g]``, zero-padding a ragged last group.

    Zero padding never changes a range that always contains 0 and its codes are
    exact, so padded entries add no error to any statistic computed here.
    """
    rows, cols = x.shape
    g = effective_group_size(cols, group_size)
    n = num_groups(cols, group_size)
    pad = n * g - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, n, g)


def expand_groups(p: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Broadcast per-group parameters ``p: [rows, ngroups]`` to ``[rows, in]``."""
    g = effective_group_size(in_features, group_size)
    return p.repeat_interleave(g, dim=1)[:, :in_features]


def scale_storage_dtype(scale: torch.Tensor) -> torch.dtype:
    """fp16 when every scale survives the cast as a normal number, else fp32."""
    finfo = torch.finfo(torch.float16)
    s = scale.abs()
    if bool(((s < finfo.tiny) | (s > finfo.max)).any()):
        return torch.float32
    return torch.float16


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[lo, hi]`` (extended to contain 0).

    The scale is rounded to its storage dtype first so that codes are computed
    against exactly the scale that will be stored.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        half = 1 << (bits - 1)
        scale = torch.maximum(hi, -lo) / (half - 1)
    else:
        scale = (hi - lo) / qmax(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_storage_dtype(scale)).float()
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(0, qmax(bits))
    return scale, zero


def minmax_params(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero for ``w: [rows, in]``; both ``[rows, ngroups]``.

    Per-tensor (``group_size=None``) gives ``[1, 1]``.
    """
    check_bits(bits)
    check_group_size(group_size)
    if group_size is None:
        lo, hi = w.min().reshape(1, 1), w.max().reshape(1, 1)
    else:
        groups = to_groups(w.float(), group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
    return params_from_range(lo.float(), hi.float(), bits, symmetric)


def _full(p: torch.Tensor, shape: torch.Size, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return p.reshape(1, 1).expand(shape)
    return expand_groups(p, shape[1], group_size)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Codes ``uint8 [rows, in]`` in ``[0, 2**bits - 1]``."""
    s = _full(scale, w.shape, group_size)
    z = _full(zero, w.shape, group_size)
    q = torch.round(w.float() / s) + z
    return q.clamp(0, qmax(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    rows, cols = codes.shape
    if group_size is None:
        return (codes.float() - zero.float().reshape(())) * scale.float().reshape(())
    groups = to_groups(codes, group_size).float()  # [rows, ngroups, g]
    w = (groups - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(rows, -1)[:, :cols]


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size)


def mse_params(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    factors: torch.Tensor | None = None,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero (``[rows, ngroups]``) whose range ``p * [min, max]`` minimises
    ``sum |w - q(w)|^norm`` over the group; ``factors``: the ``p`` tried (default: the GPTQ
    reference grid, 1 down to 0.2 in steps of 0.01)."""
    from lowbit.formats.search import grid_factors, shrink_search

    groups = to_groups(w.float(), group_size if group_size is not None else w.shape[1])  # [rows, ngroups, g]
    if group_size is None:
        groups = groups.reshape(1, 1, -1)
    lo, hi = groups.amin(-1), groups.amax(-1)

    def error(lo_p, hi_p):
        scale, zero = params_from_range(lo_p, hi_p, bits, symmetric)
        q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, qmax(bits))
        return ((q - zero[..., None]) * scale[..., None] - groups).abs().pow(norm).sum(-1)

    lo, hi = shrink_search(lo, hi, error, grid_factors(100, 0.8) if factors is None else factors)
    return params_from_range(lo, hi, bits, symmetric)
