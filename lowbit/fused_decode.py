"""A fused decoder step for Llama-family causal LMs (Llama, Mistral, Qwen2; SmolLM2 and
TinyLlama are Llamas).

transformers runs a decode step through about ten modules per layer, with their hooks,
cache objects, mask construction and per-module Python; for a small model on a CPU that
bookkeeping costs more than reading the weights (SmolLM2-135M: lowbit's kernels were a
third to a half of a step). ``FusedLlama`` takes the same modules' weights and runs a step
as a short list of tensor operations per layer:

- one kernel call for q, k and v and one for gate and up when they are lowbit's packed
  weights: their rows concatenated into one layout (``wq.Packed.concat``, a copy of the
  packed bytes), so a token reads each layer in 4 kernel calls instead of 7; float
  weights are called directly, without a module call each;
- a key/value cache preallocated for the whole generation, written in place;
- RoPE tables computed once by the model's own rotary module (so every RoPE variant the
  model's config names is what it is in transformers), PyTorch's fused RMSNorm and
  attention (grouped-query heads without repeating the cache).

It computes what the transformers forward computes (tested: the same greedy tokens); it is
for inference only. Other architectures keep transformers' forward, which
``unsupported_reason`` names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import wq
from lowbit.nn.qlinear import QLinear

ARCHITECTURES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``FusedLlama`` cannot run ``model`` (``None``: it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"the fused decoder step runs {', '.join(ARCHITECTURES)} models, not {kind!r}"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"the model has no model.{name} (not laid out as a transformers Llama)"
    if not hasattr(model, "lm_head"):
        return "the model has no lm_head"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"the MLP's activation is {cfg.hidden_act!r}, not silu"
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
            return f"layer {i} is not a Llama decoder layer (self_attn q/k/v/o_proj, mlp)"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i}'s MLP has no gate/up/down projections"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"layer {i} normalizes q and k (not a Llama attention)"
    return None


class Projection:
    """Linears that read the same input, run as one matmul over their concatenated rows."""

    def __init__(self, modules: list[nn.Module]):
        self.sizes = [m.out_features for m in modules]
        self.modules = modules
        self.packed = self.linears = self.bias = self.perm = None
        if all(isinstance(m, QLinear) for m in modules):
            self._fuse_quantized(modules)
        elif all(type(m) is nn.Linear for m in modules):
            # float weights are called one by one (no Python module call each); concatenating
            # them would copy the model's largest tensors for one call saved per layer
            self.linears = [(m.weight.detach(), None if m.bias is None else m.bias.detach()) for m in modules]
        if self.packed is not None or self.linears is not None:
            self.modules = None

    def _fuse_quantized(self, modules: list[QLinear]) -> None:
        device = modules[0].qweight.device
        perms = [m.in_perm for m in modules]
        same_perm = all(p is None for p in perms) or all(p is not None and torch.equal(p, perms[0]) for p in perms)
        if not same_perm or any(m.select_kernel(device) != "native" or m.has_terms for m in modules):
            return  # (kept fp16 outliers and low-rank terms are added by each QLinear's own forward)
        try:
            self.packed = wq.Packed.concat([m._prepare("native", device) for m in modules])
        except ValueError:  # different formats: each runs on its own
            return
        self.perm = perms[0]
        self.bias = self._bias(modules, torch.float32)

    @staticmethod
    def _bias(modules: list[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
        if all(m.bias is None for m in modules):
            return None
        device = next(m.bias.device for m in modules if m.bias is not None)
        parts = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=device) for m in modules]
        return torch.cat(parts).to(dtype)

    def __call__(self, x: torch.Tensor, split: bool = True) -> list[torch.Tensor] | torch.Tensor:
        """The outputs of the linears, one each, or (``split=False``) side by side in one tensor."""
        if self.modules is not None:
            outs = [m(x) for m in self.modules]
            return outs if split else torch.cat(outs, dim=-1)
        if self.packed is not None:
            if self.perm is not None:
                x = x.index_select(-1, self.perm)
            flat = x.reshape(-1, x.shape[-1])
            if flat.dtype == torch.float32 and flat.is_contiguous():
                y = self.packed.gemv(flat, self.bias).view(*x.shape[:-1], -1)
            else:
                y = self.packed._forward(x, None, self.bias)
        else:
            outs = [F.linear(x, w, b) for w, b in self.linears]
            return outs if split else torch.cat(outs, dim=-1)
        if not split:
            return y
        return list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]


class _Layer:
    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = (layer.input_layernorm.weight.detach(), _eps(layer.input_layernorm))
        self.norm2 = (layer.post_attention_layernorm.weight.detach(), _eps(layer.post_attention_layernorm))
        self.qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = Projection([attn.o_proj])
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj])
        self.down = Projection([mlp.down_proj])


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class FusedLlama:
    """Greedy decoding state for one generation: the model's weights, fused, and a key/value
    cache of ``max_len`` positions for ``batch`` sequences."""

    def __init__(self, model: nn.Module, max_len: int, batch: int = 1):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        cfg = model.config
        inner = model.model
        self.embed, self.head = inner.embed_tokens, Projection([model.lm_head])
        self.final_norm = (inner.norm.weight.detach(), _eps(inner.norm))
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and max_len > window:
            raise ValueError(f"{max_len} positions exceed the model's sliding window of {window}")
        weight = inner.norm.weight
        self.dtype, self.device = weight.dtype, weight.device
        with torch.no_grad():  # the RoPE tables of every position, from the model's own rotary module
            probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=self.device)
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_len, head_dim]
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.batch, self.max_len, self.pos = batch, max_len, 0
        self.native = wq.extension() if self.device.type == "cpu" else None

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position after feeding ``ids: [batch, T]`` at the current position."""
        b, t = ids.shape
        if b != self.batch:
            raise ValueError(f"this state decodes {self.batch} sequences, got {b}")
        p = self.pos
        if p + t > self.max_len:
            raise ValueError(f"{p + t} positions exceed the cache of {self.max_len}")
        h = self.embed(ids).to(self.dtype)
        cos, sin = self.cos[p : p + t], self.sin[p : p + t]
        mask = None
        if t > 1 and p > 0:  # a chunk after earlier tokens: causal within the chunk, all earlier visible
            mask = torch.ones(t, p + t, dtype=torch.bool, device=self.device).tril(p)
        nq, nk = self.heads, self.kv_heads
        cos, sin = cos[:, None], sin[:, None]  # [t, 1, head_dim]: over the heads of [b, t, heads, head_dim]
        for i, layer in enumerate(self.layers):
            x = self._norm(h, layer.norm1)
            qkv = layer.qkv(x, split=False).view(b, t, nq + 2 * nk, self.head_dim)
            qk = _rotate(qkv[:, :, : nq + nk], cos, sin)  # q and k rotated in one pass
            q = qk[:, :, :nq].transpose(1, 2)
            self.keys[i, :, :, p : p + t] = qk[:, :, nq:].transpose(1, 2)
            self.values[i, :, :, p : p + t] = qkv[:, :, nq + nk :].transpose(1, 2)
            a = F.scaled_dot_product_attention(
                q,
                self.keys[i, :, :, : p + t],
                self.values[i, :, :, : p + t],
                attn_mask=mask,
                is_causal=t > 1 and p == 0,
                scale=self.scale,
                enable_gqa=self.kv_heads != self.heads,
            )
            h = h + layer.o(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))[0]
            x = self._norm(h, layer.norm2)
            gate, up = layer.gate_up(x)
            h = h + layer.down(F.silu(gate) * up)[0]
        self.pos = p + t
        return self.head(self._norm(h[:, -1], self.final_norm))[0]

    def _norm(self, h: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        weight, eps = norm
        if self.native is not None and h.dtype == torch.float32 and h.device.type == "cpu":
            return self.native.rms_norm(h, weight, eps)  # one pass; PyTorch's CPU rms_norm is eight ops
        return F.rms_norm(h, h.shape[-1:], weight, eps)

    def next_token(self, ids: torch.Tensor) -> torch.Tensor:
        """The greedy next token ``[batch, 1]`` after feeding ``ids``."""
        return self.forward(ids).argmax(-1, keepdim=True)
