"""Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019, sec. 4.2, with
calibration data; also Banner et al. 2019): quantization shifts the expected output of
each channel; measure the shift on calibration data and subtract it from the bias.

Weights are first rounded to nearest on the shared MSE grid (as the reconstruction
methods start) and the unit's activation ranges calibrated. Layers are then
corrected in execution order, each on the inputs the already corrected quantized
model gives it with every activation quantized (the inputs the deployed model
gives it), for the error of its own weights only: ``b += E[W x] - E[W_q x]`` per
output channel. Matching instead the float model's output means (which also pulls
in the shift accumulated upstream) collapsed both CIFAR ResNets to chance at W2A4
and scored 8-14 points below the own-error form at W3A3 (2,000 test images).
Measuring before the unit's own activations were quantized (the unit's inputs
quantized, its inside not) scored 1.2 points lower on ResNet-20 W3A3 and 0.5 on
ResNet-32 W4A4 (10,000 test images); calibrating the ranges again after the
correction scored 0.3-1.7 lower than keeping them in three of those four cells
(0.2 higher at ResNet-20 W4A4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.methods.adaround import calibrate_acts, init_grids
from lowbit.methods.base import MethodConfig, register
from lowbit.nn.qmodule import QModule


def channel_mean(y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Mean over every dimension but the channel one."""
    return y.movedim(channel_dim, 0).reshape(y.shape[channel_dim], -1).mean(1)


@register
@dataclass
class BiasCorrection(MethodConfig):
    """Round-to-nearest on the MSE grid, then each layer's own mean output error added to its bias."""

    name = "bias_correction"
    needs_calibration = True

    def quantize(self, unit) -> None:
        modules = init_grids(unit, self.name)
        calibrate_acts(unit)
        for name, qm in modules.items():
            float_mean, quant_mean = weight_error_means(unit, name, qm)
            delta = float_mean - quant_mean
            with torch.no_grad():
                if qm.bias is None:
                    qm.bias = nn.Parameter(torch.zeros(qm.out_features, device=delta.device), requires_grad=False)
                qm.bias += delta.to(qm.bias.dtype)
            unit.log.append({"layer": name, "max_shift": float(delta.abs().max())})
            unit.changed([name])


def weight_error_means(unit, name: str, qm: QModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel output means of ``qm`` with float and with quantized weights, both on the
    inputs the quantized unit gives it (its activations quantized)."""
    sums, count = [0, 0], [0]
    dim = qm.channel_dim if qm.kind != "linear" else -1

    def hook(m, args, out):
        n = out.numel() // out.shape[dim]
        sums[1] = sums[1] + channel_mean(out, dim) * n
        sums[0] = sums[0] + channel_mean(m.op(m.input_q(args[0]), m.weight), dim) * n
        count[0] += n

    h = qm.register_forward_hook(hook)
    try:
        unit.outputs()
    finally:
        h.remove()
    return sums[0] / count[0], sums[1] / count[0]
