"""RPTQ (Yuan et al., 2023, "RPTQ: Reorder-based Post-training Quantization for Large
Language Models").

Activation channels differ in range far more than per-tensor scales can serve.
RPTQ clusters the channels of each linear input by their (min, max) over the
calibration data with k-means, reorders them so each cluster is contiguous, and
quantizes every cluster with its own static scale and zero point (the paper: 32
clusters, asymmetric min-max). The weights' input columns take the same order,
so the product is unchanged; lowbit's integer kernel gathers the channels while
it quantizes them, where the paper fuses the reorder into the LayerNorm.

Use with static activations, e.g. ``rptq+rtn`` with ``act_granularity='tensor'``
(each layer's input then gets per-cluster parameters); the paper's setting is
asymmetric (``act_symmetric=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.methods.transforms import linear_groups


def kmeans(points: torch.Tensor, k: int, seed: int = 0, n_init: int = 10, iters: int = 100) -> torch.Tensor:
    """Labels ``[n]`` of a k-means clustering of ``points: [n, d]`` (k-means++ starts, best of ``n_init``)."""
    n = points.shape[0]
    k = min(k, n)
    x = points.double()
    gen = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = x[torch.randint(0, n, (1,), generator=gen)]
        for _ in range(1, k):
            d = torch.cdist(x, centers).amin(1).pow(2)
            if float(d.sum()) == 0:
                break
            centers = torch.cat([centers, x[torch.multinomial(d / d.sum(), 1, generator=gen)]])
        labels = None
        for _ in range(iters):
            new_labels = torch.cdist(x, centers).argmin(1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=centers.shape[0]).unsqueeze(1)
            centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
        labels = torch.cdist(x, centers).argmin(1)
        inertia = float((x - centers[labels]).pow(2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def reorder_by_cluster(labels: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``perm`` putting each cluster's channels together (clusters ordered by ``key``), and the cluster ``bounds``."""
    clusters = labels.unique()
    order = clusters[torch.argsort(torch.stack([key[labels == c].mean() for c in clusters]))]
    rank = torch.empty(int(labels.max()) + 1, dtype=torch.long)
    rank[order] = torch.arange(order.numel())
    perm = torch.argsort(rank[labels] * labels.numel() + torch.arange(labels.numel()))
    counts = torch.bincount(rank[labels], minlength=order.numel())
    return perm, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


@register
@dataclass
class RPTQ(MethodConfig):
    """RPTQ. ``clusters``: per linear input (the paper's 32), at most one per ``min_cluster`` channels."""

    name = "rptq"
    needs_calibration = True
    quantizes = False

    clusters: int = 32
    min_cluster: int = 8

    def refuses(self, family: str) -> str | None:
        if family == "cnn":
            return ("it reorders the feature channels of linear inputs into clusters; the integer conv kernels take "
                    "per-tensor activation scales")
        return None

    def transform(self, unit, quantizer) -> None:
        if not quantizer.static_activations:
            raise ValueError("RPTQ's per-cluster activation scales are static: use act_granularity='tensor'")
        sites = linear_groups(unit)
        stats = unit.stats([g[0] for g in sites], acts=False)
        for group in sites:
            st = stats.get(group[0])
            if st is None or not st.tokens:
                continue
            lo, hi = st.lo.cpu(), st.hi.cpu()
            k = max(1, min(self.clusters, lo.numel() // self.min_cluster))
            labels = kmeans(torch.stack([hi, lo], 1), k)
            perm, bounds = reorder_by_cluster(labels, hi - lo)
            for name in group:
                unit.get(name).input_q.set_groups(perm, bounds)
