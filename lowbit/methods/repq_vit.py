"""RepQ-ViT (Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of
Vision Transformers", ICCV 2023).

Quantization and inference are decoupled: calibrate with the quantizer a
distribution needs, then reparameterize it into the one hardware runs.

- **Post-LayerNorm activations** vary wildly between channels, so each channel
  ``c`` of a LayerNorm's output gets its own asymmetric grid ``(s_c, z_c)``. They
  become one per-tensor grid ``(s~, z~)``, ``s~ = mean(s)``, ``z~ = round(mean(z))``,
  by rewriting the LayerNorm and its consumers: with ``r = s / s~``, the LayerNorm
  computes ``x' = (x + s (z - z~)) / r`` (``gamma' = gamma / r``,
  ``beta' = (beta + s (z - z~)) / r``) and each consumer reads it with
  ``W' = W diag(r)``, ``b' = b - W (s (z - z~))``. Per-tensor quantization of
  ``x'`` gives the same codes as per-channel quantization of ``x``: the
  reparameterization is exact. The paper leaves ``z~ = mean(z)`` unrounded
  (so is its code); lowbit rounds it, which is what keeps the codes identical
  (``round(v + k) = round(v) + k`` only for an integer ``k``) and an integer zero
  point for the kernels.
- **Post-softmax activations** (a power-law distribution) get a log-sqrt(2)
  quantizer, ``x^ = s 2^(-q/2)``, whose top ``s`` is the best of the maximum and
  the 0.999 / 0.9999 / 0.99999 quantiles by squared error (the paper's search); at
  inference ``2^(-q/2)`` is a shift by ``ceil(q/2)`` and one sqrt(2) factor for odd
  codes (``formats.activation``), so the attention-times-value product stays in
  shifts.

Weights are per-channel asymmetric on the MSE-searched grid (the paper searches
percentiles per channel). Each channel's grid here comes from the quantizer's
activation observer run on that channel alone (MSE by default; the paper: a
percentile search). Everything else (the other linears' inputs, ``q @ k^T``, the
MLP activation and the residual sums) keeps the family's static per-tensor
quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.formats.activation import ActFormat
from lowbit.methods.base import register, static_act_format
from lowbit.methods.rtn import RTN
from lowbit.methods.transforms import can_fold_shift, fold_scales, fold_shift, foldable_pairs, transform_input
from lowbit.observers import static_params


@register
@dataclass
class RepQViT(RTN):
    """RepQ-ViT: per-channel post-LayerNorm grids reparameterized into per-tensor ones, a
    log-sqrt(2) softmax quantizer; weights round to nearest on the MSE grid."""

    name = "repq_vit"
    needs_calibration = True

    mse: bool = True
    log_softmax: bool = True  # the log-sqrt(2) quantizer on every softmax output
    reparameterize: bool = True  # per-channel post-LayerNorm grids folded into per-tensor ones

    def refuses(self, family: str) -> str | None:
        if family != "vit":
            return ("its reparameterization needs the LayerNorm -> linear consumers and attention softmax "
                    "sites, which only the vision-transformer adapters name")  # fmt: skip
        return None

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "reparameterizes static activation grids")
        if self.log_softmax:
            for site in unit.sites().values():
                if site.role == "softmax" and site.output_q is not None and site.output_q.fmt is not None:
                    q = site.output_q
                    q.fmt = ActFormat(q.fmt.bits, "tensor", dynamic=False, symmetric=False, kind="logsqrt2")
            unit.changed()
        if not self.reparameterize or not unit.inputs:
            return
        here = set(unit.qmodules())
        pairs = [(n, cs) for n, cs in unit.adapter.norm_consumers(unit.model)
                 if set(cs) <= here and _per_tensor(unit, cs)]  # fmt: skip
        if not pairs:
            return
        foldable = {p for p, cs in foldable_pairs(unit)}
        stats = unit.stats([cs[0] for _, cs in pairs], hessian=False, acts=False)
        for norm, consumers in pairs:
            st = stats.get(consumers[0])
            if st is None or not st.tokens:
                continue
            q0 = unit.get(consumers[0]).input_q
            k = st.lo.numel()
            channel_fmt = replace(q0.fmt, symmetric=False)
            s, z = static_params(st.channel_stats(), channel_fmt, q0.observer, None, torch.arange(k + 1),
                                 q0.percentile)  # fmt: skip
            s_t, z_t = s.mean(), torch.round(z.mean())
            r, shift = s / s_t, -s * (z - z_t)
            mods = [unit.get(c) for c in consumers]
            if norm in foldable and can_fold_shift(unit.get(norm)):  # exact, and free at run time
                fold_shift(unit.get(norm), mods, shift)
                fold_scales(unit.get(norm), mods, r)
                how = f"per-channel grids of {norm}'s output folded into it"
            else:  # the norm also feeds the residual: the consumers' quantizer applies the change
                for m in mods:
                    transform_input(m, shift=shift, scale=r)
                how = f"per-channel grids of {norm}'s output, as a channel transform before one grid"
            for m in mods:
                q = m.input_q
                q.fmt = channel_fmt
                q.set_static(s_t.reshape(1), z_t.reshape(1))
                q.locked = True
                q.note = f"RepQ-ViT: {how}"
            unit.log.append({"norm": norm, "folded": norm in foldable, "channel_scale_ratio": float(s.max() / s.min())})
        unit.changed()


def _per_tensor(unit, consumers: list[str]) -> bool:
    """Whether each consumer quantizes its own input on one static uniform per-tensor grid."""
    return all(unit.get(c).input_q.per_tensor_grid for c in consumers)
