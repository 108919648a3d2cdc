"""Mixture-of-experts layers as one linear per expert projection, so every expert is quantized.

transformers (5.x) stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V2/V3 as two 3-D parameters of one module: ``gate_up_proj [E, 2I, H]``
and ``down_proj [E, H, I]``. ``unfuse_experts`` replaces each such module with
``Experts``: an ``nn.ModuleList`` of ``ExpertMLP`` (``gate_proj``, ``up_proj``,
``down_proj`` ``nn.Linear``s, the per-expert layout of the published checkpoints)
whose forward is the same routed loop (the tokens the router sends to an expert,
weighted by its routing weight, summed back in place). Each expert's linears are
then ordinary layers: wrapped, observed on the tokens routed to them, quantized,
packed and reported one by one.

Calibration policy: an expert sees exactly the calibration tokens its router
sends it. One that receives none cannot be calibrated; data-driven methods
quantize it with round-to-nearest and the coverage report names it ("rtn
(fallback: gptq saw no calibration input for this layer)"). No expert is left
without codes and scales.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
# Mixtral's published checkpoints name an expert's projections w1 (gate), w3 (up), w2 (down); transformers
# maps the per-expert names of each family's published layout onto its fused tensors when it loads
NAMES_BY_TYPE = {"MixtralExperts": ("w1", "w3", "w2"), "MiniMaxExperts": ("w1", "w3", "w2")}


class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))``, its linears under ``names`` (gate, up, down)."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, names=GATE_UP_DOWN, dtype=None, device=None):
        super().__init__()
        self.names = tuple(names)
        gate, up, down = self.names
        kw = {"bias": False, "dtype": dtype, "device": device}
        setattr(self, gate, nn.Linear(hidden, inter, **kw))
        setattr(self, up, nn.Linear(hidden, inter, **kw))
        setattr(self, down, nn.Linear(inter, hidden, **kw))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The routed experts, called as transformers calls its fused experts module:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, nn.Parameter) or not isinstance(down, nn.Parameter) or gu.dim() != 3 or down.dim() != 3:
        return False
    e, two_i, h = gu.shape
    biased = any(getattr(module, n, None) is not None for n in ("gate_up_proj_bias", "down_proj_bias"))
    return (not biased and two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)
            and hasattr(module, "act_fn") and not getattr(module, "is_transposed", False))  # fmt: skip


def unfuse(module: nn.Module, names=None) -> Experts:
    """The ``Experts`` equivalent of a fused experts module (its weights copied, not shared)."""
    names = tuple(names or NAMES_BY_TYPE.get(type(module).__name__, GATE_UP_DOWN))
    gu, down = module.gate_up_proj.detach(), module.down_proj.detach()
    n, two_i, h = gu.shape
    inter = two_i // 2
    experts = Experts()
    for e in range(n):
        mlp = ExpertMLP(h, inter, module.act_fn, names, dtype=gu.dtype, device=gu.device)
        with torch.no_grad():
            for name, w in zip(names, (gu[e, :inter], gu[e, inter:], down[e])):
                getattr(mlp, name).weight.copy_(w)
        experts.append(mlp)
    return experts


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` in place; returns their names."""
    from lowbit.models.adapters import set_module

    found = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in found:
        set_module(model, name, unfuse(m))
    return [name for name, _ in found]


def expert_names(experts: Experts) -> list[str]:
    """The projection names of an ``Experts`` (gate, up, down), for rebuilding it."""
    return list(experts[0].names) if len(experts) else list(GATE_UP_DOWN)
