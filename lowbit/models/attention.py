"""PyTorch's fused attention and encoder layer, rebuilt from explicit modules.

``nn.MultiheadAttention`` keeps q, k and v in one packed ``in_proj_weight`` and
computes ``q @ kᵀ``, the softmax and ``attn @ v`` inside one function (or one
fused kernel), so a quantizer has nowhere to sit on them; ``nn.TransformerEncoderLayer``
does its residual adds with ``+``. The modules here compute the same numbers
with every op its own named submodule — ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj`` (``nn.Linear``), ``qk``/``av`` (``MatMul``), ``softmax``,
``activation``, ``add1``/``add2`` (``Add``) — which ``make_explicit`` swaps in
place of the originals, keeping the weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.adapters import set_module
from lowbit.nn.ops import Add, MatMul


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:  # weight: [out, in]
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``, on their device and dtype.

    Built on the meta device so no throw-away random initialisation is computed.
    """
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return lin


def float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive mask: ``True`` (may not attend) becomes ``-inf``, ``False`` 0; float masks pass as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"{name} has dtype {mask.dtype}; pass a bool mask (True = may not attend) or a float one")
    return mask


def refuse_unsupported(mha: nn.MultiheadAttention) -> None:
    """Fail loudly on the options whose keys and values are not plain projections of the inputs."""
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError("add_bias_kv=True is not supported: the learned extra key/value has no explicit form here")
    if mha.add_zero_attn:
        raise ValueError("add_zero_attn=True is not supported: the appended zero key/value has no explicit form here")


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v/out projections and ``MatMul`` modules for the two products.

    ``forward`` takes and returns what ``nn.MultiheadAttention.forward`` does and
    matches it to float rounding; ``qk`` sees ``q`` already scaled by
    ``1/sqrt(head_dim)``, as PyTorch scales it.
    """

    # PyTorch's containers probe these before their fused fast paths; with no packed
    # in-projection they fall back to calling this module's forward.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        out_proj: nn.Linear,
        num_heads: int,
        dropout: float = 0.0,
        batch_first: bool = False,
    ):
        super().__init__()
        embed_dim = q_proj.out_features
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        for name, proj in (("k_proj", k_proj), ("v_proj", v_proj), ("out_proj", out_proj)):
            if proj.out_features != embed_dim:
                raise ValueError(f"{name} has {proj.out_features} outputs but q_proj has {embed_dim}; they must agree")
        if out_proj.in_features != embed_dim:
            raise ValueError(f"out_proj takes {out_proj.in_features} inputs; it must take embed_dim {embed_dim}")
        self.embed_dim = embed_dim
        self.kdim = k_proj.in_features
        self.vdim = v_proj.in_features
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.av = MatMul()
        self.out_proj = out_proj

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ExplicitMultiheadAttention:
        """The same attention with copies of ``mha``'s weights, in the same train/eval mode."""
        refuse_unsupported(mha)
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.chunk(3)  # each [E, E]
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight  # [E, E], [E, kdim], [E, vdim]
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        explicit = cls(
            linear_from(wq, bq),
            linear_from(wk, bk),
            linear_from(wv, bv),
            linear_from(mha.out_proj.weight, mha.out_proj.bias),
            mha.num_heads,
            mha.dropout,
            mha.batch_first,
        )
        return explicit.train(mha.training)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, E] -> [N, H, T, head_dim]
        n, t, _ = x.shape
        return x.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

    def merged_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """``attn_mask`` and ``key_padding_mask`` as one additive mask broadcastable to ``[N, H, L, S]``."""
        n, tgt_len, src_len = shape
        attn_mask = float_mask(attn_mask, "attn_mask", dtype)
        key_padding_mask = float_mask(key_padding_mask, "key_padding_mask", dtype)
        mask = None
        if attn_mask is not None:
            if attn_mask.shape == (tgt_len, src_len):
                mask = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.shape == (n * self.num_heads, tgt_len, src_len):
                mask = attn_mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(
                    f"attn_mask has shape {tuple(attn_mask.shape)}; use (L, S) = {(tgt_len, src_len)} or "
                    f"(N * num_heads, L, S) = {(n * self.num_heads, tgt_len, src_len)}"
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, src_len):
                raise ValueError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; use (N, S) = {(n, src_len)}"
                )
            kpm = key_padding_mask.view(n, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, weights)`` as ``nn.MultiheadAttention`` returns them; ``weights`` is None unless asked for.

        ``is_causal`` is, as in PyTorch, only a hint that ``attn_mask`` is causal:
        the mask itself must be passed and is what is applied.
        """
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True is a hint that attn_mask is causal, but attn_mask is None; pass the mask too, "
                "e.g. nn.Transformer.generate_square_subsequent_mask(L)"
            )
        batched = query.dim() == 3
        if not batched and query.dim() != 2:
            raise ValueError(
                f"query is {query.dim()}-D; pass [L, E] (unbatched) or a batch of 3-D [N, L, E] / [L, N, E]"
            )
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query is {query.dim()}-D but key is {key.dim()}-D and value {value.dim()}-D; they must match"
            )
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape  # from here on query: [N, L, E], key: [N, S, kdim], value: [N, S, vdim]
        src_len = key.shape[1]
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(f"key has (batch, length) {tuple(key.shape[:2])} but value {tuple(value.shape[:2])}")
        mask = self.merged_mask(attn_mask, key_padding_mask, (n, tgt_len, src_len), query.dtype)

        q = self.split_heads(self.q_proj(query))  # [N, H, L, d]
        k = self.split_heads(self.k_proj(key))  # [N, H, S, d]
        v = self.split_heads(self.v_proj(value))  # [N, H, S, d]
        scores = self.qk(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))  # [N, H, L, S]
        if mask is not None:
            scores = scores + mask
        attn = self.dropout(self.softmax(scores))  # [N, H, L, S]
        out = self.av(attn, v).transpose(1, 2).reshape(n, tgt_len, self.embed_dim)  # [N, L, E]
        out = self.out_proj(out)

        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def activation_module(activation: object) -> nn.Module:
    """The activation of an ``nn.TransformerEncoderLayer`` as a module, so that it has a name to hook."""
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    if activation is F.relu or activation is torch.relu:
        return nn.ReLU()
    if activation is F.gelu:
        return nn.GELU()
    raise ValueError(
        f"activation {activation!r} is neither F.relu, F.gelu nor an nn.Module; "
        "build the layer with activation='relu'/'gelu' or pass the activation as a module"
    )


class ExplicitEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post- or pre-norm) with explicit attention, activation and residual adds.

    Matches PyTorch's reference (not fused) path; there is no fast path to
    diverge from, because a quantizer on any op must always run.
    """

    def __init__(
        self,
        self_attn: ExplicitMultiheadAttention,
        linear1: nn.Linear,
        linear2: nn.Linear,
        norm1: nn.Module,
        norm2: nn.Module,
        activation: nn.Module,
        dropout: float = 0.1,
        norm_first: bool = False,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.linear1 = linear1
        self.dropout = nn.Dropout(dropout)
        self.linear2 = linear2
        self.norm_first = norm_first
        self.norm1 = norm1
        self.norm2 = norm2
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation
        self.add1 = Add()
        self.add2 = Add()

    @classmethod
    def from_layer(cls, layer: nn.TransformerEncoderLayer) -> ExplicitEncoderLayer:
        """The same layer with copies of ``layer``'s weights and dropout rates, in the same train/eval mode."""
        explicit = cls(
            ExplicitMultiheadAttention.from_mha(layer.self_attn),
            copy.deepcopy(layer.linear1),
            copy.deepcopy(layer.linear2),
            copy.deepcopy(layer.norm1),
            copy.deepcopy(layer.norm2),
            activation_module(layer.activation),
            norm_first=layer.norm_first,
        )
        for name in ("dropout", "dropout1", "dropout2"):
            setattr(explicit, name, copy.deepcopy(getattr(layer, name)))
        return explicit.train(layer.training)

    def sa_block(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        x = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(x)

    def ff_block(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., d_model]
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = self.add1(x, self.sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal))
            x = self.add2(x, self.ff_block(self.norm2(x)))
        else:
            x = self.norm1(self.add1(x, self.sa_block(x, src_mask, src_key_padding_mask, is_causal)))
            x = self.norm2(self.add2(x, self.ff_block(x)))
        return x


def make_explicit(model: nn.Module) -> int:
    """Swap, in place, every ``nn.TransformerEncoderLayer`` and then every remaining ``nn.MultiheadAttention``
    for its explicit form, and every Hugging Face ViT/DeiT layer and attention (``lowbit.models.hf_vit``);
    returns how many modules were swapped.

    Only the exact PyTorch classes are swapped: a subclass may override
    ``forward`` in a way the explicit form would silently drop (its inner
    attention is still swapped). A module reachable under several names stays
    one shared module. ``nn.TransformerEncoder``'s nested-tensor fast path is
    switched off, because it would hand the explicit layers NestedTensors.
    """
    swapped = swap(model, nn.TransformerEncoderLayer, ExplicitEncoderLayer.from_layer)
    swapped += swap(model, nn.MultiheadAttention, ExplicitMultiheadAttention.from_mha)
    if swapped:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False
    from lowbit.models.hf_vit import make_hf_vit_explicit  # it imports swap from here

    return swapped + make_hf_vit_explicit(model)


def swap(model: nn.Module, kind: type[nn.Module], convert) -> int:
    """Replace each module of exactly type ``kind`` by ``convert(module)``; the count of distinct modules replaced."""
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if type(m) is kind]
    if any(name == "" for name, _ in found):
        raise ValueError(
            f"make_explicit replaces submodules in place and cannot replace the model itself, a {kind.__name__}; "
            f"use {convert.__qualname__}(model) instead"
        )
    converted: dict[int, nn.Module] = {}
    for name, m in found:
        if id(m) not in converted:
            converted[id(m)] = convert(m)
        set_module(model, name, converted[id(m)])
    return len(converted)
