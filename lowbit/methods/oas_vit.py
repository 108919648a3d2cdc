"""Outlier-aware slicing (Ma et al., "Outlier-aware Slicing for Post-Training Quantization in
Vision Transformer", ICML 2024): block reconstruction whose granularity, where each
reconstruction target sits, is chosen per model rather than fixed at the block.

The paper argues that the reconstruction granularity decides how much an activation's
outliers hurt (its abstract: a multi-stage Swin gains from a finer granularity, ViT and
DeiT do not) and gives an algorithm that picks the granularity for a model, alternating
with the reconstruction. lowbit had the abstract and a reproduction summary to read
(calibration on 1,024 images, AdaRound/BRECQ-style optimisation), not the method
section, so the selection rule here is lowbit's:

- **Slicings of a unit.** ``block``: one target, the unit's output (QDrop). ``residual``:
  one target at each residual sum inside the unit as well (a transformer block's attention
  half, then its MLP half). ``layer``: a target at every quantized linear's output.
  A slice is the run of quantized modules and activation sites up to its target; slices
  are reconstructed in order, each with its own float target (the float model's value
  there on the float inputs), the later ones on top of the earlier ones' fixed rounding.
- **Choice per unit.** Each candidate slicing is tried for ``trial_iters`` steps per slice
  from the same start; the one whose unit output is closest to the float output on the
  calibration inputs wins and is run for ``iters`` steps per slice. The trial state is
  then thrown away.
- **Outliers.** Each candidate target's outlier ratio (largest magnitude over the
  99th percentile of magnitudes, float model) is measured and logged with the choice, so
  a run shows where the outliers sit and which granularity they led to. The choice
  itself is by the trial error, which is what an outlier's harm to the unit amounts to.

Each slice's reconstruction is QDrop's (rounding and LSQ step sizes together, activations
dropped to float with probability 0.5). Coarser than a block (two blocks in one target)
is not offered: the engine's unit is the block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lowbit.methods.adaround import calibrate_acts, init_grids, recon_error
from lowbit.methods.base import register
from lowbit.methods.brecq import _as_samples, _runner, _stack
from lowbit.methods.qdrop import QDrop
from lowbit.nn.qmodule import QModule, QSite, set_quantization
from lowbit.nn.quantizers import ActQuantizer

GRANULARITIES = ("block", "residual", "layer")


class _Cut(Exception):
    """Carries a slice's target value out of a forward pass."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def outlier_ratio(x: torch.Tensor, q: float = 0.99) -> float:
    """Largest magnitude over the ``q`` quantile of magnitudes (on at most 2^20 sampled values)."""
    a = x.detach().abs().float().reshape(-1)
    if a.numel() > 1 << 20:
        a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20]]
    return float(a.max() / torch.quantile(a, q).clamp(min=1e-12))


