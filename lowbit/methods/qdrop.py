"""QDrop (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit
Post-Training Quantization", ICLR 2022).

BRECQ's block reconstruction with activations quantized while the rounding is
learned, and each activation element kept in float with probability 0.5 at every
step: at the block's input (mixing the float and the quantized model's inputs) and
inside it. The dropping flattens the loss landscape over the activation
perturbations the deployed model will see. Weight rounding and activation step
sizes are learned together; the loss is the plain squared error, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.methods.adaround import ReconConfig


@dataclass
class QDropConfig(ReconConfig):
    drop_prob: float = 0.5
    learn_act_scales: bool = True
