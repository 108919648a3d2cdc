"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020), and the reconstruction loop BRECQ and QDrop reuse.

Each weight rounds down or up: ``W_q = s * (floor(W / s) + h(V) - z)`` with the
rectified sigmoid ``h``. ``V`` is learned to minimise the reconstruction error of
a layer's (AdaRound) or a block's (BRECQ, QDrop) output plus
``lambda * sum(1 - |2 h(V) - 1|^beta)``, whose ``beta`` anneals from 20 to 2 after
a warm-up without it, driving every ``h`` to 0 or 1; then the rounding is fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.nn.fakequant import ActQuantizer, QuantLayer


@dataclass
class ReconConfig:
    """``iters`` per unit on batches of ``batch_size``; Adam on ``V`` at ``lr`` (the papers run
    20,000 steps at 1e-3; lowbit's default of a few hundred steps needs a larger one); the
    regulariser weighs ``reg_weight`` (0.01, as in the papers, against the squared error summed
    over channels and averaged over samples and positions) and is off for the first ``warmup``
    of the iterations; ``beta`` anneals linearly from ``beta_start`` to ``beta_end``.
    ``act_lr``: Adam's rate for learned activation scales (LSQ), cosine-annealed; the papers'
    4e-5 suits 20,000 steps and barely moves a scale in a few hundred, so the default is 4e-3
    (ResNet-20 W4A4 BRECQ at 100 steps, 2,000 test images: 76.8% at 4e-5, 78.8% at 4e-3).
    ``drop_prob``: QDrop's probability of keeping an activation in float (inputs and inside
    the unit); ``fisher``: weight the output error by squared gradients (BRECQ)."""

    iters: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    act_lr: float = 4e-3
    drop_prob: float = 0.0
    fisher: bool = False
    seed: int = 0


def beta_at(step: int, cfg: ReconConfig) -> float | None:
    """The regulariser's exponent at ``step``, or ``None`` during the warm-up."""
    start = int(cfg.warmup * cfg.iters)
    if step < start:
        return None
    t = (step - start) / max(1, cfg.iters - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1 - t)


def reconstruct(
    run,
    layers: list[QuantLayer],
    acts: list[ActQuantizer],
    x_q: torch.Tensor,
    target: torch.Tensor,
    cfg: ReconConfig,
    *,
    learn_rounding: bool = True,
    learn_acts: bool = False,
    x_fp: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> dict:
    """Optimise ``layers``' rounding (and ``acts``' scales) so that ``run(x_q)`` matches ``target``.

    ``run``: the unit as a function of its input. ``x_fp``: the same inputs computed in
    float, mixed in per element with probability ``cfg.drop_prob`` (QDrop). ``weight``: a
    per-element weighting of the squared error (BRECQ's Fisher diagonal). Returns the
    first and last reconstruction losses.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    params, groups = [], []
    if learn_rounding:
        for layer in layers:
            layer.start_adaround()
            params.append(layer.alpha)
        groups.append({"params": params, "lr": cfg.lr})
    scales = [a.learn_scale() for a in acts if a.enabled] if learn_acts else []
    if scales:
        groups.append({"params": scales, "lr": cfg.act_lr})
    if not groups:
        return {}
    opt = torch.optim.Adam(groups)
    drops = [(a, a.drop_prob) for a in acts]
    for a in acts:
        a.drop_prob = cfg.drop_prob
        a.train()
    first = last = None
    try:
        for step in range(cfg.iters):
            idx = torch.randint(x_q.shape[0], (min(cfg.batch_size, x_q.shape[0]),), generator=g)
            x = x_q[idx]
            if x_fp is not None and cfg.drop_prob > 0:
                keep = torch.rand(x.shape, generator=g) < cfg.drop_prob
                x = torch.where(keep, x_fp[idx], x)
            err = (run(x) - target[idx]).pow(2)
            if weight is not None:
                err = err * weight[idx]
            rec = err.sum(1).mean()  # summed over channels, averaged over samples and positions
            loss = rec
            beta = beta_at(step, cfg) if learn_rounding else None
            if beta is not None:
                loss = loss + cfg.reg_weight * sum(layer.round_regularizer(beta) for layer in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if scales:  # cosine-annealed step-size learning rate
                opt.param_groups[-1]["lr"] = cfg.act_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
            opt.step()
            if scales:
                with torch.no_grad():
                    for s in scales:
                        s.clamp_(min=1e-8)
            first = float(rec.detach()) if first is None else first
            last = float(rec.detach())
    finally:
        for a, p in drops:
            a.drop_prob = p
            a.eval()
        if learn_rounding:
            for layer in layers:
                layer.harden()
        for a in acts:
            a.freeze_scale()
    return {"first_loss": first, "last_loss": last}
