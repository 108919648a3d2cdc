"""Vector-quantized weights (``kind="vq"``): ``d`` consecutive input columns of one row form a
vector, and a vector is stored as the index of its nearest entry in a codebook of ``2^(bits*d)``
``d``-dimensional fp16 vectors -- GPTVQ's format (van Baalen et al. 2024, Section 3). ``bits`` is
thus bits per weight of the indices; ``bits * d`` bits per index (at most 8, one byte).

A codebook is shared by a *block* of the matrix view ``[out, K]``: ``group_size`` columns (``-1``:
all) by ``rows`` rows, ``rows = min(out, max(1, block // group columns))`` where ``block``
(``WeightFormat.vq_block``) is the number of weights a codebook should serve. The default block
is GPTVQ's codebook overhead of 1/8 bit per weight -- ``2^(bits*d) * d * 8 / block = 0.125``
with their 8-bit codebooks (``--groupsize 2048`` for 2-D 2-bit, ``8192`` for 2-D 3-bit) -- counted
here with fp16 codebooks: ``block = 128 * d * 2^(bits*d)`` weights.

Layout: indices ``[out, ceil(K / d)]`` (row-major, packed at ``bits * d`` bits); codebooks fp16
``[row_blocks * ngroups, 2^(bits*d), d]``, block ``(b, j)`` (rows ``b*rows ...``, column group
``j``) at ``b * ngroups + j``. ``K`` need not be a multiple of ``d``: the last vector of each row
is padded with zero columns that are never decoded (their weight in every fit is 0).
"""

from __future__ import annotations

import math

import torch

from lowbit.formats import packing
from lowbit.formats.integer import PER_CHANNEL, effective_group_size, num_groups

DIMS = (1, 2, 4)


def check(bits: int, group_size: int | None, dim: int | None, block: int | None) -> tuple[int, int]:
    """The format's ``(vq_dim, vq_block)``, defaults filled in (``dim`` 2, GPTVQ's main setting),
    or a ``ValueError`` saying what to change."""
    dim = 2 if dim is None else dim
    if dim not in DIMS:
        raise ValueError(f"vq_dim {dim!r} is not supported; choose one of {', '.join(map(str, DIMS))}")
    if bits * dim > 8:
        raise ValueError(f"a {dim}-D codebook at {bits} bits per weight needs {bits * dim}-bit indices; at most 8 "
                         f"are stored (lower bits or vq_dim)")  # fmt: skip
    if group_size is None:
        raise ValueError("a vq weight's codebooks serve blocks of columns: use group_size -1 or a positive size")
    if group_size != PER_CHANNEL and group_size % dim:
        raise ValueError(f"group_size {group_size} must be a multiple of vq_dim {dim} (a vector never spans groups)")
    if block is None:
        block = 128 * dim * entries(bits, dim)
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"vq_block {block!r} must be a positive number of weights per codebook")
    return dim, block


def entries(bits: int, dim: int) -> int:
    return 1 << (bits * dim)


def vectors(k: int, dim: int) -> int:
    """Vectors per row of ``k`` columns (the last one zero-padded when ``dim`` does not divide ``k``)."""
    return math.ceil(k / dim)


