"""Hugging Face ViT and DeiT (transformers 5 layout), rebuilt from explicit modules, and their adapter.

transformers computes a ViT layer's attention in one function (eager, SDPA or a
fused kernel) and its residual adds with ``+``, so a quantizer has nowhere to sit
on ``q @ kᵀ``, the softmax, ``attn @ v`` or the residual sums. ``make_hf_vit_explicit``
swaps every ``ViTLayer``/``DeiTLayer`` and ``ViTAttention``/``DeiTAttention`` for a
subclass that computes eager attention with every op its own named submodule:
``attention.qk``/``attention.av`` (``MatMul``), ``attention.softmax``, and the
layer's ``add1``/``add2`` (``Add``); the MLP activation already is a module
(``mlp.activation_fn``). The projections, norms and MLP stay the very same
modules, so weights, parameter names and state-dict keys do not change.

The explicit classes subclass the ones they replace, so transformers' own
``isinstance`` checks (recording ``output_attentions``/``output_hidden_states``,
gradient checkpointing) still hold. They are built on first use from the classes
the model holds: this module never imports transformers itself.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.adapters import Adapter, SiteSpec, UnitSpec
from lowbit.models.attention import swap
from lowbit.nn.ops import Add, MatMul

# (transformers module, layer class, attention class); DeiT's are generated copies of ViT's, not the same classes
HF_CLASSES = (
    ("transformers.models.vit.modeling_vit", "ViTLayer", "ViTAttention"),
    ("transformers.models.deit.modeling_deit", "DeiTLayer", "DeiTAttention"),
)
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYER_PARTS = ("layernorm_before", "attention", "layernorm_after", "mlp", "dropout")


class FloatSoftmax(nn.Softmax):
    """``nn.Softmax`` computed in float32 and cast back to the input's dtype, as transformers' eager attention does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=self.dim, dtype=torch.float32).to(x.dtype)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask transformers built for the model's attention implementation, as an additive one.

    Eager masks are additive already; SDPA's are bool with ``True`` = may attend,
    which becomes 0 there and the dtype's minimum elsewhere, as eager's would be.
    """
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        raise ValueError(
            f"the attention mask is a {type(mask).__name__}; the explicit ViT attention takes the eager (float) or "
            "SDPA (bool) mask: build the model with attn_implementation='eager' or 'sdpa'"
        )
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _rebuilt(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` holding ``module``'s attributes, submodules, parameters, buffers and hooks (the same
    objects), in containers of its own so that adding a child leaves ``module`` as it was."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in vars(module).items()})
    return new


class ExplicitHFAttention(nn.Module):
    """Mixin in front of ``ViTAttention``/``DeiTAttention``: their eager attention, one module per op.

    ``forward`` takes what theirs does (``hidden_states [N, T, E]``, the mask the
    model built, further keyword arguments, which eager attention ignores too) and
    returns ``(output [N, T, E], weights [N, H, T, T])``. ``qk`` sees unscaled ``q``
    and ``kᵀ``; its product is scaled by ``1/sqrt(head_dim)`` after, as transformers does.
    """

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]  # [N, T]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [N, H, T, d]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        scores = self.qk(q, k.transpose(2, 3)) * self.scaling  # [N, H, T, T]
        mask = additive_mask(attention_mask, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = self.dropout(self.softmax(scores))
        out = self.av(weights, v).transpose(1, 2).reshape(*input_shape, -1).contiguous()  # [N, T, H * d]
        return self.o_proj(out), weights


class ExplicitHFLayer(nn.Module):
    """Mixin in front of ``ViTLayer``/``DeiTLayer``: the pre-norm layer with its residual adds as ``add1``/``add2``."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        residual = hidden_states  # taken before the norm: layernorm_before feeds only q/k/v
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = self.add1(self.dropout(hidden_states), residual)
        residual = hidden_states  # likewise: layernorm_after feeds only mlp.fc1
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return self.add2(self.dropout(hidden_states), residual)


_EXPLICIT: dict[type, type] = {}


def explicit_class(kind: type, mixin: type) -> type:
    """``Explicit<kind>``: ``mixin``'s forward in front of ``kind``, built once per class."""
    if kind not in _EXPLICIT:
        name = f"Explicit{kind.__name__}"
        doc = f"``{kind.__name__}`` with explicit op modules; see ``{mixin.__name__}``."
        _EXPLICIT[kind] = type(name, (mixin, kind), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    return _EXPLICIT[kind]


def explicit_attention(attention: nn.Module) -> nn.Module:
    """The same attention (same projections, same mode) with ``qk``, ``softmax``, ``dropout``, ``av`` modules."""
    new = _rebuilt(attention, explicit_class(type(attention), ExplicitHFAttention))
    new.qk = MatMul()
    new.softmax = FloatSoftmax(dim=-1)
    new.dropout = nn.Dropout(attention.attention_dropout)
    new.av = MatMul()
    return new


def explicit_layer(layer: nn.Module) -> nn.Module:
    """The same layer (same submodules, same mode) with ``add1``/``add2`` modules; its attention is swapped apart."""
    new = _rebuilt(layer, explicit_class(type(layer), ExplicitHFLayer))
    new.add1 = Add()
    new.add2 = Add()
    return new


def hf_classes() -> list[tuple[type, type]]:
    """``(layer class, attention class)`` of each HF ViT family whose module is loaded (a model holding
    them has loaded it; nothing is imported here)."""
    out = []
    for module_name, layer, attention in HF_CLASSES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, layer) and hasattr(module, attention):
            out.append((getattr(module, layer), getattr(module, attention)))
    return out


