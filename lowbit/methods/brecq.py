"""BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction", ICLR 2021).

AdaRound's learned rounding, optimised for a whole unit (a residual block, a
transformer block, the stem, the head) at once, so the rounding of one layer can
compensate another's. The output error is weighted by the squared gradient of
the task loss with respect to the unit's output (the diagonal Fisher
approximation of the loss's Hessian, eq. 10); lowbit takes the gradient of the
float model's cross-entropy against its own predictions (no labels needed; a
language model's next-token logits count as predictions too) and normalises the
weights to mean 1 per unit, so the rounding regulariser keeps the weight it has
under a plain squared error. A model without logits (an encoder's hidden states)
gets the plain squared error, as logged. Then, with the rounding fixed, the
activation step sizes are learned unit by unit (LSQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.methods.adaround import AdaRound, acts_off, calibrate_acts, init_grids, unit_quantizers
from lowbit.methods.base import register


def task_loss(out) -> torch.Tensor | None:
    """Cross-entropy of the model's output against its own argmax, or ``None`` without logits."""
    logits = getattr(out, "logits", out)
    if not torch.is_tensor(logits) or logits.dim() < 2 or not logits.is_floating_point():
        return None
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, flat.argmax(-1), reduction="sum")


@register
@dataclass
class BRECQ(AdaRound):
    """BRECQ: unit-wise rounding with a Fisher-weighted output error, then LSQ step sizes."""

    name = "brecq"

    fisher: bool = True
    learn_act_scales: bool = True

    def prepare(self, model, adapter, batches) -> None:
        """Each unit's Fisher weights from one forward and backward pass of the float model."""
        self._fisher = unit_output_fisher(model, adapter, batches) if self.fisher else {}

    def quantize(self, unit) -> None:
        modules = init_grids(unit, self.name)
        inputs, float_inputs = _as_samples(unit)
        target = _stack([o for o in unit.float_outputs()], inputs)
        weight = getattr(self, "_fisher", {}).get(unit.name)
        if weight is not None and torch.is_tensor(target) and weight.shape != target.shape:
            weight = None
        if weight is not None and not torch.is_tensor(target):
            weight = list(weight.split([t.shape[0] for t in target]))
        run = _runner(unit, inputs)
        layers = list(modules.values())
        if layers:
            with acts_off(unit):
                stats = self.reconstruct(run, layers, [], inputs, target, weight=weight)
            unit.log.append({"unit": unit.name, "phase": "rounding", **stats})
            unit.changed()
        calibrate_acts(unit)
        acts = [q for q in unit_quantizers(unit) if q.static]
        if self.learn_act_scales and acts:
            stats = self.reconstruct(run, layers, acts, inputs, target, learn_rounding=False, weight=weight)
            unit.log.append({"unit": unit.name, "phase": "step sizes", **stats})
            unit.changed()


def unit_output_fisher(model, adapter, batches, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Each unit's squared gradient of ``task_loss`` at its output, normalised to mean 1 (``{}`` for a model
    without logits); over the first ``limit`` calibration examples, or all."""
    lasts = {spec.name: model.get_submodule(spec.modules[-1]) for spec in adapter.units(model)}
    return output_fisher(model, lasts, batches, limit)


def output_fisher(model, modules: dict, batches, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The squared gradient of ``task_loss`` at each of ``modules``' outputs (``{name: module}``), over the
    first ``limit`` calibration examples (or all), normalised to mean 1 per module; ``{}`` without logits.
    A module the loss does not reach gets zeros."""
    if not batches:
        return {}
    held: dict[str, torch.Tensor] = {}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = []
    for name, module in modules.items():

        def keep(_m, _a, out, name=name):
            o = out[0] if isinstance(out, (tuple, list)) else out
            if torch.is_tensor(o) and o.requires_grad:
                o.retain_grad()
                held[name] = o

        hooks.append(module.register_forward_hook(keep))
    seen = 0
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            with torch.enable_grad():
                out = _forward(model, batch)
                loss = task_loss(out)
                if loss is None:
                    return {}
                loss.backward()
            for name, o in held.items():
                grads[name].append(o.grad.detach().pow(2) if o.grad is not None else torch.zeros_like(o))
            held.clear()
            seen += batch.shape[0] if torch.is_tensor(batch) else 1
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    fisher = {}
    for name, gs in grads.items():
        if gs:
            w = torch.cat(gs) if limit is None else torch.cat(gs)[:limit]
            fisher[name] = w / w.mean().clamp(min=1e-30)
    return fisher


def _forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if torch.is_tensor(batch) and batch.dtype == torch.long:
        return model(input_ids=batch)
    return model(batch)


def _as_samples(unit):
    """The unit's quantized and float inputs as stacked tensors when they are lone tensors."""
    x_q = unit.stacked(unit.inputs)
    x_fp = unit.stacked(unit.float_inputs) if unit.float_inputs else None
    if x_q is not None:
        return x_q, x_fp
    return unit.inputs, unit.float_inputs


def _stack(outs: list[torch.Tensor], inputs):
    return torch.cat(outs) if torch.is_tensor(inputs) else outs


def _runner(unit, inputs):
    if torch.is_tensor(inputs):
        return lambda x: unit.run((x,))
    return lambda *args, **kwargs: unit.run(args, kwargs)
