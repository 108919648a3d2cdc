"""Integer-only transformer encoders: I-BERT (Kim et al. 2021) and I-ViT (Li & Gu 2023).

``integer_vit(model, images)`` and ``integer_bert(model, batches)`` turn a float
encoder into one that computes with integers only between its input and its
output: int8 weights (per output channel) and int8 activations into every matmul
(``torch._int_mm``), int32 accumulators, a 16-bit residual stream, and the
integer softmax, GELU and LayerNorm of ``lowbit.kernels.integer``; every scale
is folded offline into dyadic multipliers (integer multiply, then shift). The
float image is quantized on the way in and the logits (or hidden states) are
dequantized on the way out; nothing in between is floating point, which
``tests/test_integer.py`` checks by recording every op the forward dispatches.

Two recipes, each the paper's choice of approximations:

- ``ibert``: second-order polynomial exp (i-exp) in the softmax, polynomial erf
  GELU (i-GELU), integer-square-root LayerNorm;
- ``ivit``: Shiftmax and ShiftGELU (base-2 exponentials by shifts), and
  I-LayerNorm, which is the same integer-root LayerNorm.

Neither paper's quantization-aware fine-tuning is done here: the integer model is
calibrated post-training (per-tensor symmetric activation ranges, the largest
magnitude seen on the calibration inputs). Three forms of one model:
``forward`` (integer tensors), ``simulate`` (the same integers in float64, as the
papers' code computes them; equal bit for bit) and ``export_onnx`` (the same
integer graph for ONNX Runtime).

Choices the papers leave open, made here: softmax probabilities are unsigned
8-bit at scale 2**-8; the residual stream and every LayerNorm input are 16-bit;
the attention scores and the GELU input are requantized to 16 bits (with a
range of at least 1 and 4 respectively, so the integer constants stay small);
the last LayerNorm of a BERT writes 16 bits, so the embeddings keep precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.integer import (
    RESIDUAL_BITS,
    SOFTMAX_BITS,
    ExpConstants,
    GeluConstants,
    LayerNormConstants,
    OnnxBackend,
    OnnxValue,
    Requant,
    TorchBackend,
    int_gelu,
    int_layernorm,
    int_softmax,
)

RECIPES = {"ibert": ("poly", "poly"), "ivit": ("shift", "shift")}  # (exp kind, GELU kind)
RES_MAX = (1 << (RESIDUAL_BITS - 1)) - 1
ACT_MAX = 127


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor


@dataclass
class EncoderLayerParts:
    """The float modules of one encoder layer, whatever model family they come from."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    fc1: nn.Linear
    fc2: nn.Linear
    ln1: nn.LayerNorm  # pre-norm: before attention; post-norm: after the attention residual
    ln2: nn.LayerNorm
    heads: int
    act: str  # 'relu' or 'gelu'
    norm_first: bool


