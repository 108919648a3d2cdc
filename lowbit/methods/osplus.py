"""Outlier Suppression+ (Wei et al., 2023, "Outlier Suppression+: Accurate quantization
of large language models by equivalent and optimal shifting and scaling").

Outlier channels are asymmetric (shifted) and large (scaled). Per channel ``j`` of
the input of a group of consumer linears (the same input ``X``):

    shift  z_j = (max_j + min_j) / 2            X~ = (X - z) / s
    scale  s_j = max(1, max_j(|X_j - z_j|) / t)  W' = W diag(s),  b' = b + W z

which leaves the outputs unchanged before any rounding. The threshold ``t`` is
searched on a grid from the largest shifted magnitude down, minimising the
consumers' output error with both operands quantized as they will be
(``||Q_a(X~) Q_w(W')^T - X~ W^T||^2``; static per-tensor activations are
clipped at ``t``, the range the paper's search assumes).

The shift is folded into the producer's bias and the consumers' biases, the
scale into the producer's elementwise weight (LayerNorm) or output rows (a
linear), where that is exact. Shifts fold only into norms (a ReLU or a gate
between a linear and its consumer commutes with positive scales, not with
shifts); a producer that cannot take the shift (RMSNorm has no bias; linears)
takes the scale only, as in the paper's LLaMA setting. Where no producer
can absorb anything (post-LayerNorm encoders), the quantized linear applies the
shift and scale inside its activation quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.methods.transforms import (
    can_fold_shift,
    fold_scales,
    fold_shift,
    migration_error,
    migration_sites,
    sample_rows,
    transform_input,
)
from lowbit.nn.qmodule import QModule


def search_scales(x: torch.Tensor, amax: torch.Tensor, w: torch.Tensor, fmt_w, fmt_a, grid: int = 100) -> torch.Tensor:
    """Per-channel scales ``s = max(1, amax_j / t)`` for shifted inputs (sampled rows ``x: [rows, K]``,
    ``amax``: each channel's largest magnitude over all calibration data) of the consumers
    ``w: [N, K]``: ``t`` on a grid from ``max(amax)`` down, minimising the quantized output error."""
    amax = amax.clamp(min=1e-8)
    t_max = float(amax.max())
    best_s, best_err = torch.ones_like(amax), float("inf")
    for i in range(grid):
        t = t_max * (1 - i / grid)
        s = torch.clamp(amax / t, min=1.0)
        err = migration_error(x, w, s, fmt_w, fmt_a, clip=t)
        if err < best_err:
            best_s, best_err = s, err
    return best_s


@register
@dataclass
class OSPlus(MethodConfig):
    """Outlier Suppression+. ``shift``: channel-wise shifting (where a bias can absorb it);
    ``grid``: thresholds tried in the scale search."""

    name = "osplus"
    needs_calibration = True
    quantizes = False

    shift: bool = True
    grid: int = 100

    def refuses(self, family: str) -> str | None:
        if family == "cnn":
            return ("its channel shift and scale are folded between a LayerNorm or linear and the linears reading it; a "
                    "CNN has no such pairs")
        return None

    def transform(self, unit, quantizer) -> None:
        if not quantizer.act_bits:
            raise ValueError("Outlier Suppression+ prepares integer activations; give the quantizer act_bits")
        sites = migration_sites(unit)
        if not sites:
            return
        stats = unit.stats([c[0] for _, c in sites], acts=False)
        fmt_w, fmt_a = quantizer.weight_format, quantizer.act_format
        for producer, consumers in sites:
            st = stats.get(consumers[0])
            if st is None or not st.tokens:
                continue
            mods = [unit.get(c) for c in consumers]
            prod = unit.get(producer) if producer is not None else None
            # a shift folds only into a norm: between a linear producer and its consumer there may be
            # a ReLU or a gate (fc1 -> fc2, up -> down), which commute with positive scales, not shifts
            shift_here = self.shift and (prod is None or (can_fold_shift(prod) and not isinstance(prod, QModule)))
            z = (st.hi + st.lo) / 2 if shift_here else torch.zeros_like(st.lo)
            rows = sample_rows(st.channel_stats().rows).to(z.device)
            amax = torch.maximum((st.hi - z).abs(), (st.lo - z).abs())
            w = torch.cat([m.weight.float() for m in mods], 0)
            s = search_scales(rows - z, amax, w, fmt_w, fmt_a, self.grid)
            if prod is None:
                for m in mods:
                    transform_input(m, shift=z if shift_here else None, scale=s)
            else:
                if shift_here:
                    fold_shift(prod, mods, z.to(mods[0].weight.dtype))
                fold_scales(prod, mods, s.to(mods[0].weight.dtype))
        unit.changed()
