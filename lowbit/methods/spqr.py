"""SpQR (Dettmers et al., "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
Compression", ICLR 2024).

GPTQ with three changes (the paper's Algorithm 1):

- **Small groups, quantized statistics** (section 4.1): groups of ``group_size`` = 16 weights
  along a row get their own min-max scale and zero, and the scales are themselves quantized to
  ``scale_bits`` = 3 bits in runs of ``scale_group_size`` = 16 output channels with an fp16 base
  and step (``formats.double``), so the small groups cost ~0.4 bits per weight instead of 2.
  The zero points are integers of the weights' own width, as lowbit stores them (the paper also
  quantizes its zero points to 3 bits: at 3-bit weights that is the same cost).
- **Outliers by the GPTQ sensitivity** (section 4.2): a weight is an outlier when quantizing it
  would cost more than ``outlier_threshold`` times the layer's typical error, the cost measured
  as GPTQ measures it, ``((w - q(w)) / U_jj)^2`` with ``U`` the Cholesky factor of ``H^-1``
  (the threshold is relative to the mean over columns of ``Var(W_:,j) / U_jj^2``). Two passes
  find them: when a group starts, the weights whose *leave-one-out* error reduction (the
  group's error with the weight's own range and term removed) exceeds the threshold do not
  widen the group's range; then each column keeps, in fp16, the weights whose error on that
  grid still exceeds it. Kept weights are stored as sparse outliers (``formats.sparse``: 32
  bits each, the paper's cost) and their codes are the zero point.
- Everything else is GPTQ: columns in order, the error of each spread over the columns not
  yet quantized through ``U``, lazy block updates.

Groups are contiguous in the stored column order: SpQR's act-order reorders columns before
grouping, which in lowbit's layout would need a stored permutation; ``act_order=True`` instead
visits columns by decreasing ``diag(H)`` with each group's statistics fixed from the original
weights (GPTQ's static groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import double, integer
from lowbit.formats.sparse import Outliers
from lowbit.methods.base import register
from lowbit.methods.gptq import GPTQ, inverse_hessian_cholesky
from lowbit.quantized_weight import QuantizedWeight, check_finite


def group_error(w: torch.Tensor, d: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, ``sum_c ((w - q(w)) / d_c)^2`` over a group ``w: [rows, g]`` on its min-max grid;
    ``mask`` (``bool [rows, g]``): weights left out of both the range and the sum."""
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else ~mask
    big = torch.finfo(w.dtype).max
    lo = torch.where(keep, w, big).amin(1, keepdim=True)
    hi = torch.where(keep, w, -big).amax(1, keepdim=True)
    lo, hi = torch.where(keep.any(1, keepdim=True), lo, 0), torch.where(keep.any(1, keepdim=True), hi, 0)
    s, z = integer.params_from_range(lo, hi, bits, False)
    q = (torch.clamp(torch.round(w / s) + z, 0, integer.qmax(bits)) - z) * s
    return (((w - q) / d) ** 2 * keep).sum(1)