def layout(rows: int, k: int, fmt) -> tuple[int, int, int, int]:
    """``(group columns, ngroups, rows per codebook, row blocks)`` of a ``[rows, k]`` matrix view."""
    kp = vectors(k, fmt.vq_dim) * fmt.vq_dim
    g = effective_group_size(kp, fmt.group_size)
    r = min(rows, max(1, fmt.vq_block // g))
    return g, num_groups(kp, fmt.group_size), r, math.ceil(rows / r)


def book_shape(rows: int, k: int, fmt) -> tuple[int, int, int]:
    _, ng, _, nrb = layout(rows, k, fmt)
    return nrb * ng, entries(fmt.bits, fmt.vq_dim), fmt.vq_dim


def book_ids(rows: int, k: int, fmt, device=None) -> torch.Tensor:
    """``long [rows, vectors]``: the codebook each vector is decoded with."""
    g, ng, r, _ = layout(rows, k, fmt)
    vec_group = torch.arange(vectors(k, fmt.vq_dim), device=device) * fmt.vq_dim // g
    return (torch.arange(rows, device=device) // r)[:, None] * ng + vec_group[None]


def check_books(book: torch.Tensor, rows: int, k: int, fmt, what: str) -> None:
    want = book_shape(rows, k, fmt)
    if tuple(book.shape) != want:
        raise ValueError(f"{what} are {list(book.shape)}; {list(want)} codebooks were expected for a [{rows}, {k}] "
                         f"weight in {fmt.describe()}")  # fmt: skip


def check_codes(codes: torch.Tensor, rows: int, k: int, fmt) -> None:
    want = (rows, vectors(k, fmt.vq_dim))
    if tuple(codes.shape) != want:
        raise ValueError(f"vq codes are {list(codes.shape)}; {list(want)} vector indices were expected for a "
                         f"[{rows}, {k}] weight with vq_dim {fmt.vq_dim}")  # fmt: skip


def packed_nbytes(rows: int, k: int, fmt) -> int:
    return packing.packed_nbytes(rows * vectors(k, fmt.vq_dim), fmt.bits * fmt.vq_dim)


def pack(codes: torch.Tensor, fmt) -> torch.Tensor:
    return packing.pack(codes.cpu(), fmt.bits * fmt.vq_dim)


def unpack(packed: torch.Tensor, fmt, rows: int, k: int) -> torch.Tensor:
    """``uint8 [rows, vectors]`` indices."""
    n = vectors(k, fmt.vq_dim)
    return packing.unpack(packed, fmt.bits * fmt.vq_dim, rows * n).reshape(rows, n)


def dequantize(codes: torch.Tensor, book: torch.Tensor, fmt, k: int) -> torch.Tensor:
    """``[rows, k]`` from indices ``[rows, vectors]`` and codebooks ``[nbooks, entries, d]``."""
    rows = codes.shape[0]
    ids = book_ids(rows, k, fmt, codes.device)
    book = book.to(codes.device).float()
    return book[ids, codes.long()].reshape(rows, -1)[:, :k]


def pad_columns(w: torch.Tensor, dim: int) -> torch.Tensor:
    """``w: [rows, k]`` with zero columns up to a whole number of vectors."""
    pad = vectors(w.shape[1], dim) * dim - w.shape[1]
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def to_blocks(w: torch.Tensor, rows: int, k: int, fmt) -> torch.Tensor:
    """``[nbooks, rows_per_book * group_cols / d, d]``: the vectors each codebook serves (``w`` already
    padded to whole vectors; a ragged last row block or group is zero-padded)."""
    g, ng, r, nrb = layout(rows, k, fmt)
    d = fmt.vq_dim
    x = torch.nn.functional.pad(w, (0, ng * g - w.shape[1], 0, nrb * r - rows))
    x = x.reshape(nrb, r, ng, g).permute(0, 2, 1, 3)  # [row block, group, rows, cols]
    return x.reshape(nrb * ng, r * g // d, d)


# The compiled E-step, ``fn(x, books, weight) -> long [B, n]`` or ``None`` where it does not run: registered by
# ``lowbit.kernels.vq`` when it loads (the kernels are a layer above the formats and import this module).
_nearest_kernel = None


def register_nearest(fn) -> None:
    """Make ``fn`` (``kernels.vq.nearest``: the same sum, in the same order, with no ``[B, n, E]`` scores in
    memory) compute ``assign`` and ``assign_fast`` where it runs."""
    global _nearest_kernel
    _nearest_kernel = fn


def _kernel_assign(x: torch.Tensor, books: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    return None if _nearest_kernel is None else _nearest_kernel(x, books, weight.expand(x.shape))


def assign(x: torch.Tensor, books: torch.Tensor, weight: torch.Tensor | None = None, chunk: int = 1 << 24):
    """``long [B, n]``: the entry of ``books: [B, E, d]`` nearest each of ``x: [B, n, d]`` under
    ``sum_d weight * (x - c)^2`` (``weight``: ``[B, n, d]`` or broadcastable; ``None``: plain), the lowest
    index on a tie. On CPU, once ``lowbit.kernels`` is loaded (``lowbit.quantize`` and the command line load
    it), the compiled kernel computes it (the same indices on every instruction set); PyTorch's direct form
    elsewhere."""
    code = _kernel_assign(x, books, torch.ones_like(x) if weight is None else weight)
    if code is not None:
        return code
    B, n, d = x.shape
    E = books.shape[1]
    out = torch.empty(B, n, dtype=torch.long, device=x.device)
    step = max(1, chunk // max(1, E * d * n))
    wt = None if weight is None else weight.expand(B, n, d)
    for b0 in range(0, B, step):
        xs, cs = x[b0 : b0 + step, :, None, :], books[b0 : b0 + step, None]  # [b, n, 1, d], [b, 1, E, d]
        diff = (xs - cs) ** 2
        if wt is not None:
            diff = diff * wt[b0 : b0 + step, :, None, :]
        out[b0 : b0 + step] = diff.sum(-1).argmin(-1)
    return out


def assign_fast(x: torch.Tensor, books: torch.Tensor, weight: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """``assign`` for the k-means iterations: ``assign`` itself where the compiled kernel runs; elsewhere as
    two batched matrix products: under the weighted distance ``sum_d w (x - c)^2 = sum_d w x^2 - 2 sum_d
    (w x) c + sum_d w c^2`` the first term is the same for every entry, so the nearest entry minimises
    ``w @ (c^2)^T - 2 (w x) @ c^T`` (``[n, E]`` per block, no ``[n, E, d]`` difference tensor). Near-ties
    may then round the other way than ``assign``'s direct form; the stored codes always come from
    ``assign``."""
    code = _kernel_assign(x, books, weight)
    if code is not None:
        return code
    B, n, d = x.shape
    E = books.shape[1]
    out = torch.empty(B, n, dtype=torch.long, device=x.device)
    step = max(1, chunk // max(1, E * n))
    wt = weight.expand(B, n, d)
    for b0 in range(0, B, step):
        w, c = wt[b0 : b0 + step], books[b0 : b0 + step]
        score = torch.bmm(w, (c * c).transpose(1, 2)) - 2 * torch.bmm(w * x[b0 : b0 + step], c.transpose(1, 2))
        out[b0 : b0 + step] = score.argmin(-1)
    return out


def mahalanobis_init(x: torch.Tensor, valid: torch.Tensor, n_entries: int) -> torch.Tensor:
    """GPTVQ's codebook initialisation (Section 3, "Codebook initialization"): each block's valid vectors ranked by their
    Mahalanobis distance from the block's mean, ``n_entries`` of them taken at even steps of that
    ranking. ``x: [B, n, d]``, ``valid: bool [B, n]`` -> ``[B, n_entries, d]``."""
    v = valid.float()[..., None]
    count = v.sum(1, keepdim=True).clamp(min=1)
    mu = (x * v).sum(1, keepdim=True) / count
    xc = (x - mu) * v
    sigma = xc.transpose(1, 2) @ xc / count  # [B, d, d]
    dist = ((xc @ torch.linalg.pinv(sigma)) * xc).sum(-1)
    dist = dist.masked_fill(~valid, float("inf"))
    order = torch.argsort(dist, dim=1)
    last = (valid.sum(1, keepdim=True) - 1).clamp(min=0).float()  # [B, 1]
    steps = torch.linspace(0, 1, n_entries, device=x.device)[None]
    idx = order.gather(1, torch.round(last * steps).long())
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor, n_entries: int, iters: int) -> torch.Tensor:
    """``[B, n_entries, d]`` codebooks for ``x: [B, n, d]`` by EM (Lloyd) under the weighted distance
    ``sum_d weight * (x - c)^2`` from the Mahalanobis start; an entry that loses all its vectors keeps
    its place. ``weight: [B, n, d]``; vectors whose weights are all 0 (padding) take no part."""
    x, weight = x.float(), weight.float().clamp(min=0)
    books = mahalanobis_init(x, weight.sum(-1) > 0, n_entries)
    for _ in range(iters):
        code = assign_fast(x, books, weight)  # E-step
        idx = code[..., None].expand(-1, -1, x.shape[-1])
        num = torch.zeros_like(books).scatter_add_(1, idx, weight * x)  # M-step: per-dimension weighted means
        den = torch.zeros_like(books).scatter_add_(1, idx, weight)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), books)
        if torch.equal(new, books):
            break
        books = new
    return books


def fit(w: torch.Tensor, fmt, weight: torch.Tensor | None = None, iters: int = 50) -> torch.Tensor:
    """fp16 codebooks ``[nbooks, entries, d]`` for ``w: [rows, k]`` by (weighted) k-means per block;
    ``weight``: ``[rows, k]`` importances (``None``: all 1)."""
    rows, k = w.shape
    wt = torch.ones_like(w, dtype=torch.float32) if weight is None else weight.float()
    x = to_blocks(pad_columns(w.float(), fmt.vq_dim), rows, k, fmt)
    wb = to_blocks(pad_columns(wt, fmt.vq_dim), rows, k, fmt)  # padding: weight 0
    return weighted_kmeans(x, wb, entries(fmt.bits, fmt.vq_dim), iters).to(torch.float16)


def quantize(w: torch.Tensor, book: torch.Tensor, fmt, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``uint8 [rows, vectors]``: each vector's nearest entry of its block's codebook."""
    rows, k = w.shape
    wt = torch.ones_like(w, dtype=torch.float32) if weight is None else weight.float()
    x = to_blocks(pad_columns(w.float(), fmt.vq_dim), rows, k, fmt)
    wb = to_blocks(pad_columns(wt, fmt.vq_dim), rows, k, fmt)  # padded columns do not count
    code = assign(x, book.float().to(w.device), wb)  # [nbooks, r * g / d]
    g, ng, r, nrb = layout(rows, k, fmt)
    code = code.reshape(nrb, ng, r, g // fmt.vq_dim).permute(0, 2, 1, 3).reshape(nrb * r, -1)
    return code[:rows, : vectors(k, fmt.vq_dim)].to(torch.uint8)
