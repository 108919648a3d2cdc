"""QDrop (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit
Post-Training Quantization", ICLR 2022).

BRECQ's unit reconstruction with activations quantized while the rounding is
learned, and each activation element kept in float with probability 0.5 at every
step: at the unit's input (mixing the float and the quantized model's inputs) and
inside it. The dropping flattens the loss landscape over the activation
perturbations the deployed model will see. Weight rounding and activation step
sizes are learned together; the loss is the plain squared error, as in the paper.
With weights only (no activation quantization) it is block reconstruction of the
rounding, with the float model's inputs mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.methods.adaround import AdaRound, calibrate_acts, init_grids, unit_quantizers
from lowbit.methods.base import register
from lowbit.methods.brecq import _as_samples, _runner, _stack


@register
@dataclass
class QDrop(AdaRound):
    """QDrop: unit-wise rounding and LSQ step sizes learned together, activations dropped to float
    with probability ``drop_prob``."""

    name = "qdrop"

    drop_prob: float = 0.5
    learn_act_scales: bool = True

    def quantize(self, unit) -> None:
        modules = init_grids(unit, self.name)
        calibrate_acts(unit)
        inputs, float_inputs = _as_samples(unit)
        target = _stack(unit.float_outputs(), inputs)
        acts = [q for q in unit_quantizers(unit) if q.static] if self.learn_act_scales else []
        layers = list(modules.values())
        if not layers and not acts:
            return
        stats = self.reconstruct(_runner(unit, inputs), layers, acts, inputs, target, learn_rounding=bool(layers),
                                 learn_acts=bool(acts), x_fp=float_inputs)  # fmt: skip
        unit.log.append({"unit": unit.name, **stats})
        unit.changed()
