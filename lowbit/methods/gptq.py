"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

Columns are quantized one at a time; the error each one makes is spread over
the columns not yet quantized through the inverse Hessian ``H^-1`` of the layer's
squared output error, ``H = 2/n X^T X``. The paper's three tricks are here:
lazy batch updates (``blocksize``), a Cholesky form of ``H^-1``, and act-order
(columns by decreasing ``diag(H)``). Groups of ``group_size`` columns get their
parameters when the loop reaches them, from the already-updated weights; with
``static_groups`` (forced on by act-order with groups, so that groups stay
contiguous in the stored layout) they are fixed from the original weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lowbit.formats import double, floating, integer
from lowbit.formats.search import grid_factors
from lowbit.formats.spec import SCALED_CODEBOOKS
from lowbit.methods.base import MethodConfig, register
from lowbit.methods.rtn import mse_clip_params
from lowbit.quantized_weight import QuantizedWeight, check_finite


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    When the factorisation fails the dampening grows tenfold, with a warning.
    Returns the factor and the dampening that worked.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(max_tries):
        try:
            L = torch.linalg.cholesky(H + damp * mean_diag * eye)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            if attempt == max_tries - 1:
                raise
            warnings.warn(f"GPTQ: Hessian not positive definite with damp={damp:g}; retrying with {damp * 10:g}")
            damp *= 10
    raise AssertionError("unreachable")


def _group_params(w: torch.Tensor, bits: int, symmetric: bool, mse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale and zero per row for ``w: [out, cols]`` (one group's columns)."""
    if mse:
        s, z = mse_clip_params(w, bits, -1, symmetric)
    else:
        s, z = integer.minmax_params(w, bits, -1, symmetric)
    return s[:, 0], z[:, 0]


def _codebook_scale(w: torch.Tensor, kind: str, bits: int, mse: bool) -> torch.Tensor:
    """One scale per row for ``w: [out, cols]`` on a scaled codebook: absmax, or the searched one."""
    if mse:
        return floating.mse_scale(w, kind, -1, bits, grid_factors(100, 0.8), 2.4)[:, 0]
    return floating.absmax_scale(w, kind, -1, bits)[:, 0]


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
    keep: torch.Tensor | None = None,
    round_scale=None,
    kind: str = "int",
):
    """GPTQ on ``W: [out, in]`` with ``H: [in, in]``.

    Returns ``codes uint8 [out, in]`` and per-group ``scale, zero [out, ngroups]``
    in the original column order. ``keep`` (``bool [in]``, OWQ's weak columns): those
    columns are not quantized but kept in float; they come last, so they absorb the
    error feedback of every quantized column, their codes are the zero point (they
    dequantize to 0) and they do not widen their groups' ranges (groups are then fixed
    from the original weights). With ``keep`` a fourth result holds the kept columns'
    final values (``[out, in]``, zero elsewhere). ``round_scale(group, scale)``, when given, maps
    each group's scales (``[out]``) to the ones stored (quantized scales, ``formats.double``)
    before any code of the group is computed; integer zero points follow the rounded scale.

    ``kind``: ``int``, or a scaled codebook (``nf4``, ``fp4``, ``pot``, ``apot``, ``log``): each group
    then has a scale (absmax, or searched with ``mse``), each column's codes are its nearest levels,
    and ``zero`` holds the code of the level 0 (what kept columns store).
    """
    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)
    rows, cols = W.shape
    g = integer.effective_group_size(cols, group_size)
    ngroups = integer.num_groups(cols, group_size)
    maxq = integer.qmax(bits)
    table = None if kind == "int" else floating.codebook(kind, bits).to(W.device)
    zero_code = None if table is None else float(torch.argmin(table.abs()))

    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = ngroups > 1
    static = static_groups or (act_order and grouped) or (keep is not None and grouped)
    scale = torch.zeros(rows, ngroups, device=W.device)
    zero = torch.zeros(rows, ngroups, device=W.device)
    if keep is not None:
        keep = keep.to(device=W.device, dtype=torch.bool)

    def params(j: int, cols: torch.Tensor) -> None:
        if table is None:
            s, z = _group_params(cols, bits, symmetric, mse)
        else:
            s, z = _codebook_scale(cols, kind, bits, mse), torch.full((rows,), zero_code, device=W.device)
        if round_scale is not None:
            rounded = round_scale(j, s)
            if table is None and not symmetric:  # the same real zero, -z * s, on the stored scale
                z = torch.round(z * s / rounded).clamp(0, maxq)
            s = rounded
        scale[:, j], zero[:, j] = s, z

    if not grouped or static:
        ranged = W if keep is None else W.masked_fill(keep[None], 0.0)  # 0 lies in every range
        for j in range(ngroups):
            params(j, ranged[:, j * g : (j + 1) * g])

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    if keep is not None:
        perm = torch.cat([perm[~keep[perm]], perm[keep[perm]]])
    if act_order or keep is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, _ = inverse_hessian_cholesky(H, damp)

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    kept = torch.zeros(rows, cols, device=W.device) if keep is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if grouped and not static and col % g == 0:
                params(grp, torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g])
            w = W1[:, i]
            s, z = scale[:, grp], zero[:, grp]
            if keep is not None and keep[col]:  # kept in fp16: its code dequantizes to 0
                codes[:, col] = z.to(torch.uint8)
                kept[:, col] = w.to(torch.float16).float()
                err = (w - kept[:, col]) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
                continue
            if table is None:
                q = torch.clamp(torch.round(w / s) + z, 0, maxq)
                deq = (q - z) * s
            else:
                q = floating.quantize_codebook(w / s, table)
                deq = table[q.long()] * s
            codes[:, col] = q.to(torch.uint8)
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if keep is not None:
        return codes, scale, zero, kept
    return codes, scale, zero


