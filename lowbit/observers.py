"""Activation observers: static quantization ranges from calibration statistics.

Each observer turns what was seen of a set of input channels into a range
``[lo, hi]``, from which ``formats.activation.params_from_range`` makes the scale
and zero point (symmetric formats use ``max(|lo|, |hi|)``):

- ``minmax``: the smallest and largest value seen.
- ``ema``: an exponential moving average of each calibration batch's min and max
  (averaging constant 0.1), less sensitive to one batch's extremes.
- ``percentile``: the 0.01st and 99.99th percentiles (of magnitudes, symmetric).
- ``mse``: the range, shrunk from min-max on a grid, with the least mean squared
  quantization error on the observed values.
- ``kl``: TensorRT's entropy calibration (Migacz, 2017): a 2048-bin histogram of
  magnitudes, and the threshold whose quantized distribution (2**(bits-1) levels)
  is closest to the clipped one in KL divergence; a symmetric range ``[-T, T]``
  (clipped to what was seen, for asymmetric formats).

``ChannelStats`` is what the observers read: per-channel running min and max,
per-batch min and max, and a fixed sample of whole input rows (so that any subset
of channels can be observed, for per-group activation scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from lowbit.formats import activation as A
from lowbit.formats.activation import ActFormat
from lowbit.formats.search import shrink_factors

OBSERVERS = ("minmax", "ema", "percentile", "mse", "kl", "ptf")
PTF_LEVELS = 3  # FQ-ViT's power-of-two factors: 2^0 .. 2^3 times the finest scale
EMA_CONSTANT = 0.1


def check_observer(name: str) -> None:
    if name not in OBSERVERS:
        raise ValueError(f"unknown activation observer {name!r}; choose one of {', '.join(OBSERVERS)}")


@dataclass
class ChannelStats:
    """What was observed of a layer's input ``x: [tokens, K]``.

    ``lo``/``hi``: ``[K]`` running min/max. ``batch_lo``/``batch_hi``: ``[batches, K]``.
    ``rows``: ``[rows, K]`` sampled input rows.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    batch_lo: torch.Tensor
    batch_hi: torch.Tensor
    rows: torch.Tensor

    def columns(self, cols: torch.Tensor) -> ChannelStats:
        return ChannelStats(self.lo[cols], self.hi[cols], self.batch_lo[:, cols], self.batch_hi[:, cols],
                            self.rows[:, cols])  # fmt: skip


def observe_range(stats: ChannelStats, observer: str, fmt: ActFormat, percentile: float = 99.99,
                  grid: int = 100) -> tuple[float, float]:  # fmt: skip
    """The range ``(lo, hi)`` that ``observer`` picks for all channels of ``stats`` together."""
    check_observer(observer)
    lo, hi = float(stats.lo.min()), float(stats.hi.max())
    values = stats.rows.reshape(-1).float()
    if observer == "minmax" or values.numel() == 0:
        return lo, hi
    if observer == "ema":
        blo, bhi = stats.batch_lo.amin(1), stats.batch_hi.amax(1)
        elo, ehi = float(blo[0]), float(bhi[0])
        for a, b in zip(blo[1:].tolist(), bhi[1:].tolist()):
            elo += EMA_CONSTANT * (a - elo)
            ehi += EMA_CONSTANT * (b - ehi)
        return elo, ehi
    if observer == "percentile":
        q = percentile / 100
        if fmt.symmetric:
            t = _quantile(values.abs(), q)
            return -t, t
        return _quantile(values, 1 - q), _quantile(values, q)
    if observer == "mse":
        return mse_range(values, lo, hi, fmt, grid)
    t = kl_threshold(values.abs(), fmt.bits)
    return max(lo, -t), min(hi, t)


def _quantile(x: torch.Tensor, q: float) -> float:
    # torch.quantile refuses inputs above 16M elements; a sorted-index pick has no such limit
    k = min(x.numel() - 1, max(0, round(q * (x.numel() - 1))))
    return float(x.kthvalue(k + 1).values)


