"""ONNX with QuantizeLinear/DequantizeLinear (QDQ) nodes, for ONNX Runtime: encoders
(BERT family) with int8 weights, and int8 activations (W8A8).

Each quantized linear becomes ``DequantizeLinear(W_q, scale, zero, axis=0)`` ->
``Transpose`` -> ``MatMul`` -> ``Add``: the weights travel as 8-bit integers with
one scale (and, for asymmetric weights, one uint8 zero point) per output row,
exactly lowbit's codes; an act-order layer's (``QLinear.in_perm``) code columns
are put back in input order, which one scale per row allows exactly. With
integer activations the input first passes ``QuantizeLinear`` ->
``DequantizeLinear`` with lowbit's static scale (int8 symmetric or uint8 with a
zero point, saturating as lowbit does); per-group
scales (PEG, RPTQ) become per-channel scales along the last axis; a shift or
scale the layer applies itself becomes ``Sub``/``Mul`` before it; dynamic
per-tensor asymmetric activations use ``DynamicQuantizeLinear``, whose formula
is lowbit's, feeding ``MatMulInteger`` (the pattern ONNX Runtime's own dynamic
quantizer writes; its QDQ form would be rewritten by ONNX Runtime into a kernel
that requantizes activations per block). Refused, with the reason: per-token dynamic scales (no QDQ form),
per-group activation scales (PEG, RPTQ: valid QDQ, but ONNX Runtime's fused
integer MatMul fails on them at run time), LLM.int8()'s decomposition and
activations of other widths.

Integer activations make whole-model outputs sensitive to the last bit: a 1e-6
difference in float summation order moves a value across a rounding boundary now
and then, and that flip propagates. Each exported layer computes what lowbit's
layer computes (to float rounding); whole encoders agree as two W8A8 runs do. The graph's input
is ``input_ids`` and ``attention_mask``, its output ``last_hidden_state``.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.io import model_card
from lowbit.io.native import atomic_directory, copy_tokenizer
from lowbit.models.adapters import set_module
from lowbit.nn.qlinear import QLinear
from lowbit.nn.w8a8 import W8A8Linear


class _QDQLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias):
        w = (codes.float() - zero.float()[:, None]) * scale[:, None]
        return x @ w.t() + bias

    @staticmethod
    def symbolic(g, x, codes, scale, zero, bias):
        w = g.op("DequantizeLinear", codes, scale, zero, axis_i=0)
        y = g.op("MatMul", x, g.op("Transpose", w, perm_i=[1, 0]))
        return g.op("Add", y, bias)


class QDQLinear(nn.Module):
    """The export-time stand-in for a QLinear: 8-bit codes as int8 (symmetric) or uint8."""

    def __init__(self, q: QLinear):
        super().__init__()
        qw = q.quantized_weight
        if qw.outliers is not None or qw.lowrank is not None or qw.residual is not None:
            raise ValueError("ONNX export: a layer keeps fp16 weights beside its codes (outliers or a low-rank "
                             "term), which "
                             "DequantizeLinear cannot express; keep lowbit's own checkpoint")  # fmt: skip
        codes = qw.codes()
        if qw.fmt.symmetric:  # signed codes with a zero point of 0
            self.register_buffer("codes", (codes.to(torch.int16) - 128).to(torch.int8))
            self.register_buffer("zero", torch.zeros(qw.shape[0], dtype=torch.int8))
        else:
            self.register_buffer("codes", codes)
            self.register_buffer("zero", qw.zero.reshape(-1).clone())
        if q.in_perm is not None:  # act-order: stored column j is input in_perm[j]; one scale per row, so exact
            unpermuted = torch.empty_like(self.codes)
            unpermuted[:, q.in_perm.cpu()] = self.codes
            self.codes = unpermuted
        self.register_buffer("scale", qw.scale.float().reshape(-1))
        bias = q.bias.detach() if q.bias is not None else torch.zeros(qw.shape[0])
        self.register_buffer("bias", bias.float())

    def forward(self, x):
        return _QDQLinear.apply(x, self.codes, self.scale, self.zero, self.bias)


class _QDQActLinear(torch.autograd.Function):
    """Activations quantized and dequantized (as lowbit does), then the weight-only QDQ linear."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias, a_scale, a_zero, shift, inv, lo, hi, dynamic):
        v = x
        if shift.numel():
            v = v - shift
        if inv.numel():
            v = v * inv
        if dynamic:  # per tensor, asymmetric: DynamicQuantizeLinear's formula
            top = float(hi)
            s = (torch.clamp(v.max(), min=0) - torch.clamp(v.min(), max=0)) / top
            z = torch.clamp(torch.round(-torch.clamp(v.min(), max=0) / s), 0, top)
            q = torch.clamp(torch.round(v / s) + z, 0, top)
            vq = (q - z) * s
        else:
            vq = (torch.clamp(torch.round(v / a_scale) + a_zero.float(), lo, hi) - a_zero.float()) * a_scale
        w = (codes.float() - zero.float()[:, None]) * scale[:, None]
        return vq @ w.t() + bias

    @staticmethod
    def symbolic(g, x, codes, scale, zero, bias, a_scale, a_zero, shift, inv, lo, hi, dynamic):
        v = x
        if _nonempty(shift):
            v = g.op("Sub", v, shift)
        if _nonempty(inv):
            v = g.op("Mul", v, inv)
        if dynamic:  # ONNX Runtime's own dynamic pattern: exact int32 sums of uint8 x uint8
            q, s, z = g.op("DynamicQuantizeLinear", v, outputs=3)
            acc = g.op("MatMulInteger", q, g.op("Transpose", codes, perm_i=[1, 0]), z, zero)
            y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", s, scale))  # to_i=1: float
            return g.op("Add", y, bias)
        else:
            vq = g.op("DequantizeLinear", g.op("QuantizeLinear", v, a_scale, a_zero), a_scale, a_zero)
        w = g.op("DequantizeLinear", codes, scale, zero, axis_i=0)
        y = g.op("MatMul", vq, g.op("Transpose", w, perm_i=[1, 0]))
        return g.op("Add", y, bias)


