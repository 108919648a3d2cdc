"""BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction", ICLR 2021).

AdaRound's learned rounding, optimised for a whole block (a residual block, the
stem, the head) at once, so the rounding of one conv can compensate another's. The
output error is weighted by the squared gradient of the task loss with respect to
the block output (the diagonal Fisher approximation of the loss's Hessian, eq. 10);
lowbit takes the gradient of the float model's cross-entropy against its own
predictions (no labels needed) and normalises the weights to mean 1 per block, so the
rounding regulariser keeps the weight it has under a plain squared error. Then,
with the rounding fixed, the activation step sizes are learned block by block (LSQ).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.methods.adaround import ReconConfig


@dataclass
class BRECQConfig(ReconConfig):
    fisher: bool = True
    learn_act_scales: bool = True