def _has_layout(model: nn.Module, kind: type, parts: tuple[str, ...]) -> bool:
    """Whether ``kind``'s modules in ``model`` are laid out as this module expects (transformers >= 5:
    older versions split attention into ``ViTSelfAttention`` + ``ViTSelfOutput``, left as they are)."""
    first = next((m for m in model.modules() if type(m) is kind), None)
    return first is not None and all(isinstance(getattr(first, p, None), nn.Module) for p in parts)


def make_hf_vit_explicit(model: nn.Module) -> int:
    """Swap, in place, every HF ``ViTLayer``/``DeiTLayer`` and then every ``ViTAttention``/``DeiTAttention``
    for its explicit form; returns how many modules were swapped.

    Only the exact classes are swapped (a subclass may compute something else),
    so a second call swaps nothing. A module reachable under several names stays
    one shared module.
    """
    swapped = 0
    for layer, attention in hf_classes():
        if _has_layout(model, layer, LAYER_PARTS):
            swapped += swap(model, layer, explicit_layer)
        if _has_layout(model, attention, ATTENTION_PARTS):
            swapped += swap(model, attention, explicit_attention)
    return swapped


# Pre-norm: the residual is taken before each LayerNorm, so the norm feeds only its linears;
# attention mixes positions, not channels, so v_proj's output channels reach o_proj's inputs
# unmixed. (fc1 -> fc2 is not exact: GELU does not commute with a scaling.)
HF_VIT_PAIRS = (
    ("layernorm_before", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    ("attention.v_proj", ("attention.o_proj",)),
    ("layernorm_after", ("mlp.fc1",)),
)


class HFViTAdapter(Adapter):
    """Hugging Face ``ViTModel``/``ViTFor*`` and ``DeiTModel``/``DeiTFor*`` (``config.model_type`` vit or deit).

    Units: the patch-embedding conv, each encoder layer, then each weighted layer
    after the layers (pooler, classifier(s)). The class/distillation tokens and the
    position embeddings are loose parameters, kept in full precision. Sites per
    layer: both operands of ``q @ kᵀ``, the softmax, the MLP activation and both
    residual sums.
    """

    def __init__(self):
        super().__init__("hf_vit", ("vit", "deit"), ("vit.layers", "deit.layers", "layers"), HF_VIT_PAIRS,
                         family="vit")  # fmt: skip

    def prepare(self, model: nn.Module, example=None) -> list[str]:
        n = make_hf_vit_explicit(model)
        notes = [f"made {n} ViT layers and attentions explicit (q.k^T, softmax, attn.v, residual adds)"] if n else []
        return notes + super().prepare(model, example)

    def units(self, model: nn.Module) -> list[UnitSpec]:
        # the embeddings hold the loose tokens, so count as weighted; their conv is the unit, not they
        units = super().units(model)
        return [u for u in units if not any(o.name.startswith(u.name + ".") for o in units)]

    def norm_consumers(self, model: nn.Module) -> list[tuple[str, list[str]]]:
        out = []
        for name, block in self.blocks(model):
            names = {n for n, _ in block.named_modules()}
            for norm, consumers in (HF_VIT_PAIRS[0], HF_VIT_PAIRS[2]):
                if norm in names and all(c in names for c in consumers):
                    out.append((f"{name}.{norm}", [f"{name}.{c}" for c in consumers]))
        return out

    def quantizes_input(self, name: str) -> bool:
        return not name.endswith(".mlp.fc2")  # it reads the MLP activation's site

    def input_sites(self, model: nn.Module) -> dict[str, str]:
        """Each layer's ``mlp.fc2`` reads ``mlp.activation_fn``'s output (dropout is off at inference)."""
        out = {}
        for name, block in self.blocks(model):
            names = {n for n, _ in block.named_modules()}
            if {"mlp.fc2", "mlp.activation_fn"} <= names:
                out[f"{name}.mlp.fc2"] = f"{name}.mlp.activation_fn"
        return out

    def sites(self, model: nn.Module) -> list[SiteSpec]:
        out = []
        for name, block in self.blocks(model):
            names = {n for n, _ in block.named_modules()}
            specs = [SiteSpec("attention.qk", inputs=2, role="qk"),
                     SiteSpec("attention.softmax", output=True, role="softmax"),
                     SiteSpec("mlp.activation_fn", output=True, role="mlp_act"),
                     SiteSpec("add1", output=True, role="residual"), SiteSpec("add2", output=True, role="residual")]  # fmt: skip
            out += [SiteSpec(f"{name}.{s.name}", s.inputs, s.output, s.role) for s in specs if s.name in names]
        return out
