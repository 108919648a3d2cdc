"""Learned codebooks (``kind="lut"``): each row (or each group of a row) has its own ``2^bits``
values, stored in fp16, and a weight is the codebook entry its code indexes -- the
non-uniform grids of SqueezeLLM (Kim et al. 2023) and Deep Compression's weight sharing
(Han et al. 2016). The codes pack like integer codes; the codebook takes the place of the
scales: ``[rows, ngroups * 2^bits]`` (group ``j``'s entries at ``j * 2^bits ...``).

``group_size=None`` gives one codebook ``[1, 2^bits]`` shared by every row (a per-layer codebook).

``weighted_kmeans`` fits one 1-D codebook per row of a ``[rows, n]`` matrix, all rows at
once: each value counts with its weight (a sensitivity), Lloyd iterations from weighted
quantiles, an emptied cluster keeping its centroid.
"""

from __future__ import annotations

import torch

from lowbit.formats.integer import num_groups, to_groups


def levels(bits: int) -> int:
    return 1 << bits


def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """``[rows, k]`` centroids (ascending) of each row of ``x: [rows, n]`` minimising
    ``sum weight * (x - c[code])^2``; rows whose weights are all 0 count every value equally.

    Lloyd's iterations from two starts -- the weighted quantiles and the uniform grid over the
    row's range -- keeping, per row, the better result (either alone gets stuck: quantiles on
    rows of few values, the uniform grid on heavy-tailed rows)."""
    x = x.float()
    w = weight.float().clamp(min=0)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    order = torch.argsort(x, dim=-1)
    xs, ws = x.gather(-1, order), w.gather(-1, order)
    cum = torch.cumsum(ws, -1) / ws.sum(-1, keepdim=True)
    targets = (torch.arange(k, dtype=torch.float32, device=x.device) + 0.5) / k
    idx = torch.searchsorted(cum.contiguous(), targets.expand(x.shape[0], k).contiguous()).clamp(max=x.shape[1] - 1)
    quantiles = xs.gather(-1, idx)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    uniform = lo + (hi - lo) * (torch.arange(k, dtype=torch.float32, device=x.device) + 0.5) / k
    best, best_err = None, None
    for start in (quantiles, uniform):
        c = _lloyd(x, w, start, iters)
        err = (w * (x - c.gather(-1, assign(x, c))) ** 2).sum(-1)
        if best is None:
            best, best_err = c, err
        else:
            better = (err < best_err)[:, None]
            best, best_err = torch.where(better, c, best), torch.minimum(err, best_err)
    return best


def _lloyd(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        code = assign(x, c)
        num = torch.zeros_like(c).scatter_add_(-1, code, w * x)
        den = torch.zeros_like(c).scatter_add_(-1, code, w)
        new, _ = torch.sort(torch.where(den > 0, num / den.clamp(min=1e-30), c), dim=-1)
        if torch.equal(new, c):
            break
        c = new
    return c


def assign(x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``book: [rows, k]`` (ascending) for each of ``x: [rows, n]``."""
    mids = (book[:, 1:] + book[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous()).clamp(max=book.shape[1] - 1)


def _books(book: torch.Tensor, rows: int, ng: int, k: int) -> torch.Tensor:
    """``[rows, ng, k]``; a per-tensor codebook ``[1, k]`` is every row's."""
    return book.float().reshape(-1, ng, k).expand(rows, ng, k)


def quantize(w: torch.Tensor, book: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Codes ``uint8 [rows, n]``: the nearest entry of each group's codebook."""
    rows, n = w.shape
    ng = num_groups(n, group_size)
    groups = to_groups(w.float(), group_size)  # [rows, ng, g]
    books = _books(book, rows, ng, levels(bits)).reshape(rows * ng, -1)
    codes = assign(groups.reshape(rows * ng, -1), books).reshape(rows, -1)[:, :n]
    return codes.to(torch.uint8)


def dequantize(codes: torch.Tensor, book: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    rows, n = codes.shape
    ng = num_groups(n, group_size)
    groups = to_groups(codes.long(), group_size)  # [rows, ng, g]
    books = _books(book.to(codes.device), rows, ng, levels(bits))
    return books.gather(-1, groups).reshape(rows, -1)[:, :n]


def fit(w: torch.Tensor, bits: int, group_size: int | None, weight: torch.Tensor | None = None, iters: int = 50):
    """An fp16 codebook ``[rows, ngroups * 2^bits]`` for ``w: [rows, n]`` by (weighted) k-means per group;
    ``group_size=None``: one codebook ``[1, 2^bits]`` for the whole tensor."""
    if group_size is None:
        return fit(w.reshape(1, -1), bits, -1, None if weight is None else weight.reshape(1, -1), iters)
    rows, n = w.shape
    ng = num_groups(n, group_size)
    groups = to_groups(w.float(), group_size).reshape(rows * ng, -1)
    g = groups.shape[1]
    wt = torch.ones_like(w) if weight is None else weight
    wt = to_groups(wt.float(), group_size).reshape(rows * ng, -1)
    if ng * g != n:  # the zero padding of a ragged last group must not pull the codebook
        pad = torch.zeros(rows, ng * g, dtype=torch.bool, device=w.device)
        pad[:, n:] = True
        wt = wt.masked_fill(pad.reshape(rows * ng, -1), 0.0)
    book = weighted_kmeans(groups, wt, levels(bits), iters)
    return book.to(torch.float16).sort(-1).values.reshape(rows, ng * levels(bits))