def _nonempty(value) -> bool:
    """Whether a traced graph input holds any values (empty stand-ins mark absent options)."""
    shape = value.type().sizes() if hasattr(value.type(), "sizes") else None
    return bool(shape) and all(d != 0 for d in shape)


class QDQActLinear(QDQLinear):
    """The export-time stand-in for a W8A8Linear with 8-bit activations."""

    def __init__(self, q: W8A8Linear):
        super().__init__(q)
        act = q.act
        self.dynamic = act.dynamic
        self.lo, self.hi = act.code_range
        zero_dtype = torch.int8 if act.symmetric else torch.uint8
        if act.dynamic:
            a_scale, a_zero = torch.ones(()), torch.zeros((), dtype=zero_dtype)
        else:
            a_scale, a_zero = q.act_scale.reshape(()).float(), q.act_zero.reshape(()).to(zero_dtype)
        self.register_buffer("a_scale", a_scale)
        self.register_buffer("a_zero", a_zero)
        self.register_buffer("shift", q.input_shift.clone() if q.input_shift is not None else torch.empty(0))
        self.register_buffer("inv", q.input_scale.clone() if q.input_scale is not None else torch.empty(0))
        if not act.symmetric and self.codes.dtype == torch.int8:
            # uint8 activations times int8 weights is the U8S8 product that ONNX Runtime's AVX2 integer
            # kernels compute with saturating 16-bit pair sums (wrong on machines without VNNI); the same
            # weights as uint8 with a zero point of 128 take its exact U8U8 path.
            self.codes = (self.codes.to(torch.int16) + 128).to(torch.uint8)
            self.zero = torch.full_like(self.zero, 128, dtype=torch.uint8)
        if q.perm is not None:  # lowbit stores the weight's columns in the permuted order; the graph reads inputs unpermuted
            self.codes = self.codes[:, torch.argsort(q.perm)].contiguous()

    def forward(self, x):
        return _QDQActLinear.apply(x, self.codes, self.scale, self.zero, self.bias, self.a_scale, self.a_zero,
                                   self.shift, self.inv, self.lo, self.hi, self.dynamic)  # fmt: skip


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def check_exportable(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "model_type", None) not in ("bert", "roberta"):
        raise ValueError("ONNX export supports BERT-family encoders (config.model_type bert or roberta)")
    problems = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers; quantize it (8-bit per-channel) before exporting")
    for name, m in layers:
        if m.fmt.kind != "int" or m.fmt.bits != 8 or m.scales.shape[1] != 1:
            problems.append(f"{name}: {m.describe()} (the QDQ export writes 8-bit per-channel weights)")
        elif not bool(torch.isfinite(m.scales.float()).all()) or bool((m.scales == 0).any()):
            problems.append(f"{name}: NaN, Inf or zero scales")
        if isinstance(m, W8A8Linear):
            problem = _act_problem(m)
            if problem:
                problems.append(f"{name}: {problem}")
    if problems:
        raise ValueError("cannot write ONNX QDQ: " + "; ".join(problems))


