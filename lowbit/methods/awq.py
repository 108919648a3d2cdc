"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration").

A few input channels carry large activations; scaling those weight columns up
by ``s`` (and the activations down by ``s``, folded into whatever produces
them) lowers their relative rounding error. Per producer -> consumers pair:

    s = mean|x|^a / mean|w~|^(1-a),  a on a grid in [0, 1),  s /= sqrt(max(s) min(s))

where ``w~`` is the weight normalised by its group's absmax; ``a`` minimises the
consumers' output error on the calibration data, measured exactly through
``H = 2/n X^T X``: ``sum_rows (E H E^T)`` with ``E = W - Q(W diag s) diag(1/s)``.
Before any rounding, the fold leaves the model's outputs unchanged.

Then each weight's clipping range is searched per group, again against the
output error (``E_g H_gg E_g^T``, the group's share), not the weight error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import integer
from lowbit.formats.search import grid_factors, shrink_search
from lowbit.formats.spec import WeightFormat
from lowbit.methods.base import MethodConfig, register
from lowbit.methods.transforms import fold_scales, foldable_pairs
from lowbit.quantized_weight import QuantizedWeight, check_finite


def fake_quant(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    scale, zero = integer.minmax_params(w, fmt.bits, fmt.group_size, fmt.symmetric)
    return integer.fake_quantize(w, scale, zero, fmt.bits, fmt.group_size)


def output_error(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``sum_rows E H E^T``: the squared output error of weight error ``E`` on the calibration inputs."""
    return ((E @ H) * E).sum()


def search_scales(
    ws: list[torch.Tensor], x_mean: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scales for the consumers ``ws`` (each ``[out_i, in]``).

    Returns the scales, the chosen exponent ``a`` and the error ratio to ``a = 0``
    (no scaling).
    """
    W = torch.cat(ws, 0)
    groups = integer.to_groups(W.abs(), fmt.group_size)
    w_norm = (groups / groups.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(W.shape[0], -1)[:, : W.shape[1]]
    w_mean = w_norm.mean(0)
    best = (float("inf"), None, 0.0)
    baseline = None
    for i in range(grid):
        a = i / grid
        s = x_mean.pow(a).clamp(min=1e-4) / w_mean.pow(1 - a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        E = W - fake_quant(W * s, fmt) / s
        err = output_error(E, H).item()
        if baseline is None:
            baseline = err
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2], best[0] / baseline if baseline else 1.0


def clip_search(
    w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, grid: int = 20, max_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ranges ``p * [min, max]`` minimising each group's output error ``E_g H_gg E_g^T``."""
    rows, cols = w.shape
    g = integer.effective_group_size(cols, fmt.group_size)
    ng = integer.num_groups(cols, fmt.group_size)
    pad = ng * g - cols
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    Hblocks = torch.stack([Hp[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(ng)])  # [ng, g, g]
    groups = integer.to_groups(w, fmt.group_size)  # [rows, ng, g]

    def error(lo_p, hi_p):
        s, z = integer.params_from_range(lo_p, hi_p, fmt.bits, fmt.symmetric)
        q = (torch.round(groups / s[..., None]) + z[..., None]).clamp(0, integer.qmax(fmt.bits))
        E = (q - z[..., None]) * s[..., None] - groups  # [rows, ng, g]
        return (torch.einsum("rng,ngh->rnh", E, Hblocks) * E).sum(-1)

    lo, hi = shrink_search(groups.amin(-1), groups.amax(-1), error, grid_factors(grid, max_shrink))
    return integer.params_from_range(lo, hi, fmt.bits, fmt.symmetric)


@register
@dataclass
class AWQ(MethodConfig):
    """AWQ. ``grid``: exponents tried for the scales (the paper's 20).
    ``clip``: search clipping ranges against the output error after scaling.
    ``clip_grid`` / ``max_shrink``: that search's steps and its smallest range (AWQ's 0.5)."""

    name = "awq"
    needs_calibration = True
    uses_hessian = True

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.format != "int":
            raise ValueError(f"AWQ searches integer grids; format {self.format!r} is not supported")

    def transform(self, unit, quantizer) -> None:
        """Per foldable (producer, consumers) pair of the unit: search the scales, fold them."""
        fmt = quantizer.weight_format
        pairs = foldable_pairs(unit)
        if not pairs or not unit.inputs:
            return
        stats = unit.stats([c[0] for _, c in pairs], hessian=True, acts=False)
        for producer, consumers in pairs:
            st = stats.get(consumers[0])
            if st is None or not st.tokens or st.groups > 1:  # a grouped conv's channels are not one matrix's
                continue
            mods = [unit.get(c) for c in consumers]
            s, _, _ = search_scales([m.weight.float() for m in mods], st.abs_mean, st.H, fmt, self.grid)
            fold_scales(unit.get(producer), mods, s.to(mods[0].weight.dtype))
        unit.changed()

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        if not self.clip or stats is None or stats.tokens == 0:
            return QuantizedWeight.quantize(w, fmt)
        scale, zero = clip_search(w, stats.H.to(w.device), fmt, self.clip_grid, self.max_shrink)
        return QuantizedWeight.quantize(w, fmt, scale, zero)
