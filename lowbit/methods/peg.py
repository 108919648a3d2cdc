"""PEG-PTQ (Bondarenko, Nagel and Blankevoort, 2021, "Understanding and Overcoming the
Challenges of Efficient Transformer Quantization").

Transformer activations carry structured outliers in a few embedding dimensions.
Per-embedding-group quantization splits the channels of an activation into ``K``
groups with one static scale each (the paper: K = 6, asymmetric min-max), after a
range-based permutation: channels sorted by their range (max - min) over the
calibration data, so the few wide ones share a group and the narrow majority
keep fine steps. The weights' input columns take the same order.

lowbit applies it to the input of every quantized linear (the paper's main
recipe targets the FFN input and output and the residual sum; lowbit does not
quantize residual sums). Use with static activations, e.g. ``peg+rtn`` with
``act_granularity='tensor'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import MethodConfig, register
from lowbit.methods.transforms import linear_groups


def embedding_groups(
    lo: torch.Tensor, hi: torch.Tensor, groups: int, permute: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``perm`` (channels by ascending range, if ``permute``) and ``bounds`` of ``groups`` near-equal groups."""
    k = lo.numel()
    perm = torch.argsort(hi - lo, stable=True) if permute else torch.arange(k)
    g = max(1, min(groups, k))
    bounds = torch.tensor([round(i * k / g) for i in range(g + 1)], dtype=torch.long)
    return perm, bounds


@register
@dataclass
class PEG(MethodConfig):
    """PEG-PTQ. ``groups``: embedding groups per activation (the paper's 6); ``permute``: the
    range-based permutation."""

    name = "peg"
    needs_calibration = True
    quantizes = False

    groups: int = 6
    permute: bool = True

    def refuses(self, family: str) -> str | None:
        if family == "cnn":
            return ("its per-embedding-group scales are for transformer embedding dimensions; the integer conv kernels "
                    "take per-tensor activation scales")
        return None

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"groups {self.groups} must be at least 1")
        super().__post_init__()

    def transform(self, unit, quantizer) -> None:
        if not quantizer.static_activations:
            raise ValueError("PEG's per-group activation scales are static: use act_granularity='tensor'")
        sites = linear_groups(unit)
        stats = unit.stats([g[0] for g in sites], acts=False)
        for group in sites:
            st = stats.get(group[0])
            if st is None or not st.tokens:
                continue
            perm, bounds = embedding_groups(st.lo.cpu(), st.hi.cpu(), self.groups, self.permute)
            for name in group:
                unit.get(name).input_q.set_groups(perm, bounds)