@register
@dataclass
class OASViT(QDrop):
    """Outlier-aware slicing: QDrop reconstruction at the granularity (block, residual halves, layers)
    that a short trial finds best for each unit."""

    name = "oas_vit"

    granularities: tuple = GRANULARITIES
    trial_iters: int = 0  # per slice for the trials; 0: a quarter of ``iters``

    def __post_init__(self):
        super().__post_init__()
        self.granularities = tuple(self.granularities)
        bad = [g for g in self.granularities if g not in GRANULARITIES]
        if bad or not self.granularities:
            raise ValueError(f"granularities {list(self.granularities)}: choose from {list(GRANULARITIES)}")
        if self.trial_iters < 0:
            raise ValueError(f"trial_iters ({self.trial_iters}) must be >= 0")

    def quantize(self, unit) -> None:
        modules = init_grids(unit, self.name)
        calibrate_acts(unit)
        if not modules:
            return
        inputs, float_inputs = _as_samples(unit)
        target = _stack(unit.float_outputs(), inputs)
        order = unit.order()
        members = {**unit.qmodules(), **unit.sites()}
        candidates = {g: _boundaries(g, order, members) for g in self.granularities}
        candidates = {g: b for g, b in candidates.items() if g == "block" or b}  # a slicing with no cut is "block"
        if "block" not in candidates and not any(candidates.values()):
            candidates["block"] = []
        cuts = sorted({c for b in candidates.values() for c in b}, key=order.index)
        floats = _float_values(unit, cuts, inputs)
        ratios = {c: round(outlier_ratio(_flat(floats[c])), 2) for c in cuts}
        choice = next(iter(candidates))
        errors: dict[str, float] = {}
        if len(candidates) > 1:
            snap = [copy.deepcopy(m) for m in unit.modules()]
            trial = self.trial_iters or max(1, self.iters // 4)
            for g, bounds in candidates.items():
                self._slices(unit, order, members, bounds, floats, target, inputs, float_inputs, trial)
                errors[g] = _unit_error(unit, inputs, target)
                for m, s in zip(unit.modules(), snap):
                    _restore(m, s)
                members = {**unit.qmodules(), **unit.sites()}
                unit.changed()
            choice = min(errors, key=errors.get)
        stats = self._slices(unit, order, members, candidates[choice], floats, target, inputs, float_inputs,
                             self.iters)  # fmt: skip
        unit.log.append({"unit": unit.name, "granularity": choice, "trial_errors": errors,
                         "outlier_ratio": ratios, **stats})  # fmt: skip
        unit.changed()

    def _slices(self, unit, order, members, bounds, floats, target, inputs, float_inputs, iters) -> dict:
        """Reconstruct the unit slice by slice (targets at ``bounds``, then the unit's output)."""
        saved, self.iters = self.iters, iters
        stats: dict = {}
        try:
            start = 0
            for cut in [*bounds, None]:
                stop = len(order) if cut is None else order.index(cut) + 1
                names = [n for n in order[start:stop] if n in members]
                start = stop
                layers = [members[n] for n in names if isinstance(members[n], QModule)]
                acts = [q for n in names for q in _static_quantizers(members[n])] if self.learn_act_scales else []
                if not layers and not acts:
                    continue
                run = _runner(unit, inputs) if cut is None else _cut_runner(unit, members[cut], inputs)
                tgt = target if cut is None else floats[cut]
                stats = self.reconstruct(run, layers, acts, inputs, tgt, learn_rounding=bool(layers),
                                         learn_acts=bool(acts), x_fp=float_inputs)  # fmt: skip
                unit.changed()
        finally:
            self.iters = saved
        return stats


def _boundaries(granularity: str, order: list[str], members: dict) -> list[str]:
    """The targets inside a unit (its output excluded) that a slicing puts there."""
    if granularity == "block":
        return []
    if granularity == "residual":
        picked = [n for n in order if isinstance(members.get(n), QSite) and members[n].role == "residual"]
    else:
        picked = [n for n in order if isinstance(members.get(n), QModule)]
    last = max((order.index(n) for n in members if n in order), default=-1)
    return [n for n in picked if order.index(n) < last]  # the unit's last member ends the last slice anyway


def _flat(value) -> torch.Tensor:
    return value.reshape(-1) if torch.is_tensor(value) else torch.cat([v.reshape(-1) for v in value])


def _static_quantizers(module) -> list[ActQuantizer]:
    return [q for q in module.modules() if isinstance(q, ActQuantizer) and q.static]


def _cut_runner(unit, module, inputs):
    """The unit run up to ``module``'s output, which it returns (the rest of the unit is not computed)."""

    def hook(_m, _a, out):
        raise _Cut(out)

    def run(*args, **kwargs):
        h = module.register_forward_hook(hook)
        try:
            unit.run(args, kwargs)
        except _Cut as cut:
            return cut.value
        finally:
            h.remove()
        raise RuntimeError(f"slice target {type(module).__name__} was not reached in unit {unit.name}")

    return run


def _float_values(unit, cuts: list[str], inputs) -> dict:
    """The float model's value at each cut on the float inputs: stacked when the inputs are."""
    if not cuts:
        return {}
    seen: dict[str, list[torch.Tensor]] = {c: [] for c in cuts}
    members = {**unit.qmodules(), **unit.sites()}
    hooks = [members[c].register_forward_hook(lambda _m, _a, out, c=c: seen[c].append(out.detach()))
             for c in cuts]  # fmt: skip
    for m in unit.modules():
        set_quantization(m, False)
    try:
        with torch.no_grad():
            for args, kwargs in unit.float_inputs:
                unit.run(args, kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m in unit.modules():
            set_quantization(m, True)
    return {c: torch.cat(v) if torch.is_tensor(inputs) else v for c, v in seen.items()}


def _unit_error(unit, inputs, target) -> float:
    """Mean squared error of the unit's output on the quantized model's inputs, against the float target."""
    with torch.no_grad():
        if torch.is_tensor(inputs):
            outs = torch.cat([unit.run((x,)) for x in inputs.split(64)])
            return float(recon_error(outs, target))
        errs = [float(recon_error(unit.run(a, kw), t)) for (a, kw), t in zip(inputs, target)]
        return sum(errs) / max(1, len(errs))


def _restore(module, snapshot) -> None:
    """Put ``module`` back to ``snapshot``'s state in place (the unit and the model keep their references)."""
    fresh = copy.deepcopy(snapshot)
    module.__dict__.clear()
    module.__dict__.update(fresh.__dict__)