@register
@dataclass
class GPTQ(MethodConfig):
    """GPTQ. Defaults: act-order and a clip-searched range per group, which on
    stories260K at 3 bits per-channel bring perplexity from 9.20 (plain) to 7.88.
    ``damp``: dampening relative to ``mean(diag H)`` (the paper's 1%).
    ``blocksize``: columns per lazy batch update. ``act_order``: quantize columns
    by decreasing ``diag(H)``. ``static_groups``: fix group parameters from the
    original weights. ``true_sequential``: observe each group of linears after
    the ones before it in the block are quantized. ``mse``: clip-search each
    group's range instead of min-max."""

    name = "gptq"
    needs_calibration = True
    uses_hessian = True
    supports_scale_bits = True

    damp: float = 0.01
    blocksize: int = 128
    act_order: bool = True
    static_groups: bool = False
    mse: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.format not in ("int", *SCALED_CODEBOOKS):
            raise ValueError(f"GPTQ quantizes to integer grids and scaled codebooks ({', '.join(SCALED_CODEBOOKS)}); "
                             f"format {self.format!r} is not supported")  # fmt: skip
        if not 0 < self.damp < 1:
            raise ValueError(f"damp {self.damp} must lie in (0, 1); the paper uses 0.01")

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        if stats is None or stats.tokens == 0:
            return QuantizedWeight.quantize(w, fmt)
        codes, scale, zero, _, scale_q = self.solve(w, stats.H)
        return QuantizedWeight.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), fmt, scale_q=scale_q)

    def solve(self, w: torch.Tensor, H: torch.Tensor, keep: torch.Tensor | None = None):
        """``gptq_quantize`` of ``w`` with this config's format and knobs (``keep``: OWQ's kept columns):
        ``codes, scale, zero, kept`` (``None`` without ``keep``) and the scales' second-level encoding
        (``None`` unless the format has ``scale_bits``)."""
        fmt = self.weight_format
        parts = {}

        def round_scale(j, s):
            rounded, parts[j] = double.round_scales(s[:, None].cpu(), fmt.scale_bits, fmt.scale_group_size)
            return rounded[:, 0].to(s.device)

        out = gptq_quantize(w, H, fmt.bits, fmt.group_size, fmt.symmetric, self.damp, self.blocksize, self.act_order,
                            self.static_groups, self.mse, keep=keep,
                            round_scale=round_scale if fmt.scale_bits is not None else None,
                            kind=fmt.kind)  # fmt: skip
        codes, scale, zero, kept = out if keep is not None else (*out, None)
        scale_q = double.QuantizedScales.stack([parts[j] for j in sorted(parts)]) if parts else None
        return codes, scale, zero, kept, scale_q
