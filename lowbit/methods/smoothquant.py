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
take ``s`` and the quantized linear divides its input by ``s`` itself, inside its
activation quantization, instead of silently changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.methods.transforms import fold_scales, migration_error, migration_sites, sample_rows, transform_input


def smoothing_scales(x_max: torch.Tensor, ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel; ``ws``: the consumers' ``[out, in]`` weights."""
    w_max = torch.cat(ws, 0).abs().amax(0)
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@register
@dataclass
class SmoothQuant(MethodConfig):
    """SmoothQuant. ``search`` (default): pick the migration strength per input, from 0 to 1 in
    steps of 0.05 (or no smoothing), by the consumers' output error with both operands quantized.
    ``search=False``: the paper's single ``alpha`` (0.5; higher moves more into the weights)."""

    name = "smoothquant"
    needs_calibration = True
    quantizes = False

    alpha: float = 0.5
    search: bool = True
    pot: bool = False  # round every factor to the nearest power of two (P2-ViT's PoT-aware smoothing)
    mse_range: bool = False  # score candidates on MSE-shrunk activation ranges (what an MSE observer sets)

    def refuses(self, family: str) -> str | None:
        if family == "cnn":
            return ("its per-channel migration is between a linear's input features and weight columns; a CNN's convs "
                    "read spatial patches (no linear pairs to fold into)")
        return None

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha {self.alpha} must lie in [0, 1]")

    def transform(self, unit, quantizer) -> None:
        if not quantizer.act_bits:
            raise ValueError("SmoothQuant prepares integer activations; give the quantizer act_bits")
        sites = migration_sites(unit)
        if not sites:
            return
        stats = unit.stats([cs[0] for _, cs in sites], acts=False)
        for producer, consumers in sites:
            st = stats.get(consumers[0])
            if st is None or not st.tokens:
                continue
            mods = [unit.get(c) for c in consumers]
            s = self._scales(st, [m.weight.float() for m in mods], quantizer)
            if s is None:
                continue
            if producer is not None:
                fold_scales(unit.get(producer), mods, s.to(mods[0].weight.dtype))
            else:
                for m in mods:
                    transform_input(m, scale=s)
        unit.changed()

    def _factors(self, x_max, ws, alpha) -> torch.Tensor:
        s = smoothing_scales(x_max, ws, alpha)
        return torch.exp2(torch.round(torch.log2(s))) if self.pot else s

    def _scales(self, st, ws, quantizer) -> torch.Tensor | None:
        if not self.search:
            return self._factors(st.abs_max, ws, self.alpha)
        x = sample_rows(st.channel_stats().rows).to(st.abs_max.device)
        w = torch.cat(ws, 0)
        fmt_w, fmt_a = quantizer.weight_format, quantizer.act_format
        # static ranges as the min-max observer will see them: over all calibration data
        mse = self.mse_range
        best, best_err = None, migration_error(x, w, torch.ones_like(st.abs_max), fmt_w, fmt_a,
                                               float(st.abs_max.max()), mse)  # fmt: skip
        for i in range(21):
            s = self._factors(st.abs_max, ws, i / 20)
            err = migration_error(x, w, s, fmt_w, fmt_a, float((st.abs_max / s).max()), mse)
            if err < best_err:
                best, best_err = s, err
        return best
