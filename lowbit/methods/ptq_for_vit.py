"""PTQ for ViT (Liu et al., "Post-Training Quantization for Vision Transformer", NeurIPS 2021).

- **Similarity-aware quantization**: each linear's weight and input scaling
  factors are searched (alternately, ``rounds`` times, over
  ``alpha .. beta`` x their round-to-nearest start; the paper's 0.5, 1.2 and 100
  candidates) to maximise the cosine similarity (the paper's Pearson
  correlation, on centred outputs) between the float and the quantized output.
- **Ranking-aware loss** for the attention: a query or key projection is also
  scored by how much of the order of the attention map it breaks, a hinge
  ``max(0, theta - (a^_i - a^_j) sign(a_i - a_j))`` over pairs of keys in each row
  of the softmax attention map, weighted by ``gamma`` (the paper's 0.1); the other
  operand is the float one. (On the raw scores instead of the map, the hinge is in
  score units and outweighs the cosine term: W4A4 on the CIFAR ViT fell to 70.10 from
  71.00 without it.)
- **Bias correction**: once a layer's factors are chosen, the mean of its output
  error over the calibration images is taken out of its bias.
- **Nuclear-norm mixed precision** (``mixed_precision=True``): layers whose
  output has the larger nuclear norm (per element, on the calibration images)
  get ``bits + 1``, the smaller ``bits - 1``, paired from both ends of the
  ranking so that the weight count at each width balances and the average stays
  ``bits``. The paper solves a Pareto-frontier search over per-layer widths; this
  pairing is lowbit's choice, documented here. A layer held at another width (the
  first and last layers' 8 bits) keeps it, and the width its partner got stays:
  the average over the rest can then sit one pairing above ``bits``.

The Pearson correlation does not see a change of the output's scale: a searched factor
may shrink or stretch an output that the residual sum then carries. On the CIFAR ViT at
W4A4 (10,000 test images) it lands 0.31 below lowbit's default round-to-nearest (whose
activation ranges are MSE-searched). ``similarity="mse"`` scores the relative squared
error instead (with the same ranking loss): 71.70 against Pearson's 71.00 on a balanced
1,000 of those images (round-to-nearest 71.00).

Choices the paper leaves open, made here: the pairs for the ranking loss are 64
fixed random key pairs per row (all pairs would cost ``T^3``); ``theta`` is 0
(only inverted pairs count); the cosine is over each sample's whole output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.base import register
from lowbit.methods.brecq import _forward
from lowbit.methods.ptq4vit import PTQ4ViT


@register
@dataclass
class PTQForViT(PTQ4ViT):
    """PTQ for ViT: cosine-similarity scale search with a ranking-aware attention loss, bias correction,
    optional nuclear-norm mixed precision."""

    name = "ptq_for_vit"
    uses_gradients = False

    twin: bool = False
    alpha: float = 0.5
    beta: float = 1.2
    candidates: int = 100
    rounds: int = 2
    search_images: int = 32
    gamma: float = 0.1  # the ranking loss's weight
    theta: float = 0.0  # the ranking hinge's margin
    rank_pairs: int = 64
    bias_correction: bool = True
    mixed_precision: bool = False
    similarity: str = "pearson"  # the paper's; "mse": the relative squared error, which sees the output's scale

    def __post_init__(self):
        super().__post_init__()
        if self.similarity not in ("pearson", "mse"):
            raise ValueError(f"similarity {self.similarity!r}: use 'pearson' (the paper's) or 'mse'")

    def prepare(self, model, adapter, batches) -> None:
        self._bits: dict[str, int] = {}
        if self.mixed_precision and batches:
            self._bits = self.assign_bits(nuclear_norms(model, batches, self.search_images), model)

    def assign_bits(self, norms: dict[str, float], model: nn.Module) -> dict[str, int]:
        """``bits + 1`` to the largest nuclear norms, ``bits - 1`` to the smallest, paired so weights balance."""
        base = self.bits
        ranked = sorted(norms, key=norms.get)
        size = {n: model.get_submodule(n).weight.numel() for n in ranked}
        bits = dict.fromkeys(ranked, base)
        lo, hi, balance = 0, len(ranked) - 1, 0  # balance: weights raised minus weights lowered
        while lo < hi:
            if balance <= 0:
                bits[ranked[hi]] = base + 1
                balance += size[ranked[hi]]
                hi -= 1
            else:
                if base - 1 < 2:
                    break
                bits[ranked[lo]] = base - 1
                balance -= size[ranked[lo]]
                lo += 1
        if balance > 0:  # the last raise had no partner: undo it, so the average never passes ``bits``
            bits[ranked[hi + 1]] = base
        return bits

    def transform(self, unit, quantizer) -> None:
        super().transform(unit, quantizer)
        for name, qm in unit.qmodules().items():
            # a layer kept at another width (the first and last layers' 8 bits) keeps it
            if name in getattr(self, "_bits", {}) and qm.weight_q.fmt is not None and qm.weight_q.fmt.bits == self.bits:
                qm.weight_q.fmt = replace(qm.weight_q.fmt, bits=self._bits[name])

    def metric_for(self, unit, name: str, targets: dict, k: int):
        partner, heads = _attention_partner(unit, name)
        other = targets[partner][1][:k] if partner in targets else None
        fixed: dict = {}  # what depends on the float output only, computed on the first call

        def metric(out, target, _g2):
            if fixed.get("target") is not target:
                b = target.reshape(target.shape[0], -1)
                fixed.update(target=target, centred=F.normalize(b - b.mean(1, keepdim=True), dim=1))
                if other is not None and self.gamma:
                    s_f = _scores(target, other, heads)
                    g = torch.Generator().manual_seed(0)
                    pairs = torch.randint(0, s_f.shape[-1], (2, self.rank_pairs), generator=g)
                    fixed.update(pairs=pairs, order=torch.sign(s_f[..., pairs[0]] - s_f[..., pairs[1]]))
            a = out.reshape(out.shape[0], -1)
            if self.similarity == "mse":
                b = target.reshape(target.shape[0], -1)
                err = float((a - b).pow(2).sum() / b.pow(2).sum().clamp(min=1e-30))
            else:
                a = F.normalize(a - a.mean(1, keepdim=True), dim=1)  # Pearson: the cosine of centred outputs
                err = 1 - float((a * fixed["centred"]).sum(1).mean())
            if "pairs" in fixed:
                pairs, s_q = fixed["pairs"], _scores(out, other, heads)
                dq = s_q[..., pairs[0]] - s_q[..., pairs[1]]
                err += self.gamma * float(torch.relu(self.theta - dq * fixed["order"]).mean())
            return err

        return metric

    def after_search(self, qm, xq: torch.Tensor, target: torch.Tensor) -> None:
        if not self.bias_correction or qm.bias is None:
            return
        with torch.no_grad():
            w = qm.weight_q.fixed.dequantize().reshape(qm.weight.shape).to(xq.dtype)
            out = F.linear(xq, w, qm.bias)
            shift = (out - target).reshape(-1, out.shape[-1]).mean(0)
            qm.bias.sub_(shift.to(qm.bias.dtype))


def _attention_partner(unit, name: str) -> tuple[str | None, int]:
    """For a query (key) projection, the key (query) projection of the same attention and its head count."""
    for mine, theirs in (("q_proj", "k_proj"), ("k_proj", "q_proj")):
        if name.endswith("." + mine):
            parent = name[: -len(mine) - 1]
            attn = unit.get(parent) if parent else None
            heads = getattr(attn, "num_heads", None) or getattr(getattr(attn, "config", None), "num_attention_heads", 1)
            return parent + "." + theirs, int(heads)
    return None, 1


def _scores(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention map of two ``[N, T, E]`` projections: per-head ``softmax(a b^T / sqrt(d))``, ``[N, H, T, T]``."""
    n, t, e = a.shape
    a = a.reshape(n, t, heads, e // heads).transpose(1, 2)
    b = b.reshape(n, t, heads, e // heads).transpose(1, 2)
    return torch.softmax(a @ b.transpose(-2, -1) / math.sqrt(e // heads), -1)


@torch.no_grad()
def nuclear_norms(model: nn.Module, batches, limit: int) -> dict[str, float]:
    """Each linear's output nuclear norm per element, averaged over up to ``limit`` calibration samples."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    hooks = []

    def keep(_m, _a, out, name):
        o = out.detach().float()
        mats = o.reshape(-1, o.shape[-2], o.shape[-1]) if o.dim() >= 3 else o[None]
        norms = torch.linalg.matrix_norm(mats, ord="nuc") / mats[0].numel() ** 0.5
        sums[name] = sums.get(name, 0.0) + float(norms.sum())
        counts[name] = counts.get(name, 0) + len(norms)

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or getattr(m, "kind", None) == "linear":
            hooks.append(m.register_forward_hook(lambda m, a, o, name=name: keep(m, a, o, name)))
    seen = 0
    try:
        for batch in batches:
            if seen >= limit:
                break
            _forward(model, batch)
            seen += batch.shape[0] if torch.is_tensor(batch) else 1
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}
