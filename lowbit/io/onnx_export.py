"""ONNX with QuantizeLinear/DequantizeLinear (QDQ) nodes, for ONNX Runtime: encoders
(BERT family) with weight-only int8 linears.

Each quantized linear becomes ``DequantizeLinear(W_q, scale, zero, axis=0)`` ->
``Transpose`` -> ``MatMul`` -> ``Add``: the weights travel as 8-bit integers with
one scale (and, for asymmetric weights, one uint8 zero point) per output row,
exactly lowbit's codes. The graph's input is ``input_ids`` and
``attention_mask``, its output ``last_hidden_state``.

W8A8 graphs (QDQ on activations too) need activation quantization, which lowbit
does not have yet; they are refused with that reason.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.io.native import atomic_directory, copy_tokenizer
from lowbit.models.adapters import set_module
from lowbit.nn.qlinear import QLinear


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
        codes = qw.codes()
        if qw.fmt.symmetric:  # signed codes with a zero point of 0
            self.register_buffer("codes", (codes.to(torch.int16) - 128).to(torch.int8))
            self.register_buffer("zero", torch.zeros(qw.shape[0], dtype=torch.int8))
        else:
            self.register_buffer("codes", codes)
            self.register_buffer("zero", qw.zero.reshape(-1).clone())
        self.register_buffer("scale", qw.scale.float().reshape(-1))
        bias = q.bias.detach() if q.bias is not None else torch.zeros(qw.shape[0])
        self.register_buffer("bias", bias.float())

    def forward(self, x):
        return _QDQLinear.apply(x, self.codes, self.scale, self.zero, self.bias)


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
            problems.append(f"{name}: {m.fmt.describe()} (the QDQ export writes 8-bit per-channel weights)")
        elif not bool(torch.isfinite(m.scales.float()).all()) or bool((m.scales == 0).any()):
            problems.append(f"{name}: NaN, Inf or zero scales")
    if problems:
        raise ValueError("cannot write ONNX QDQ: " + "; ".join(problems))


def export_onnx(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, opset: int = 17) -> Path:
    check_exportable(model)
    graph = copy.deepcopy(model).eval()
    for name, m in list(graph.named_modules()):
        if isinstance(m, QLinear):
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
