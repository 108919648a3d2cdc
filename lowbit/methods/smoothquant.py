"""SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models").

Activation outliers sit in a few input channels. Per channel ``j`` of a
producer -> consumers pair, ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` moves
part of the range from the activations into the weights: the producer's output
is divided by ``s`` and the consumers' weight columns multiplied by it, which
leaves the model's function unchanged before any rounding. Folds happen only
where they are exact (the adapter's pairs: RMSNorm/LayerNorm -> q/k/v and
gate/up in pre-norm decoders, value -> output everywhere). Where no producer
can absorb ``1/s`` exactly (in post-LayerNorm encoders the LayerNorm also feeds
the residual; a GELU sits before BERT's output projection), the weights still
take ``s`` and the quantized linear divides its input by ``s`` itself, an
elementwise multiply, instead of silently changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.engine.sequential import collect_stats, execution_groups
from lowbit.methods.awq import _out_features, fold_scales
from lowbit.methods.base import MethodConfig, register
from lowbit.nn.qlinear import linear_weight


def smoothing_scales(x_max: torch.Tensor, ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel; ``ws``: the consumers' ``[out, in]`` weights."""
    w_max = torch.cat(ws, 0).abs().amax(0)
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@register
@dataclass
class SmoothQuant(MethodConfig):
    """SmoothQuant. ``alpha``: migration strength (0.5 in the paper; higher moves more into the weights)."""

    name = "smoothquant"
    needs_calibration = True
    quantizes = False

    alpha: float = 0.5

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha {self.alpha} must lie in [0, 1]")

    def transform_block(self, block, inputs, pairs, linears, quantizer) -> None:
        if not quantizer.act_bits:
            raise ValueError("SmoothQuant prepares int8 activations; give the quantizer act_bits=8")
        folded, explicit = [], []
        for producer, consumers in pairs:
            if not all(c in linears for c in consumers):
                continue
            width = _out_features(block.get_submodule(producer))
            if width is not None and all(linear_weight(block.get_submodule(c)).shape[1] == width for c in consumers):
                folded.append((producer, consumers))
        covered = {c for _, cs in folded for c in cs}
        for group in execution_groups(block, inputs, list(linears)):
            if not covered.intersection(group):
                explicit.append(group)
        if not folded and not explicit:
            return
        firsts = [cs[0] for _, cs in folded] + [g[0] for g in explicit]
        stats = collect_stats(block, inputs, {n: block.get_submodule(n) for n in firsts})
        for producer, consumers in folded:
            mods = [block.get_submodule(c) for c in consumers]
            s = smoothing_scales(stats[consumers[0]].abs_max, [linear_weight(m).float() for m in mods], self.alpha)
            fold_scales(block.get_submodule(producer), mods, s.to(mods[0].weight.dtype))
        for group in explicit:
            mods = [block.get_submodule(c) for c in group]
            s = smoothing_scales(stats[group[0]].abs_max, [linear_weight(m).float() for m in mods], self.alpha)
            for m in mods:
                scale_input_explicitly(m, s)


def scale_input_explicitly(linear: nn.Module, s: torch.Tensor) -> None:
    """``W <- W diag(s)`` and ``x <- x / s`` on the way in: the same function, a smoother activation.

    The division is a forward pre-hook until the quantizer replaces the layer;
    the quantized layer then applies it (``W8A8Linear.input_scale``).
    """
    inv = (1 / s).to(linear.weight.dtype)
    with torch.no_grad():
        if type(linear).__name__ == "Conv1D":
            linear.weight.mul_(s.unsqueeze(1))
        else:
            linear.weight.mul_(s.unsqueeze(0))
    previous = getattr(linear, "lowbit_input_scale", None)
    linear.lowbit_input_scale = inv if previous is None else previous * inv
    if previous is None:
        linear.register_forward_pre_hook(lambda m, args: (args[0] * m.lowbit_input_scale, *args[1:]))