def _act_problem(m: W8A8Linear) -> str | None:
    act = m.act
    if m.outlier_threshold is not None:
        return "LLM.int8()'s mixed-precision decomposition has no QDQ form"
    if act.bits != 8:
        return f"{act.describe()} (QuantizeLinear carries 8-bit activations)"
    if act.granularity == "token":
        return "per-token dynamic activations have no QDQ form; quantize with act_granularity='tensor'"
    if act.granularity == "group":  # valid QDQ, but ONNX Runtime's fused integer MatMul rejects it at run time
        return "per-group activation scales (PEG, RPTQ): ONNX Runtime's integer MatMul takes one activation scale"
    if act.dynamic and act.symmetric:
        return "dynamic per-tensor activations must be asymmetric (DynamicQuantizeLinear is uint8)"
    if not act.dynamic and not bool(torch.isfinite(m.act_scale).all() and (m.act_scale > 0).all()):
        return "NaN, Inf or zero activation scales"
    return None


def export_onnx(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, opset: int = 17) -> Path:
    check_exportable(model)
    graph = copy.deepcopy(model).eval()
    for name, m in list(graph.named_modules()):
        if isinstance(m, W8A8Linear):
            set_module(graph, name, QDQActLinear(m))
        elif isinstance(m, QLinear):
            set_module(graph, name, QDQLinear(m))
    # a padded example, so that tracing keeps the attention-mask path (all-ones masks are optimised away)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    example = (torch.ones(2, 8, dtype=torch.long), mask)
    with atomic_directory(out_dir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Encoder(graph),
            example,
            str(tmp / "model.onnx"),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "last_hidden_state": {0: "batch", 1: "tokens"},
            },  # fmt: skip
            opset_version=opset,
        )
        copy_tokenizer(model, tokenizer, tmp)
        model_card.write(model, tmp, layout="onnx")
    return Path(out_dir)


def onnx_coverage(path: str | os.PathLike):
    """Coverage of an exported ONNX graph: weights that reach a MatMul through DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    from lowbit.coverage import Coverage, LayerRecord

    graph = onnx.load(str(Path(path) / "model.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    coverage = Coverage()
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            codes = numpy_helper.to_array(inits[node.input[0]])
            extra = sum(numpy_helper.to_array(inits[i]).nbytes for i in node.input[1:] if i in inits)
            bpw = (codes.nbytes + extra) * 8 / codes.size
            coverage.add(LayerRecord(node.input[0], "DequantizeLinear", "quantized", "", True, "int8 per-channel",
                                     bpw, int(codes.size), "onnx qdq"))  # fmt: skip
    return coverage
