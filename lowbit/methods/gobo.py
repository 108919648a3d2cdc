"""GOBO (Zadeh et al., "GOBO: Quantizing Attention-Based NLP Models for Low Latency and Energy
Efficient Inference", MICRO 2020).

Calibration-free, per layer. The weights of a layer follow a Gaussian closely, except for a
few (~0.1%) far in its tails that matter to accuracy. GOBO fits the Gaussian ``N(mu, sigma)``
to the layer's weights and calls a weight an *outlier* when its log-probability under that
Gaussian falls below a threshold (the paper's -4); outliers are kept in fp16 beside the codes
(``formats.sparse``). The rest -- the "Gaussian" group -- share ``2^bits`` centroids (3 bits in
the paper) found by GOBO's centroid selection: start from the Gaussian (here: the means of its
``2^bits`` equal-probability bins), then alternate assigning each weight to its nearest centroid
and moving each centroid to its members' mean, stopping as soon as the L1 norm of the
quantization error ``sum |w - c(w)|`` stops falling (the paper's convergence test, which stops
far earlier than k-means' run to a fixed point) and keeping the centroids with the lowest L1.

Storage: ``kind="lut"`` with ``group_size=None``, one fp16 codebook ``[1, 2^bits]`` for the whole
layer (``group_size -1`` or a positive size fits one codebook per row or group instead); an
outlier's code is its nearest centroid and the outlier store holds the difference, so the sum
is the weight. The stated bits count the codes, the codebook and the outliers' CSR arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats import codebook
from lowbit.formats.integer import num_groups, to_groups
from lowbit.formats.sparse import Outliers
from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight, check_finite


def gaussian_log_prob(w: torch.Tensor) -> torch.Tensor:
    """``log N(w; mu, sigma)`` of every weight, ``mu`` and ``sigma`` fitted to all of ``w``."""
    w = w.double()
    mu, sigma = w.mean(), w.std(unbiased=False).clamp(min=1e-30)
    return (-0.5 * math.log(2 * math.pi) - torch.log(sigma) - (w - mu) ** 2 / (2 * sigma**2)).float()


def gaussian_outliers(w: torch.Tensor, threshold: float = -4.0) -> torch.Tensor:
    """GOBO's outliers: the weights whose log-probability under the layer's Gaussian is below ``threshold``."""
    return gaussian_log_prob(w) < threshold


def _normal_bin_means(mu: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, k]``: the means of ``N(mu, sigma)`` (``mu``, ``sigma``: ``[rows, 1]``) over its ``k`` bins of
    equal probability: ``mu + sigma k (phi(a_i) - phi(b_i))``, ``[a_i, b_i]`` the standard bin edges."""
    p = torch.arange(k + 1, dtype=torch.float64) / k
    edges = torch.special.ndtri(p)  # -inf ... +inf
    pdf = torch.where(torch.isfinite(edges), torch.exp(-0.5 * edges**2) / math.sqrt(2 * math.pi), 0.0)
    return (mu.double() + sigma.double() * k * (pdf[:-1] - pdf[1:])).float()


def select_centroids(x: torch.Tensor, valid: torch.Tensor, k: int, max_iters: int = 100) -> torch.Tensor:
    """GOBO's centroid selection for each row of ``x: [rows, n]`` over its entries where ``valid``:
    ``[rows, k]`` ascending centroids, from the row's Gaussian, iterated while the L1 error falls."""
    m = valid.float()
    count = m.sum(-1, keepdim=True).clamp(min=1)
    mu = (x * m).sum(-1, keepdim=True) / count
    sigma = (((x - mu) ** 2 * m).sum(-1, keepdim=True) / count).sqrt()
    c = _normal_bin_means(mu, sigma, k)
    best, best_l1 = c, torch.full_like(mu, float("inf"))
    done = torch.zeros_like(mu, dtype=torch.bool)  # a row stops once its L1 norm stops falling
    for _ in range(max_iters):
        code = codebook.assign(x, c)
        l1 = ((x - c.gather(-1, code)).abs() * m).sum(-1, keepdim=True)
        falling = (l1 < best_l1) & ~done
        done |= ~falling
        if bool(done.all()):
            break
        best, best_l1 = torch.where(falling, c, best), torch.where(falling, l1, best_l1)
        num = torch.zeros_like(c).scatter_add_(-1, code, x * m)
        den = torch.zeros_like(c).scatter_add_(-1, code, m)
        c = torch.where(den > 0, num / den.clamp(min=1), c).sort(-1).values  # an empty cluster keeps its centroid
    return best


@register
@dataclass
class GOBO(MethodConfig):
    """GOBO: per-layer Gaussian outliers kept in fp16, the rest on ``2^bits`` centroids per layer.
    ``outlier_threshold``: the log-probability below which a weight is an outlier (the paper's -4);
    ``max_iters``: a bound on the centroid selection's iterations."""

    name = "gobo"

    bits: int = 3
    format: str = "lut"
    group_size: int | None = None
    outlier_threshold: float = -4.0
    max_iters: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.format != "lut":
            raise ValueError(f"gobo stores centroids (format lut), not {self.format!r}")

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        w = w.float()
        rows, n = w.shape
        mask = gaussian_outliers(w, self.outlier_threshold)  # per layer, as the paper fits its Gaussian
        if fmt.group_size is None:
            x, valid = w.reshape(1, -1), ~mask.reshape(1, -1)
        else:
            x = to_groups(w, fmt.group_size).reshape(rows * num_groups(n, fmt.group_size), -1)
            valid = to_groups((~mask).float(), fmt.group_size).reshape(x.shape) > 0  # the padding is not valid
        book = select_centroids(x, valid, codebook.levels(fmt.bits), self.max_iters)
        book = book.to(torch.float16).sort(-1).values.reshape(1 if fmt.group_size is None else rows, -1)
        codes = codebook.quantize(w, book, fmt.bits, fmt.group_size)
        outliers = None
        if bool(mask.any()):
            dense = codebook.dequantize(codes, book, fmt.bits, fmt.group_size)
            outliers = Outliers.from_dense(w - dense, mask)
        return QuantizedWeight.from_codes(codes, book, None, fmt, outliers=outliers)