class Ranges:
    """Largest magnitude of each named float value over the calibration batches: over the whole tensor
    (``amax``) and per channel of its last axis (``channel``)."""

    def __init__(self):
        self.amax: dict[str, float] = {}
        self.channel: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        v = x.detach().abs()
        if keep is not None:
            v = v * keep
        per = v.reshape(-1, v.shape[-1]).amax(0).double()
        self.channel[name] = torch.maximum(self.channel[name], per) if name in self.channel else per
        self.amax[name] = self.channel[name].max().item()
        return x

    def scale(self, name: str, qmax: int, floor: float = 1e-8) -> float:
        """One scale for the tensor: its largest magnitude over ``qmax``."""
        if name not in self.amax:
            raise KeyError(f"no calibration range recorded for {name!r}")
        value = self.amax[name]
        if not math.isfinite(value):
            raise ValueError(f"calibration range of {name!r} is {value}: the float model produced inf/NaN there")
        return max(value, floor) / qmax

    def channel_scale(self, name: str, qmax: int) -> torch.Tensor:
        """One scale per channel (float64 ``[C]``); a channel that never moved gets 2**-16 of the largest."""
        top = self.scale(name, qmax)
        return torch.clamp(self.channel[name] / qmax, min=top * 2.0**-16)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [N, T, E] -> [N, H, T, d]
    n, t, e = x.shape
    return x.view(n, t, heads, e // heads).transpose(1, 2)


def float_layer(
    p: EncoderLayerParts, x: torch.Tensor, rec: Ranges, prefix: str, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The float layer computed from its parts (``x``: [N, T, E]), recording the range of every value the
    integer layer quantizes; ``keep`` ([N, T], 1 = real token) leaves padding out of attention and ranges."""
    n, t, e = x.shape
    tok = None if keep is None else keep[..., None].to(x.dtype)  # [N, T, 1]

    def seen(name, value):
        return rec(f"{prefix}.{name}", value, tok)

    h = seen("ln1", p.ln1(x)) if p.norm_first else seen("in", x)
    q, k, v = (split_heads(seen(name, lin(h)), p.heads) for name, lin in (("q", p.q), ("k", p.k), ("v", p.v)))
    scores = q @ k.transpose(-2, -1) / math.sqrt(e // p.heads)  # [N, H, T, T]
    if keep is not None:
        pair = tok[:, None] * tok[:, None].transpose(-2, -1)  # [N, 1, T, T]: both tokens real
        rec(f"{prefix}.scores", scores, pair)
        scores = scores.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
    else:
        rec(f"{prefix}.scores", scores)
    ctx = seen("ctx", (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(n, t, e))
    r1 = seen("res1", x + p.o(ctx))
    if p.norm_first:
        h2, base = seen("ln2", p.ln2(r1)), r1
    else:
        h2 = base = seen("ln1", p.ln1(r1))
    f = seen("fc1", p.fc1(h2))
    g = seen("act", torch.relu(f) if p.act == "relu" else nn.functional.gelu(f))
    r2 = seen("res2", base + p.fc2(g))
    return r2 if p.norm_first else seen("ln2", p.ln2(r2))


class IntLinear(nn.Module):
    """int8 weights (one scale per output row) reading int8 input codes at ``in_scale``.

    ``in_scale`` may be one scale per input channel (a LayerNorm's or GELU's
    output, whose outlier channels would waste a shared grid): it is folded into
    the weight's columns before they are quantized, as RepQ-ViT reparameterizes
    per-channel activation scales (Li et al. 2023). ``acc`` gives the int32 sum
    plus the integer bias, at scale ``acc_scale[row]``.
    """

    def __init__(self, lin: nn.Linear, in_scale: float | torch.Tensor):
        super().__init__()
        w = lin.weight.detach().double()
        if not torch.isfinite(w).all():
            raise ValueError("the weight holds inf/NaN; integer conversion needs a finite model")
        w = w * torch.as_tensor(in_scale, dtype=torch.float64)  # [out, in] * [in] (or a scalar)
        w_scale = w.abs().amax(1).clamp(min=1e-30) / ACT_MAX
        self.register_buffer(
            "wt", torch.round(w / w_scale[:, None]).clamp(-ACT_MAX, ACT_MAX).to(torch.int8).t().contiguous()
        )
        self.acc_scale = w_scale  # [out], float64: input scales are inside the weight now
        bias = lin.bias.detach().double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        self.register_buffer("bias", torch.round(bias / w_scale).clamp(-(2**40), 2**40).to(torch.int64))
        self.bound = ACT_MAX * ACT_MAX * w.shape[1] + self.bias.abs().max().item()

    def acc(self, o, x):
        """The int32 sum of products; the integer bias is added by the requantizations below."""
        return o.matmul(o.cast(x, "int8"), o.const(self.wt))

    def requant(self, scale: float | torch.Tensor, bits: int = 8, relu: bool = False) -> Requant:
        """Bias added, then from ``acc``'s scale to ``scale`` (one, or one per output channel) as ``bits``-bit
        integers; ``relu`` clamps at 0 instead of ``-max`` (the same integers as requantizing ``max(acc, 0)``)."""
        ratio = self.acc_scale / torch.as_tensor(scale, dtype=torch.float64)
        return Requant.make(ratio, self.bound, bits, bias=self.bias, lo=0 if relu else None)


class IntEncoderLayer(nn.Module):
    """One encoder layer in integers; built from ``EncoderLayerParts`` and the calibrated ``Ranges``.

    Takes its input as integers at ``in_scale`` (one, or one per channel) with
    ``in_bits`` bits (8: the output of a post-norm LayerNorm; 16: a residual
    stream or an embedding sum) and gives its output at ``out_scale`` /
    ``out_bits``. 8-bit LayerNorm and MLP-activation outputs have one scale per
    channel, folded into the weights that read them (``IntLinear``) and into the
    residual requantization; q, k, v and the attention context one per tensor.
    """

    def __init__(
        self, p: EncoderLayerParts, r: Ranges, prefix: str, in_scale, in_bits: int, recipe: str, out_bits: int = 8
    ):
        super().__init__()
        exp_kind, gelu_kind = RECIPES[recipe]
        name = lambda n: f"{prefix}.{n}"  # noqa: E731
        self.heads, self.norm_first, self.act = p.heads, p.norm_first, p.act
        self.ln1 = self.h_requant = None
        if p.norm_first:
            s_h = r.channel_scale(name("ln1"), ACT_MAX)
            self.ln1 = LayerNormConstants.make(p.ln1, in_scale, s_h)
        elif in_bits == 8:  # post-norm: the linears read the layer input itself
            s_h = in_scale
        else:  # ... which is 16 bits wide (an embedding sum): to 8 bits first
            s_h = r.channel_scale(name("in"), ACT_MAX)
            self.h_requant = Requant.make(in_scale / s_h, RES_MAX, 8)
        s_q, s_k, s_v = (r.scale(name(n), ACT_MAX) for n in "qkv")
        self.q, self.k, self.v = IntLinear(p.q, s_h), IntLinear(p.k, s_h), IntLinear(p.v, s_h)
        self.q_out, self.k_out, self.v_out = self.q.requant(s_q), self.k.requant(s_k), self.v.requant(s_v)
        d = p.q.out_features // p.heads
        s_sc = max(r.amax[name("scores")], 1.0) / RES_MAX
        self.scores = Requant.make(s_q * s_k / math.sqrt(d) / s_sc, ACT_MAX * ACT_MAX * d, RESIDUAL_BITS)
        self.exp = ExpConstants.make(exp_kind, s_sc)
        s_ctx = r.scale(name("ctx"), ACT_MAX)
        self.ctx = Requant.make(2.0**-SOFTMAX_BITS * s_v / s_ctx, (1 << SOFTMAX_BITS) * ACT_MAX * 1024, 8)
        self.o = IntLinear(p.o, s_ctx)
        s_r1 = r.scale(name("res1"), RES_MAX)
        self.o_res = self.o.requant(s_r1, RESIDUAL_BITS)
        self.skip1 = Requant.make(in_scale / s_r1, RES_MAX, RESIDUAL_BITS)
        s_h2 = r.channel_scale(name("ln2" if p.norm_first else "ln1"), ACT_MAX)
        self.ln_mid = LayerNormConstants.make(p.ln2 if p.norm_first else p.ln1, s_r1, s_h2)
        s_base = s_r1 if p.norm_first else s_h2
        self.fc1 = IntLinear(p.fc1, s_h2)
        s_act = r.channel_scale(name("act"), ACT_MAX)
        if p.act == "relu":
            self.act_out = self.fc1.requant(s_act, relu=True)
        elif p.act == "gelu":
            s_g = max(r.amax[name("fc1")], 4.0) / RES_MAX
            self.gelu_in = self.fc1.requant(s_g, RESIDUAL_BITS)
            self.gelu = GeluConstants.make(gelu_kind, s_g)
            self.act_out = Requant.make(self.gelu.out_scale / s_act, 2.0**46, 8)
        else:
            raise ValueError(f"activation {p.act!r} has no integer form here; relu and gelu do")
        self.fc2 = IntLinear(p.fc2, s_act)
        s_r2 = r.scale(name("res2"), RES_MAX)
        self.fc2_res = self.fc2.requant(s_r2, RESIDUAL_BITS)
        self.skip2 = Requant.make(s_base / s_r2, RES_MAX, RESIDUAL_BITS)
        self.ln_out = None
        if p.norm_first:
            self.out_scale, self.out_bits = s_r2, RESIDUAL_BITS
        else:
            qmax = (1 << (out_bits - 1)) - 1
            self.out_bits = out_bits
            self.out_scale = r.channel_scale(name("ln2"), qmax) if out_bits == 8 else r.scale(name("ln2"), qmax)
            self.ln_out = LayerNormConstants.make(p.ln2, s_r2, self.out_scale, out_bits=out_bits)

    def heads_of(self, o, x, perm: list[int]):  # [N, T, E] -> [N, H, T, d] (or [N, H, d, T])
        return o.permute(o.reshape(o.cast(x, "int8"), [0, 0, self.heads, -1]), perm)

    def run(self, o, x, keep=None):
        h = (
            int_layernorm(o, x, self.ln1)
            if self.norm_first
            else (x if self.h_requant is None else self.h_requant(o, x))
        )
        h = o.cast(h, "int8")
        q = self.heads_of(o, self.q_out(o, self.q.acc(o, h)), [0, 2, 1, 3])  # [N, H, T, d]
        k = self.heads_of(o, self.k_out(o, self.k.acc(o, h)), [0, 2, 1, 3])  # [N, H, T, d]
        v = self.heads_of(o, self.v_out(o, self.v.acc(o, h)), [0, 2, 3, 1])  # [N, H, d, T]
        scores = self.scores(o, o.matmul_nt(q, k))  # [N, H, T, T], 16-bit
        attn = o.cast(int_softmax(o, scores, self.exp, keep), "uint8")
        ctx = o.cast(self.ctx(o, o.matmul_nt(attn, v)), "int8")  # [N, H, T, d]
        ctx = o.reshape(o.permute(ctx, [0, 2, 1, 3]), [0, 0, -1])
        r1 = o.clamp(o.add(self.o_res(o, self.o.acc(o, ctx)), self.skip1(o, x)), -RES_MAX, RES_MAX)
        h2 = o.cast(int_layernorm(o, r1, self.ln_mid), "int8")
        base = r1 if self.norm_first else h2
        f = self.fc1.acc(o, h2)
        if self.act == "relu":
            g = self.act_out(o, f)  # clamped at 0: ReLU
        else:
            g = self.act_out(o, int_gelu(o, self.gelu_in(o, f), self.gelu))
        r2 = o.clamp(o.add(self.fc2_res(o, self.fc2.acc(o, o.cast(g, "int8"))), self.skip2(o, base)), -RES_MAX, RES_MAX)
        if self.ln_out is None:
            return o.cast(r2, "int32")
        return o.cast(int_layernorm(o, r2, self.ln_out), "int8" if self.out_bits == 8 else "int32")


class IntegerEncoder(nn.Module):
    """Shared plumbing of the integer models: three ways to run ``run(o, *integer_inputs)``."""

    def __init__(self, recipe: str, calibration: list):
        super().__init__()
        if not calibration:
            raise ValueError(
                f"{type(self).__name__} needs at least one calibration batch to fix its integer scales; got none"
            )
        if recipe not in RECIPES:
            raise ValueError(f"recipe {recipe!r}: choose one of {sorted(RECIPES)}")
        self.recipe = recipe

    def integer_forward(self, *inputs, fused: bool = True):
        """Integer inputs to integer outputs with integer tensors only (the deployed computation); ``fused``
        runs requantization, softmax, LayerNorm and GELU as C++ passes, the same integers either way."""
        return self.run(TorchBackend(fused=fused), *inputs)

    def simulate_integer(self, *inputs):
        """The same integers computed in float64 (equal to ``integer_forward`` bit for bit)."""
        return self.run(TorchBackend(simulate=True), *[i.double() if i.is_floating_point() else i for i in inputs])


def _onnx_model(o: OnnxBackend, inputs, outputs, name: str, opset: int = 18):
    import onnx
    from onnx import helper

    graph = helper.make_graph(o.nodes, name, inputs, outputs, o.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lowbit")
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model


# --- ViT ------------------------------------------------------------------------------------------------------------


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin


def _projections(a: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """q, k, v, out of an attention: explicit projections (``q_proj`` ...) or ``nn.MultiheadAttention``'s packed one."""
    if hasattr(a, "q_proj"):
        return a.q_proj, a.k_proj, a.v_proj, a.out_proj
    if getattr(a, "in_proj_weight", None) is None or a.bias_k is not None or a.add_zero_attn:
        raise ValueError("integer_vit needs plain q/k/v projections (no separate kdim/vdim, bias_kv or zero_attn)")
    bias = a.in_proj_bias.chunk(3) if a.in_proj_bias is not None else (None, None, None)
    q, k, v = (_linear(w, b) for w, b in zip(a.in_proj_weight.chunk(3), bias))
    return q, k, v, a.out_proj


def vit_parts(model: nn.Module) -> list[EncoderLayerParts]:
    """The encoder layers of a ``ViTCifar`` (PyTorch ``nn.TransformerEncoderLayer``s, explicit or not)."""
    parts = []
    for layer in model.transformer.layers:
        if not all(hasattr(layer, n) for n in ("self_attn", "linear1", "linear2", "norm1", "norm2", "activation")):
            raise TypeError(
                f"integer_vit takes nn.TransformerEncoderLayer encoder layers; found {type(layer).__name__}"
            )
        act = layer.activation
        if act is F.relu or act is torch.relu:
            act = nn.ReLU()
        elif act is F.gelu:
            act = nn.GELU()
        kind = (
            "relu"
            if isinstance(act, nn.ReLU)
            else "gelu"
            if isinstance(act, nn.GELU) and act.approximate == "none"
            else None
        )
        if kind is None:
            raise ValueError(f"activation {act!r} has no integer form here; ReLU and exact GELU do")
        a = layer.self_attn
        parts.append(
            EncoderLayerParts(
                *_projections(a),
                layer.linear1,
                layer.linear2,
                layer.norm1,
                layer.norm2,
                a.num_heads,
                kind,
                layer.norm_first,
            )
        )
    return parts


@dataclass
class ViTParts:
    """A ViT's float pieces: patch conv, class token and position table, encoder layers, the LayerNorm the
    class token passes last and the classifier."""

    conv: nn.Conv2d
    cls: torch.Tensor  # [1, 1, E]
    pos: torch.Tensor  # [1, T, E]
    layers: list[EncoderLayerParts]
    final_ln: nn.LayerNorm
    head: nn.Linear
    image_size: int


def hf_vit_parts(model: nn.Module) -> ViTParts:
    """A transformers ``ViTForImageClassification`` (pre-norm layers, exact GELU), explicit or not."""
    cfg = model.config
    if getattr(cfg, "model_type", "") != "vit" or not hasattr(model, "classifier"):
        raise ValueError(
            f"integer_vit takes a CIFAR ViTCifar or a transformers ViTForImageClassification; got "
            f"{type(model).__name__} (DeiT's distillation token has no integer path here)"
        )
    if cfg.hidden_act != "gelu":
        raise ValueError(f"hidden_act {cfg.hidden_act!r} has no integer form here; gelu (exact) does")
    emb = model.vit.embeddings
    layers = []
    for layer in model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer:
        a = layer.attention
        q, k, v, o = (getattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        layers.append(EncoderLayerParts(q, k, v, o, layer.mlp.fc1, layer.mlp.fc2, layer.layernorm_before,
                                        layer.layernorm_after, cfg.num_attention_heads, "gelu", True))  # fmt: skip
    return ViTParts(emb.patch_embeddings.projection, emb.cls_token, emb.position_embeddings, layers,
                    model.vit.layernorm, model.classifier, cfg.image_size)  # fmt: skip


def describe_vit(model: nn.Module) -> ViTParts:
    if hasattr(model, "patch_embed") and hasattr(model, "mlp_head"):  # lowbit's CIFAR ViT
        return ViTParts(model.patch_embed.proj, model.cls_token, model.pos_embed, vit_parts(model),
                        model.mlp_head[0], model.mlp_head[1], model.image_size)  # fmt: skip
    return hf_vit_parts(model)


class IntegerViT(IntegerEncoder):
    """A ViT (lowbit's CIFAR ViT, post-norm; transformers' ViT, pre-norm) in integers: image codes (int8) in,
    logit codes (int32, 16-bit) out."""

    def __init__(self, model: nn.Module, images: list[torch.Tensor], recipe: str = "ivit"):
        super().__init__(recipe, images)
        vp = describe_vit(model)
        parts = vp.layers
        r = Ranges()
        conv = vp.conv
        self.patch = conv.kernel_size[0]
        if conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError("integer_vit needs non-overlapping square patches (kernel = stride, no padding)")
        with torch.no_grad():
            for x in images:
                r("image", x)
                tokens = conv(x).flatten(2).transpose(1, 2)  # [N, P, E]
                tokens = torch.cat([vp.cls.expand(len(tokens), -1, -1), tokens], 1) + vp.pos
                r("embed", tokens)
                for i, p in enumerate(parts):
                    tokens = float_layer(p, tokens, r, f"layer{i}")
                head = r("head.ln", vp.final_ln(tokens[:, 0]))
                r("logits", vp.head(head))
        self.image_scale = r.scale("image", ACT_MAX)
        s_e = r.scale("embed", RES_MAX)
        w = conv.weight.detach().reshape(conv.out_channels, -1)  # [E, C*p*p], (c, i, j) order
        self.side = vp.image_size // self.patch
        self.embed = IntLinear(_linear(w, conv.bias), self.image_scale)
        self.embed_res = self.embed.requant(s_e, RESIDUAL_BITS)
        pos = vp.pos.detach()[0].double()  # [T, E]
        self.register_buffer("pos", torch.round(pos[1:] / s_e).to(torch.int64))
        self.register_buffer("cls", torch.round((vp.cls.detach()[0].double() + pos[:1]) / s_e).to(torch.int64))
        layers, scale, bits = [], s_e, RESIDUAL_BITS
        for i, p in enumerate(parts):  # the last post-norm layer writes 16 bits: the head LayerNorm needs one scale
            layer = IntEncoderLayer(
                p, r, f"layer{i}", scale, bits, recipe, out_bits=RESIDUAL_BITS if i == len(parts) - 1 else 8
            )
            layers.append(layer)
            scale, bits = layer.out_scale, layer.out_bits
        self.layers = nn.ModuleList(layers)
        ln, lin = vp.final_ln, vp.head
        s_head = r.channel_scale("head.ln", ACT_MAX)
        self.head_ln = LayerNormConstants.make(ln, scale, s_head, in_bits=bits)
        self.head = IntLinear(lin, s_head)
        self.logit_scale = r.scale("logits", RES_MAX)
        self.logits = self.head.requant(self.logit_scale, RESIDUAL_BITS)

    def quantize_input(self, images: torch.Tensor) -> torch.Tensor:
        return torch.round(images / self.image_scale).clamp(-ACT_MAX, ACT_MAX).to(torch.int8)

    def run(self, o, codes):
        p, side = self.patch, self.side
        x = o.reshape(codes, [0, 0, side, p, side, p])
        x = o.reshape(o.permute(x, [0, 2, 4, 1, 3, 5]), [0, side * side, -1])  # [N, P, C*p*p]
        tokens = o.add(self.embed_res(o, self.embed.acc(o, x)), o.const(self.pos))
        first = o.slice(tokens, 1, 0, 1)
        x = o.concat([o.add(o.mul(first, 0), o.const(self.cls)), tokens], 1)
        for layer in self.layers:
            x = layer.run(o, x)
        h = int_layernorm(o, o.slice(x, 1, 0, 1), self.head_ln)
        out = self.logits(o, self.head.acc(o, o.cast(h, "int8")))
        return o.cast(o.reshape(out, [0, -1]), "int32")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float) of normalised images ``[N, C, H, W]``: quantize, integers throughout, dequantize."""
        self._check(images)
        return self.integer_forward(self.quantize_input(images)).float() * self.logit_scale

    def _check(self, images: torch.Tensor) -> None:
        size = self.side * self.patch
        if images.dim() != 4 or images.shape[-2:] != (size, size):
            raise ValueError(f"the integer ViT takes [N, C, {size}, {size}] images; got shape {tuple(images.shape)}")

    def simulate(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.simulate_integer(self.quantize_input(images).double()).float() * self.logit_scale

    def export_onnx(self, path: str | Path) -> Path:
        """An ONNX model ``images`` (float, [N, C, H, W]) -> ``logits``: quantize, integer ops, dequantize."""
        import onnx
        from onnx import TensorProto, helper

        o = OnnxBackend()
        size, channels = self.side * self.patch, self.embed.wt.shape[0] // self.patch**2
        scaled = o.node("Div", ["images", o.const(torch.tensor(self.image_scale, dtype=torch.float32))], "float")
        clipped = o.node(
            "Clip",
            [
                o.node("Round", [scaled], "float"),
                o.const(torch.tensor(-ACT_MAX, dtype=torch.float32)),
                o.const(torch.tensor(ACT_MAX, dtype=torch.float32)),
            ],
            "float",
        )
        out = self.run(o, o.cast(clipped, "int8"))
        o.node("Mul", [o.cast(out, "float"), o.const(torch.tensor(self.logit_scale, dtype=torch.float32))], "float")
        o.nodes[-1].output[0] = "logits"
        model = _onnx_model(
            o,
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", channels, size, size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])],
            f"lowbit_{self.recipe}_vit",
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, path)
        return path


def integer_vit(model: nn.Module, images: list[torch.Tensor], recipe: str = "ivit") -> IntegerViT:
    """An integer-only copy of a CIFAR ``ViTCifar`` or a transformers ``ViTForImageClassification``,
    calibrated on the (normalised) image batches ``images``."""
    return IntegerViT(model, images, recipe).eval()


# --- BERT -----------------------------------------------------------------------------------------------------------


def bert_parts(model: nn.Module) -> list[EncoderLayerParts]:
    """The layers of a Hugging Face ``BertModel`` (BERT, RoBERTa layouts), post-norm."""
    act = getattr(model.config, "hidden_act", None)
    if act not in ("gelu", "relu"):
        raise ValueError(f"hidden_act {act!r} has no integer form here; gelu (exact) and relu do")
    parts = []
    for layer in model.encoder.layer:
        a = layer.attention
        parts.append(
            EncoderLayerParts(
                a.self.query,
                a.self.key,
                a.self.value,
                a.output.dense,
                layer.intermediate.dense,
                layer.output.dense,
                a.output.LayerNorm,
                layer.output.LayerNorm,
                model.config.num_attention_heads,
                act,
                False,
            )
        )
    return parts


class IntegerBert(IntegerEncoder):
    """A BERT encoder in integers: ``input_ids``/``attention_mask`` in, hidden-state codes (int32, 16-bit) out."""

    def __init__(self, model: nn.Module, batches: list[dict], recipe: str = "ibert"):
        super().__init__(recipe, batches)
        parts = bert_parts(model)
        emb = model.embeddings
        r = Ranges()
        with torch.no_grad():
            for b in batches:
                ids, keep = b["input_ids"], b["attention_mask"]
                pos = torch.arange(ids.shape[1])
                e = emb.word_embeddings(ids) + emb.position_embeddings(pos)[None] + emb.token_type_embeddings.weight[0]
                tok = keep[..., None].to(e.dtype)
                r("embed", e, tok)
                x = r("embed.ln", emb.LayerNorm(e), tok)
                for i, p in enumerate(parts):
                    x = float_layer(p, x, r, f"layer{i}", keep)
        s_e = r.scale("embed", RES_MAX)
        # the three tables at the embedding sum's scale, 16-bit; token type 0 folded into the position table
        self.register_buffer(
            "word",
            torch.round(emb.word_embeddings.weight.detach().double() / s_e).clamp(-RES_MAX, RES_MAX).to(torch.int16),
        )
        types = emb.token_type_embeddings.weight.detach().double()
        pos = emb.position_embeddings.weight.detach().double() + types[0]
        self.register_buffer("position", torch.round(pos / s_e).clamp(-RES_MAX, RES_MAX).to(torch.int16))
        self.register_buffer(
            "token_type", torch.round((types - types[0]) / s_e).clamp(-RES_MAX, RES_MAX).to(torch.int16)
        )
        s_x = r.scale("embed.ln", ACT_MAX)
        self.embed_ln = LayerNormConstants.make(emb.LayerNorm, s_e, s_x)
        layers, scale, bits = [], s_x, 8
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            layer = IntEncoderLayer(p, r, f"layer{i}", scale, bits, recipe, out_bits=RESIDUAL_BITS if last else 8)
            layers.append(layer)
            scale, bits = layer.out_scale, layer.out_bits
        self.layers = nn.ModuleList(layers)
        self.out_scale = scale

    def run(self, o, ids, keep, types=None):
        e = o.add(o.gather(o.const(self.word), ids), o.gather(o.const(self.position), o.positions(ids)))
        if types is not None:
            e = o.add(e, o.gather(o.const(self.token_type), types))
        x = o.cast(int_layernorm(o, o.clamp(e, -RES_MAX, RES_MAX), self.embed_ln), "int8")
        key_keep = o.reshape(keep, [0, 1, 1, -1])
        for layer in self.layers:
            x = layer.run(o, x, key_keep)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """``.last_hidden_state`` (float ``[N, T, E]``), as a transformers encoder returns it."""
        inputs = self._inputs(input_ids, attention_mask, token_type_ids)
        return EncoderOutput(self.integer_forward(*inputs).float() * self.out_scale)

    def simulate(self, input_ids: torch.Tensor, attention_mask=None, token_type_ids=None) -> EncoderOutput:
        """``forward`` computed on the float64 simulation (equal to it)."""
        return EncoderOutput(
            self.simulate_integer(*self._inputs(input_ids, attention_mask, token_type_ids)).float() * self.out_scale
        )

    def _inputs(self, ids, keep, types) -> tuple:
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"input_ids must be integer [N, T]; got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.shape[1] > len(self.position):
            raise ValueError(f"{ids.shape[1]} tokens, but the model has {len(self.position)} positions")
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.word)):
            raise ValueError(
                f"token ids must lie in [0, {len(self.word)}); got [{ids.min().item()}, {ids.max().item()}]"
            )
        keep = torch.ones_like(ids) if keep is None else keep
        if keep.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(keep.shape)}; input_ids {tuple(ids.shape)}")
        if types is not None and (types.shape != ids.shape or types.min() < 0 or types.max() >= len(self.token_type)):
            raise ValueError(f"token_type_ids must match input_ids' shape and lie in [0, {len(self.token_type)})")
        return (ids, keep) if types is None or not types.any() else (ids, keep, types)

    def export_onnx(self, path: str | Path) -> Path:
        """An ONNX model ``input_ids``, ``attention_mask`` (int64, [N, T]) -> ``last_hidden_state`` (float)."""
        import onnx
        from onnx import TensorProto, helper

        o = OnnxBackend()
        ids, keep = OnnxValue("input_ids", "int64"), OnnxValue("attention_mask", "int64")
        out = self.run(o, ids, keep)
        o.node("Mul", [o.cast(out, "float"), o.const(torch.tensor(self.out_scale, dtype=torch.float32))], "float")
        o.nodes[-1].output[0] = "last_hidden_state"
        model = _onnx_model(
            o,
            [
                helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"])
                for n in ("input_ids", "attention_mask")
            ],
            [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "tokens", None])],
            f"lowbit_{self.recipe}_bert",
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, path)
        return path


def integer_bert(model: nn.Module, batches: list[dict], recipe: str = "ibert") -> IntegerBert:
    """An integer-only copy of a Hugging Face ``BertModel``, calibrated on tokenized ``batches``
    (dicts with ``input_ids`` and ``attention_mask``)."""
    return IntegerBert(model, batches, recipe).eval()