def mse_range(values: torch.Tensor, lo: float, hi: float, fmt: ActFormat, grid: int = 100,
              min_ratio: float = 0.1) -> tuple[float, float]:  # fmt: skip
    """Shrink ``[lo, hi]`` by ``p`` in ``(min_ratio, 1]`` to minimise the mean squared error on ``values``.

    Every candidate is scored in one batched pass (``[candidates, values]``, in chunks), the
    same loop as ``formats.search.shrink_search`` without a kernel launch per candidate."""
    factors = shrink_factors(grid, (1 - min_ratio) / grid).float()
    lo_p, hi_p = factors * float(lo), factors * float(hi)
    scale, zero = A.params_from_range(lo_p, hi_p, fmt)  # [G]
    errs = []
    for i in range(0, factors.numel(), 25):  # 25 candidates at a time bound the memory
        s, z = scale[i : i + 25, None], zero[i : i + 25, None]
        errs.append((A.codes(values[None, :], s, z, fmt) * s - values[None, :]).pow(2).mean(1))
    best = int(torch.argmin(torch.cat(errs)))  # the first of equal errors: the widest range
    return float(lo_p[best]), float(hi_p[best])


def kl_threshold(mags: torch.Tensor, bits: int = 8, bins: int = 2048) -> float:
    """Entropy calibration: the clipping threshold whose ``2**(bits-1)``-level quantization of the
    histogram of ``mags`` loses the least information (KL divergence) against the clipped histogram."""
    amax = float(mags.max()) if mags.numel() else 0.0
    if amax <= 0:
        return 0.0
    hist = torch.histc(mags.float(), bins, 0, amax).double().numpy()
    edges = np.linspace(0, amax, bins + 1)
    levels = 1 << (bits - 1)
    best_i, best_kl = bins, float("inf")
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # the clipped mass piles up in the last bin
        nonzero = hist[:i] > 0
        # merge the i bins into `levels` levels, then spread each level over its non-empty bins
        level_of = (np.arange(i) * levels) // i
        total = np.bincount(level_of, weights=hist[:i], minlength=levels)
        count = np.bincount(level_of, weights=nonzero, minlength=levels)
        q = np.where(nonzero, total[level_of] / np.maximum(count[level_of], 1), 0.0)
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        if bool((q[mask] == 0).any()):
            continue  # infinite divergence: a populated bin the quantized histogram cannot express
        kl = float((p[mask] * np.log(p[mask] / q[mask])).sum())
        if kl <= best_kl:
            best_i, best_kl = i, kl
    return float(edges[best_i])


