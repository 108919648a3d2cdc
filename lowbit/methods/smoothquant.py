"""SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models").

Activation outliers sit in a few input channels. Per channel ``j`` of a
producer -> consumers pair, ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` moves
part of the range from the activations into the weights: the producer's output
is divided by ``s`` and the consumers' weight columns multiplied by it, which
leaves the model's function unchanged before any rounding. Folds happen only
where they are exact (the adapter's pairs: RMSNorm/LayerNorm -> q/k/v and
gate/up in pre-norm decoders, value -> output everywhere; in post-LayerNorm
encoders the LayerNorm also feeds the residual, so it is left alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.engine.sequential import collect_stats
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
        usable = []
        for producer, consumers in pairs:
            if not all(c in linears for c in consumers):
                continue
            width = _out_features(block.get_submodule(producer))
            if width is not None and all(linear_weight(block.get_submodule(c)).shape[1] == width for c in consumers):
                usable.append((producer, consumers))
        if not usable:
            return
        stats = collect_stats(block, inputs, {c[0]: block.get_submodule(c[0]) for _, c in usable})
        for producer, consumers in usable:
            mods = [block.get_submodule(c) for c in consumers]
            s = smoothing_scales(stats[consumers[0]].abs_max, [linear_weight(m).float() for m in mods], self.alpha)
            fold_scales(block.get_submodule(producer), mods, s.to(mods[0].weight.dtype))
