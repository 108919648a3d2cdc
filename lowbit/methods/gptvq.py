"""GPTVQ (van Baalen et al., 2024, "GPTVQ: The Blessing of Dimensionality for LLM Quantization").

GPTQ's column loop with vector quantization (``formats.vector``): ``d`` columns at a time, each
row's ``d`` weights become the nearest entry of its block's codebook, and the error is spread
over the columns not yet quantized through the Cholesky factor of ``H^-1`` (``H = 2/n X^T X``),
as GPTQ spreads a single column's (Section 3, Algorithm 1). The paper's three steps:

- codebook initialisation (Section 3, "Codebook initialization"): when the loop reaches a group
  of ``group_size`` columns, each block's codebook is fitted to the group's current (already
  error-corrected) weights by EM -- weighted k-means from a Mahalanobis start -- each weight
  counted with its importance ``1 / [H^-1]_jj``, the inverse-Hessian diagonal in GPTQ's
  quantization error ``(w_j - q_j)^2 / [H^-1]_jj``;
- quantization: the nearest codeword under that same Hessian-weighted distance (the diagonal
  approximation of the ``d``-column OBS error), the error ``(w - q) / [H^-1]_jj`` propagated;
- codebook update (Section 3, "Codebook update"): with the assignments fixed, the codewords are
  refitted to the layer's output error ``tr((W - Q(C)) H (W - Q(C))^T)``, a least-squares problem
  in the codewords. The paper takes 25 Adam steps on it; lowbit runs conjugate gradients on the
  same quadratic (exact line searches, no learning rate), keeping the result only if it lowers
  the error once rounded to fp16.

``[H^-1]_jj`` is the squared diagonal of the Cholesky factor GPTQ works with: the inverse Hessian
of the columns not yet quantized. (The authors' code weights by that diagonal itself, not its
square; lowbit follows the paper's error.) Not here: the paper's 8-bit codebooks, blockwise data
normalization and SVD codebook compression (codebooks are stored, and counted, in fp16); act-order
(the authors' code has none either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowbit.formats import vector
from lowbit.formats.spec import WeightFormat
from lowbit.methods.base import MethodConfig, register
from lowbit.methods.gptq import inverse_hessian_cholesky
from lowbit.quantized_weight import QuantizedWeight, check_finite


def vq_step(x: torch.Tensor, books: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``long [rows]``: the codeword of ``books: [rows, E, d]`` (each row's own codebook) nearest
    ``x: [rows, d]`` under ``sum_j importance_j * (x_j - c_j)^2`` (``importance: [d]``)."""
    return (((x[:, None, :] - books) ** 2) * importance).sum(-1).argmin(-1)


def init_codebooks(w: torch.Tensor, importance: torch.Tensor, rows_per_book: int, bits: int, iters: int):
    """fp16-exact codebooks ``[row_blocks, 2^(bits*d), d]`` of one column group's vectors
    ``w: [rows, n, d]`` by EM, each column ``j`` weighted by ``importance: [n, d]``."""
    rows, n, d = w.shape
    r = rows_per_book
    nrb = math.ceil(rows / r)
    pad = (0, 0, 0, 0, 0, nrb * r - rows)  # a ragged last row block: rows of weight 0
    x = torch.nn.functional.pad(w, pad).reshape(nrb, r * n, d)
    wt = torch.nn.functional.pad(importance[None].expand(rows, n, d), pad).reshape(nrb, r * n, d)
    return vector.weighted_kmeans(x, wt, vector.entries(bits, d), iters).to(torch.float16).float()


def update_codebooks(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, books: torch.Tensor,
                     fmt: WeightFormat, iters: int) -> torch.Tensor:  # fmt: skip
    """The codebooks ``[nbooks, E, d]`` minimising ``tr((W - Q) H (W - Q)^T)`` for the fixed indices
    ``codes: [rows, vectors]`` (``W: [rows, K']``, ``K'`` whole vectors; ``Q`` their decoding), by
    ``iters`` conjugate-gradient steps from ``books``; ``books`` again if the fp16 result is no better."""
    rows, kp = W.shape
    nbooks, E, d = books.shape
    ids = vector.book_ids(rows, kp, fmt, W.device)  # [rows, vectors]
    slot = ((ids * E + codes.long()) * d)[:, :, None] + torch.arange(d, device=W.device)
    slot = slot.reshape(rows, -1)[:, :kp]  # the codebook parameter each weight is decoded from

    def decode(theta):  # [rows, K']
        return theta[slot]

    def collect(m):  # the adjoint of decode
        return torch.zeros(nbooks * E * d, device=W.device).index_add_(0, slot.reshape(-1), m.reshape(-1))

    def loss(theta):
        e = W - decode(theta)
        return float(((e @ H) * e).sum())

    theta = books.float().reshape(-1).clone()
    res = collect((W - decode(theta)) @ H)  # minus half the gradient
    direction, rs = res.clone(), float(res @ res)
    for _ in range(iters):
        a_dir = collect(decode(direction) @ H)
        curv = float(direction @ a_dir)
        if rs == 0 or curv <= 0:
            break
        theta += (rs / curv) * direction
        res -= (rs / curv) * a_dir
        rs, rs_old = float(res @ res), rs
        direction = res + (rs / rs_old) * direction
    theta = theta.to(torch.float16).float()
    if not bool(torch.isfinite(theta).all()) or loss(theta) >= loss(books.float().reshape(-1)):
        return books
    return theta.reshape(nbooks, E, d)


