"""NoisyQuant (Liu et al., "NoisyQuant: Noisy Bias-Enhanced Post-Training Activation
Quantization for Vision Transformers", CVPR 2023).

A fixed noise vector ``N`` (one value per input channel, the same for every token),
drawn once from ``U(-K/2, K/2)``, is added to a linear's input before it is quantized,
and its effect is taken out through the layer's bias: ``y = W Q(x + N) + (b - W N)``.
The paper shows that for heavy-tailed activations (the GELU output first of all) the
noise flattens the quantization error's correlation with the input, lowering the
output error. ``K`` is searched per layer over ``amplitudes`` steps from 0 to one
quantization step (``K = 0``: no noise, so the search never ends worse than its
start) against the layer's float output on the calibration inputs.

lowbit starts from round-to-nearest weights (on the MSE grid) and the family's static
activation grids. The noise lives in the input quantizer (an exact shift, recorded in
the checkpoint) or, for a linear reading a site's grid (a ViT's second MLP linear, the
paper's main target), in that site's quantizer; the bias takes ``W_q N`` with the
quantized weights, so the removal is exact for the deployed layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.adaround import layer_inputs, layer_targets
from lowbit.methods.base import register, static_act_format
from lowbit.methods.rtn import RTN


@register
@dataclass
class NoisyQuant(RTN):
    """NoisyQuant: a fixed per-channel noisy bias before activation quantization, removed through
    the layer's bias; its amplitude searched per layer."""

    name = "noisyquant"
    needs_calibration = True
    needs_float_inputs = True

    mse: bool = True
    amplitudes: int = 20  # K = i / amplitudes of a quantization step, i = 0 .. amplitudes
    search_samples: int = 64  # calibration examples the search measures the output error on
    seed: int = 0

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "adds its noise before static activation grids")

    def quantize(self, unit) -> None:
        super().quantize(unit)
        if not unit.inputs or not unit.float_inputs:
            return
        sites = unit.adapter.input_sites(unit.model)
        names = [n for n, m in unit.qmodules().items() if m.kind == "linear"]
        grids = {n: _grid_of(unit, n, sites) for n in names}
        names = [n for n in names if grids[n] is not None]
        if not names:
            return
        targets = layer_targets(unit, names)
        gen = torch.Generator().manual_seed(self.seed)
        for name in names:
            qm, q = unit.get(name), grids[name]
            own = q is qm.input_q
            if not own:
                q.enabled = False  # the site's raw output: the search quantizes it itself
            try:
                x = _inputs(unit, name)
            finally:
                q.enabled = True
            if x is None or name not in targets:
                unit.log.append({"layer": name, "amplitude": 0.0, "why": "no calibration input reached it"})
                continue
            x = x[: self.search_samples].float()
            target = targets[name][1][: self.search_samples].float()
            if target.shape[:-1] != x.shape[:-1]:
                unit.log.append({"layer": name, "amplitude": 0.0, "why": "inputs and targets differ in shape"})
                continue
            wq = qm.quantized_weight_value().detach().float()
            bias = torch.zeros(wq.shape[0]) if qm.bias is None else qm.bias.detach().float()
            u = torch.rand(x.shape[-1], generator=gen) - 0.5  # U(-1/2, 1/2), fixed once per layer
            step = float(q.scale.reshape(-1)[0])
            best_k, best = 0.0, None
            for i in range(self.amplitudes + 1):
                noise = u * (step * i / self.amplitudes)
                out = F.linear(q.quantize(x + noise), wq, bias - wq @ noise)
                err = float((out - target).pow(2).mean())
                if best is None or err < best - 1e-12:
                    best_k, best = i / self.amplitudes, err
            unit.log.append({"layer": name, "amplitude": best_k, "error": best})
            if best_k > 0:
                noise = u * (step * best_k)
                q.add_transform(shift=-noise)  # x~ = x + N before the grid
                with torch.no_grad():
                    delta = -(wq @ noise)
                    if qm.bias is None:
                        qm.bias = nn.Parameter(delta.to(qm.weight.dtype), requires_grad=False)
                    else:
                        qm.bias += delta.to(qm.bias.dtype)
                q.note = f"NoisyQuant: noisy bias of {best_k:.2f} step, removed through the bias"
            unit.changed([name])


def _inputs(unit, name: str) -> torch.Tensor | None:
    """What ``name`` receives from the quantized unit, or ``None`` if no calibration input reaches it."""
    try:
        return layer_inputs(unit, name)
    except (ValueError, RuntimeError):  # nothing captured, or batches of different lengths
        return None


def _grid_of(unit, name: str, sites: dict[str, str]):
    """The static uniform per-tensor quantizer ``name``'s input goes through: its own, or the
    site's whose output is its whole input."""
    qm = unit.get(name)
    q = qm.input_q if qm.input_q.quantizes else None
    if q is None and name in sites:
        site = unit.get(sites[name])
        q = getattr(site, "output_q", None)
    return q if q is not None and q.per_tensor_grid else None