def leave_one_out_reduction(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, g]``: how much the group's error falls when weight ``c`` leaves it (its range and its
    own term) -- SpQR's test for a weight that would make its group's grid worse for all."""
    base = group_error(w, d, bits)
    out = torch.empty_like(w)
    for c in range(w.shape[1]):
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[:, c] = True
        out[:, c] = base - group_error(w, d, bits, mask)
    return out


def spqr_quantize(W, H, bits, group_size, scale_bits, scale_group, threshold, damp=0.01, blocksize=128,
                  act_order=False):  # fmt: skip
    """SpQR on ``W: [out, in]`` with ``H: [in, in]``: ``codes``, decoded ``scale`` and ``zero``
    (``[out, ngroups]``), the scales' encoding, and the outliers' values and mask (``[out, in]``)."""
    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)
    rows, cols = W.shape
    g = integer.effective_group_size(cols, group_size)
    ngroups = integer.num_groups(cols, group_size)
    maxq = integer.qmax(bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    inv = torch.argsort(perm)
    Wp, Hp = W[:, perm], H[perm][:, perm]
    U, _ = inverse_hessian_cholesky(Hp, damp)
    d_of = torch.diag(U)[inv]  # U_jj of each original column
    # the layer's typical cost: the mean over columns of Var(W_:,j) / U_jj^2 (section 4.2)
    tau = threshold * float((W.var(0, unbiased=False) / d_of**2).mean())

    scale = torch.zeros(rows, ngroups, device=W.device)
    zero = torch.zeros(rows, ngroups, device=W.device)
    parts: dict[int, double.QuantizedScales] = {}

    def fit_group(j: int, w: torch.Tensor, d: torch.Tensor) -> None:
        """Statistics of group ``j`` from its weights ``w: [rows, g]``, likely outliers left out."""
        likely = leave_one_out_reduction(w, d, bits) > tau
        keep = ~likely
        big = torch.finfo(w.dtype).max
        lo = torch.where(keep, w, big).amin(1)
        hi = torch.where(keep, w, -big).amax(1)
        lo, hi = torch.where(keep.any(1), lo, 0), torch.where(keep.any(1), hi, 0)
        s, z = integer.params_from_range(lo, hi, bits, False)
        rounded, parts[j] = double.round_scales(s[:, None].cpu(), scale_bits, scale_group)
        rounded = rounded[:, 0].to(s.device)
        scale[:, j] = rounded
        zero[:, j] = torch.round(z * s / rounded).clamp(0, maxq)

    static = act_order and ngroups > 1
    if static or ngroups == 1:
        for j in range(ngroups):
            fit_group(j, W[:, j * g : (j + 1) * g], d_of[j * g : (j + 1) * g])

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    kept = torch.zeros(rows, cols, device=W.device)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wp[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not static and ngroups > 1 and col % g == 0:  # natural order: the group is the next g columns
                upcoming = torch.cat([W1[:, i:], Wp[:, i2:]], dim=1)[:, :g]
                fit_group(grp, upcoming, torch.diag(U)[i1 + i : i1 + i + upcoming.shape[1]])
            w = W1[:, i]
            s, z = scale[:, grp], zero[:, grp]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            deq = (q - z) * s
            out = ((w - deq) / U1[i, i]) ** 2 > tau  # still too costly on this grid: kept in fp16
            q = torch.where(out, z, q)
            deq = torch.where(out, w.to(torch.float16).float(), deq)
            codes[:, col] = q.to(torch.uint8)
            kept[:, col] = torch.where(out, deq, 0.0)
            mask[:, col] = out
            err = (w - deq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]
    scale_q = double.QuantizedScales.stack([parts[j] for j in range(ngroups)])
    return codes, scale, zero, scale_q, kept, mask


@register
@dataclass
class SpQR(GPTQ):
    """SpQR: GPTQ on groups of 16 with 3-bit statistics and the costliest weights kept in fp16.
    ``outlier_threshold``: relative to the layer's typical error (the paper's 0.2; larger keeps
    fewer outliers)."""

    name = "spqr"

    bits: int = 3
    group_size: int = 16
    scale_bits: int | None = 3
    scale_group_size: int = 16
    outlier_threshold: float = 0.2
    act_order: bool = False
    mse: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.format != "int":
            raise ValueError(f"spqr fits integer groups with quantized statistics; format {self.format!r} is not one")
        if self.symmetric:
            raise ValueError("spqr fits asymmetric groups (a zero point per group); leave symmetric off")
        if self.scale_bits is None:
            raise ValueError("spqr stores its statistics quantized: scale_bits must be set (the paper's 3)")
        if self.outlier_threshold <= 0:
            raise ValueError(f"outlier_threshold ({self.outlier_threshold}) must be positive")

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        if stats is None or stats.tokens == 0:
            return QuantizedWeight.quantize(w, fmt)
        codes, scale, zero, scale_q, kept, mask = spqr_quantize(
            w,
            stats.H,
            fmt.bits,
            fmt.group_size,
            fmt.scale_bits,
            fmt.scale_group_size,
            self.outlier_threshold,
            self.damp,
            self.blocksize,
            self.act_order,
        )
        outliers = Outliers.from_dense(kept.cpu(), mask.cpu()) if bool(mask.any()) else None
        return QuantizedWeight.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), fmt, outliers=outliers,
                                          scale_q=scale_q)  # fmt: skip