def gptvq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, damp: float = 0.01, blocksize: int = 128,
                   kmeans_iters: int = 100, update_iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GPTVQ on ``W: [out, K]`` with ``H: [K, K]``: indices ``uint8 [out, ceil(K / d)]`` and fp16
    codebooks ``[nbooks, 2^(bits*d), d]`` in ``fmt``'s layout (``formats.vector``)."""
    rows, k = W.shape
    d = fmt.vq_dim
    W = vector.pad_columns(W.detach().float(), d).clone()  # a last vector's padding: dead inputs
    kp = W.shape[1]
    H = torch.nn.functional.pad(H.detach().float().to(W.device), (0, kp - k, 0, kp - k))
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    W[:, dead] = 0
    H_obj = H.clone()  # the update's objective: dead inputs weigh nothing
    H[dead, dead] = 1
    g, ng, r, nrb = vector.layout(rows, k, fmt)
    Hinv, _ = inverse_hessian_cholesky(H, damp)
    importance = 1 / torch.diag(Hinv) ** 2  # 1 / [H^-1]_jj of the columns still to come
    importance[k:] = 0

    books = torch.zeros(nrb * ng, vector.entries(fmt.bits, d), d, device=W.device)
    codes = torch.zeros(rows, kp // d, dtype=torch.long, device=W.device)
    row_block = torch.arange(rows, device=W.device) // r
    W_orig = W.clone()
    for i1 in range(0, kp, blocksize):
        i2 = min(i1 + blocksize, kp)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(0, i2 - i1, d):
            col = i1 + i
            j = col // g
            if col % g == 0:  # a new group: its codebooks from its current weights
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                imp = importance[col : col + group.shape[1]].reshape(-1, d)
                books[j::ng] = init_codebooks(group.reshape(rows, -1, d), imp, r, fmt.bits, kmeans_iters)
            w = W1[:, i : i + d]
            book = books[row_block * ng + j]  # [rows, E, d]
            code = vq_step(w, book, importance[col : col + d])
            codes[:, col // d] = code
            q = book[torch.arange(rows, device=W.device), code]
            err = (w - q) / torch.diag(Hinv1)[i : i + d]
            W1[:, i + d :] -= err @ Hinv1[i : i + d, i + d :]
            Err1[:, i : i + d] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if update_iters:
        books = update_codebooks(W_orig, H_obj, codes, books, fmt, update_iters)
    return codes.to(torch.uint8), books.to(torch.float16)


@register
@dataclass
class GPTVQ(MethodConfig):
    """GPTVQ: ``vq_dim``-dimensional codebooks (``format="vq"``, ``bits`` per weight, so
    ``2^(bits*vq_dim)`` entries) found inside GPTQ's loop. Defaults are the paper's: 2-D vectors,
    codebooks per ``group_size=256`` columns (their ``--columns-per-group``) over ``vq_block``
    weights (``None``: GPTVQ's codebook overhead of 1/8 bit per weight, ``formats.vector``),
    ``kmeans_iters=100`` EM iterations, ``update_iters=25`` codebook-update steps (0: none),
    ``damp=0.01`` of ``mean(diag H)``, ``blocksize=128`` columns per lazy batch update."""

    name = "gptvq"
    needs_calibration = True
    uses_hessian = True

    format: str = "vq"
    group_size: int = 256
    vq_dim: int = 2
    vq_block: int | None = None
    kmeans_iters: int = 100
    update_iters: int = 25
    damp: float = 0.01
    blocksize: int = 128

    def __post_init__(self):
        if self.format != "vq":
            raise ValueError(f"gptvq fits vector codebooks (format vq), not {self.format!r}")
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp {self.damp} must lie in (0, 1); the paper uses 0.01")
        if self.blocksize <= 0 or self.blocksize % self.vq_dim:
            raise ValueError(f"blocksize {self.blocksize} must be a positive multiple of vq_dim {self.vq_dim}")
        if self.kmeans_iters < 0 or self.update_iters < 0:
            raise ValueError("kmeans_iters and update_iters must be at least 0")

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.format, self.bits, self.group_size, True, vq_dim=self.vq_dim, vq_block=self.vq_block)

    def with_format(self, fmt: WeightFormat) -> MethodConfig:
        if fmt == self.weight_format:
            return self
        return replace(self, bits=fmt.bits, group_size=fmt.group_size, vq_dim=fmt.vq_dim, vq_block=fmt.vq_block)

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        if stats is None or stats.tokens == 0:
            return QuantizedWeight.quantize(w, fmt)
        codes, books = gptvq_quantize(w, stats.H, fmt, self.damp, self.blocksize, self.kmeans_iters,
                                      self.update_iters)  # fmt: skip
        return QuantizedWeight.from_codes(codes.cpu(), books.cpu(), None, fmt, tuple(w.shape))

    def quantize_groups(self, w: torch.Tensor, stats) -> QuantizedWeight:
        """A grouped conv's groups are quantized apart (each on its own statistics), so no codebook may
        span two of them: the rows per codebook become the largest divisor of a group's rows that the
        block allows, and the groups' codebooks stack in the layout's order."""
        fmt = self.weight_format
        g, _, r, _ = vector.layout(w.shape[0], w.shape[1], fmt)
        per = w.shape[0] // stats.groups
        r = max(x for x in range(1, min(r, per) + 1) if per % x == 0)
        return MethodConfig.quantize_groups(replace(self, vq_block=r * g), w, stats)