def static_params(stats: ChannelStats, fmt: ActFormat, observer: str, perm: torch.Tensor | None = None,
                  bounds: torch.Tensor | None = None, percentile: float = 99.99
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-group scale and zero ``[G]`` (``G = 1`` per tensor) for the channels ``perm[bounds[g]:bounds[g+1]]``
    (a non-uniform kind: its parameters, see ``nonuniform_params``)."""
    if not fmt.uniform:
        return nonuniform_params(stats, fmt, observer, percentile), torch.zeros(1)
    if observer == "ptf":
        return ptf_params(stats, fmt)
    k = stats.lo.numel()
    perm = torch.arange(k) if perm is None else perm
    bounds = torch.tensor([0, k]) if bounds is None else bounds
    scales, zeros = [], []
    for g in range(bounds.numel() - 1):
        cols = perm[int(bounds[g]) : int(bounds[g + 1])]
        if cols.numel() == 0:
            scales.append(torch.tensor(1.0))
            zeros.append(torch.tensor(0.0))
            continue
        lo, hi = observe_range(stats.columns(cols), observer, fmt, percentile)
        s, z = A.params_from_range(torch.tensor(lo), torch.tensor(hi), fmt)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales).float(), torch.stack(zeros).float()


def ptf_params(stats: ChannelStats, fmt: ActFormat, levels: int = PTF_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """FQ-ViT's Power-of-Two Factor (Lin et al. 2022): per-channel scales ``s_1 2^alpha_c``, one zero point.

    ``s_top = (max - min) / (2^b - 1)`` over all channels (asymmetric) and ``s_1 = s_top / 2^levels``;
    the shared zero point is taken at the coarsest scale, ``z = clamp(-round(min / s_top), 0, 2^b - 1)``;
    each channel's ``alpha_c`` in ``0 .. levels`` minimises that channel's squared error on the
    sampled rows. An integer LayerNorm then reads ``(q - z) << alpha_c`` on one scale ``s_1``."""
    if fmt.symmetric:
        raise ValueError("power-of-two factors are for asymmetric (zero-point) activations")
    top = float((1 << fmt.bits) - 1)
    lo, hi = min(float(stats.lo.min()), 0.0), max(float(stats.hi.max()), 0.0)
    s_top = max((hi - lo) / top, 1e-8)
    zero = min(max(-round(lo / s_top), 0), int(top))
    rows = stats.rows.float()  # [n, K]
    cands = s_top / 2.0 ** torch.arange(levels, -1, -1, dtype=torch.float32)  # s_1 2^alpha, alpha = 0..levels
    errs = torch.stack([((torch.round(rows / s) + zero).clamp(0, top) - zero).mul(s).sub(rows).pow(2).mean(0)
                        for s in cands.tolist()])  # [levels + 1, K]  # fmt: skip
    scale = cands[errs.argmin(0)]
    return scale, torch.full_like(scale, float(zero))


LOG_QUANTILES = (0.999, 0.9999, 0.99999)  # RepQ-ViT's candidates for a log quantizer's top
TWIN_SPLITS = 20  # d1 = d2 / 2^m for m = 0 .. 19 (PTQ4ViT's split points 2^-i)


def nonuniform_params(stats: ChannelStats, fmt: ActFormat, observer: str = "mse",
                      percentile: float = 99.99) -> torch.Tensor:  # fmt: skip
    """A ``log2``/``logsqrt2``/``twin`` quantizer's ``scale`` from the observed values.

    Log kinds: the top ``s`` is the maximum (``minmax``), the ``percentile`` (``percentile``),
    or (any other observer) whichever of the maximum and RepQ-ViT's quantiles 0.999,
    0.9999, 0.99999 gives the smallest squared error. Twin, unsigned: ``d2`` covers the
    maximum with ``2^(b-1) - 1`` steps and ``d1 = d2 / 2^m``, ``m`` chosen by squared
    error. Twin, signed: ``d1`` covers the minimum with ``2^(b-1)`` steps (GELU's
    negative part), ``d2`` the maximum, shrunk by the MSE search unless ``minmax``."""
    values = stats.rows.reshape(-1).float()
    lo, hi = float(stats.lo.min()), float(stats.hi.max())
    if values.numel() == 0 or hi <= 0:
        return torch.tensor([1.0, 1.0] if fmt.kind == "twin" else [1.0])

    def err(scale: torch.Tensor) -> float:
        return float((A.nonuniform_fake_quantize(values, fmt, scale) - values).pow(2).mean())

    if fmt.kind in ("log2", "logsqrt2"):
        if observer == "minmax":
            return torch.tensor([hi])
        if observer == "percentile":
            return torch.tensor([max(_quantile(values, percentile / 100), 1e-12)])
        tops = [hi] + [_quantile(values, q) for q in LOG_QUANTILES]
        cands = [torch.tensor([t]) for t in tops if t > 0]
        return min(cands, key=err)
    q = 1 << (fmt.bits - 1)
    if not fmt.symmetric:
        d2 = hi / (q - 1)
        cands = [torch.tensor([d2 / 2**m, d2]) for m in range(TWIN_SPLITS)]
        return min(cands, key=err)
    d1 = max(-lo, 1e-8) / q
    steps = 1 if observer == "minmax" else 80
    cands = [torch.tensor([d1, hi / (q - 1) * float(f)]) for f in shrink_factors(steps, 0.01)]
    return min(cands, key=err)


@dataclass
class InputStats:
    """What a quantizer may want to know of a layer's input rows ``x: [rows, K]`` (a linear's
    tokens, a conv's unfolded patches, an activation's positions by channel).

    ``H = 2/n X^T X`` (GPTQ's Hessian of the layer's squared output error; only
    when asked for: it costs a ``K x K`` product per batch),
    ``abs_mean`` per input channel (AWQ's activation salience), ``abs_max``
    (SmoothQuant's activation range), per-channel ``lo``/``hi`` and per-batch
    ranges, and a fixed sample of whole input rows (activation observers).
    """

    H: torch.Tensor | None
    abs_mean: torch.Tensor
    abs_max: torch.Tensor
    tokens: int = 0
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    batch_lo: list = field(default_factory=list)
    batch_hi: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    unsupported: str = ""  # why a layer's inputs could not be observed, if they could not
    groups: int = 1  # a grouped conv's patches: ``groups`` blocks of columns, ``H`` one per block

    SAMPLE_VALUES_PER_BATCH: ClassVar[int] = 65536  # rows sampled per batch: this many values' worth

    @classmethod
    def empty(cls, width: int, device=None, hessian: bool = False, groups: int = 1) -> InputStats:
        """Nothing seen yet. ``groups > 1``: the columns are that many blocks of ``width // groups``
        (a grouped conv's patches, block ``j`` read only by the output channels of group ``j``),
        and ``H`` is kept per block, ``[groups, K, K]``: the rest of the full ``X^T X`` is never
        used and would cost ``groups`` times more."""
        if groups < 1 or width % groups:
            raise ValueError(f"{width} columns do not split into {groups} groups")
        zeros = torch.zeros(width, device=device)
        k = width // groups
        H = (torch.zeros(width, width, device=device) if groups == 1 else torch.zeros(groups, k, k, device=device)) \
            if hessian else None  # fmt: skip
        return cls(H, zeros, zeros.clone(), 0,
                   torch.full((width,), float("inf"), device=device),
                   torch.full((width,), float("-inf"), device=device), groups=groups)  # fmt: skip

    def add(self, x: torch.Tensor) -> None:
        """Accumulate rows ``x: [..., K]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        if self.H is not None and self.groups == 1:
            self.H.mul_(self.tokens / total).addmm_(x.t(), x, alpha=2 / total)
        elif self.H is not None:
            xg = x.reshape(n, self.groups, -1).transpose(0, 1)  # [groups, n, K]
            self.H.mul_(self.tokens / total).baddbmm_(xg.transpose(1, 2), xg, alpha=2 / total)
        self.abs_mean.mul_(self.tokens / total).add_(x.abs().sum(0) / total)
        torch.maximum(self.abs_max, x.abs().amax(0), out=self.abs_max)
        blo, bhi = x.amin(0), x.amax(0)
        torch.minimum(self.lo, blo, out=self.lo)
        torch.maximum(self.hi, bhi, out=self.hi)
        self.batch_lo.append(blo.cpu())
        self.batch_hi.append(bhi.cpu())
        gen = torch.Generator().manual_seed(len(self.rows))  # fixed per batch: same data, same sample
        take = min(n, max(1, self.SAMPLE_VALUES_PER_BATCH // x.shape[1]))
        pick = torch.randperm(n, generator=gen)[:take]
        self.rows.append(x[pick.to(x.device)].cpu())
        self.tokens = total

    def channel_stats(self) -> ChannelStats:
        """What the activation observers read (on the CPU)."""
        if not self.tokens:
            raise ValueError("this layer saw no calibration data; static activation scales need some")
        return ChannelStats(self.lo.cpu(), self.hi.cpu(), torch.stack(self.batch_lo), torch.stack(self.batch_hi),
                            torch.cat(self.rows))  # fmt: skip

    def group(self, j: int) -> InputStats:
        """The statistics of block ``j`` of a grouped conv's columns (what group ``j`` reads)."""
        k = self.abs_mean.numel() // self.groups
        c = slice(j * k, (j + 1) * k)
        return InputStats(None if self.H is None else self.H[j], self.abs_mean[c], self.abs_max[c], self.tokens,
                          self.lo[c], self.hi[c], [b[c] for b in self.batch_lo], [b[c] for b in self.batch_hi],
                          [r[:, c] for r in self.rows], self.unsupported)  # fmt: skip

    def permuted(self, perm: torch.Tensor) -> InputStats:
        """The statistics of ``x[:, perm]``."""
        p = perm.to(self.abs_mean.device)
        H = self.H[p][:, p] if self.H is not None else None
        return InputStats(H, self.abs_mean[p], self.abs_max[p], self.tokens, self.lo[p], self.hi[p],
                          [b[perm] for b in self.batch_lo], [b[perm] for b in self.batch_hi],
                          [r[:, perm] for r in self.rows])  # fmt: skip
