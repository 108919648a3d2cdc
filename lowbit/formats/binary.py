"""Binary-coding weights (``kind="bcq"``): a weight is a sum of ``bits`` sign planes, each with its
own scale, plus an offset -- ``w = z + sum_i alpha_i * b_i``, ``b_i`` in {-1, +1} (Xu et al. 2018,
"Alternating Multi-bit Quantization"; LUT-GEMM, Park et al. 2022, section 3.1, with the offset
of its eq. 3). Each row or group keeps ``bits`` alphas and one offset in fp16: the scale tensor
is ``[rows, ngroups * (bits + 1)]`` (group ``j``'s alphas at ``j * (bits + 1) ...``, then its offset).

A code's bit ``i`` is plane ``i``'s sign (1: +1). Since the ``2^bits`` sums of signed alphas
are a table per group, a binary-coded weight decodes like a codebook (``formats.codebook``) and
runs on the same look-up-table kernel: the table is built from the alphas once per layer, each
entry rounded to fp16 (so it is what an fp16 codebook would hold, and codes are chosen against it).

``fit`` is the alternating method: greedy residual planes to start (each plane the sign of
what the planes before left, its alpha the mean magnitude), then rounds of least squares for
the alphas and offset given the signs, and the best sign pattern given the alphas (the nearest
of the ``2^bits`` table values), keeping per group the best error seen.
"""

from __future__ import annotations

import torch

from lowbit.formats.integer import num_groups, to_groups


def params_per_group(bits: int) -> int:
    return bits + 1


def sign_matrix(bits: int, device=None) -> torch.Tensor:
    """``[2^bits, bits]``: code ``c``'s sign on each plane (+1 where bit ``i`` of ``c`` is set)."""
    c = torch.arange(1 << bits, device=device)
    return (((c[:, None] >> torch.arange(bits, device=device)) & 1) * 2 - 1).float()


def table(scale: torch.Tensor, bits: int, rows: int, ngroups: int) -> torch.Tensor:
    """The ``2^bits`` values of each group, ``[rows, ngroups * 2^bits]`` (the codebook layout), each
    rounded to fp16: a binary-coded weight is an fp16 table entry, so the table kernel holds the
    tables as it holds fp16 codebooks (its byte-lookup path)."""
    p = scale.float().reshape(rows, ngroups, params_per_group(bits))
    alpha, offset = p[..., :bits], p[..., bits:]
    values = offset + alpha @ sign_matrix(bits, scale.device).t()  # [rows, ngroups, 2^bits]
    return values.reshape(rows, -1).half().float()


def _nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ``values: [n, k]`` for each of ``x: [n, g]``."""
    order = torch.argsort(values, -1)
    ordered = values.gather(-1, order)
    mids = (ordered[:, 1:] + ordered[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), x.contiguous()).clamp(max=values.shape[1] - 1)
    return order.gather(-1, pos)


def fit(w: torch.Tensor, bits: int, group_size: int | None, iters: int = 15) -> torch.Tensor:
    """Alphas and offsets ``[rows, ngroups * (bits + 1)]`` (fp16) for ``w: [rows, n]``."""
    rows, n = w.shape
    ng = num_groups(n, group_size)
    x = to_groups(w.float(), group_size).reshape(rows * ng, -1)  # [R, g]
    g = x.shape[1]
    valid = torch.ones(rows, ng * g, dtype=torch.bool, device=w.device)
    valid[:, n:] = False  # a ragged last group's padding must not pull the fit
    valid = valid.reshape(rows * ng, g).float()
    signs = sign_matrix(bits, w.device)  # [2^b, b]

    def error(params, codes):
        vals = params[:, bits:] + params[:, :bits] @ signs.t()
        return ((vals.gather(1, codes) - x) ** 2 * valid).sum(1)

    # greedy start: plane i codes the sign of what planes 0..i-1 left, around the group's mean
    offset = (x * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
    resid = (x - offset) * valid
    alphas = []
    for _ in range(bits):
        a = resid.abs().sum(1, keepdim=True) / valid.sum(1, keepdim=True)
        alphas.append(a)
        resid = resid - a * torch.where(resid >= 0, 1.0, -1.0) * valid
    params = torch.cat([*alphas, offset], 1)
    codes = _nearest(x, params[:, bits:] + params[:, :bits] @ signs.t())
    best, best_err = params.clone(), error(params, codes)
    for _ in range(iters):
        # least squares for [alphas, offset] given the signs: A = [B | 1] per group, masked
        B = torch.cat([signs[codes], torch.ones_like(x)[..., None]], -1) * valid[..., None]  # [R, g, b+1]
        AtA = B.transpose(1, 2) @ B
        AtA = AtA + 1e-6 * AtA.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(bits + 1, device=w.device)
        Atx = B.transpose(1, 2) @ (x * valid)[..., None]
        # two planes with the same signs (or a plane of one sign) leave A singular: such groups keep their
        # parameters from the step before
        solved, info = torch.linalg.solve_ex(AtA, Atx)
        ok = (info == 0) & torch.isfinite(solved).all(1)[:, 0]
        params = torch.where(ok[:, None], solved[..., 0], params)
        codes = _nearest(x, params[:, bits:] + params[:, :bits] @ signs.t())
        err = error(params, codes)
        better = err < best_err
        best[better], best_err = params[better], torch.where(better, err, best_err)
    return best.to(torch.float16).reshape(rows, ng * (bits + 1))


def quantize(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Codes ``uint8 [rows, n]``: the nearest of each group's ``2^bits`` values."""
    rows, n = w.shape
    ng = num_groups(n, group_size)
    vals = table(scale, bits, rows, ng).reshape(rows * ng, -1)
    x = to_groups(w.float(), group_size).reshape(rows * ng, -1)
    return _nearest(x, vals).reshape(rows, -1)[:, :n].to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    rows, n = codes.shape
    ng = num_groups(n, group_size)
    vals = table(scale.to(codes.device), bits, rows, ng).reshape(rows, ng, -1)
    groups = to_groups(codes.long(), group_size)
    return vals.gather(-1, groups).reshape(rows, -1)[:, :n]
