"""The public verb: ``lowbit.quantize(model, method_or_recipe, calib=..., **config)``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.coverage import Coverage, LayerRecord
from lowbit.engine.sequential import block_linears, collect_model_stats, collect_stats, execution_groups, sequential
from lowbit.methods import MethodConfig, check_recipe, parse_recipe
from lowbit.methods.transforms import input_transform
from lowbit.models.adapters import Target, adapter_for, is_linear, plan, set_module
from lowbit.nn.qlinear import QLinear, linear_weight
from lowbit.nn.w8a8 import W8A8Linear
from lowbit.observers import static_params
from lowbit.quantized_weight import QuantizedWeight, check_finite


def quantize(
    model: nn.Module,
    method_or_recipe: str | MethodConfig | list = "rtn",
    *,
    calib=None,
    tokenizer=None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    skip: list[str] | tuple[str, ...] = (),
    include_lm_head: bool = False,
    kernel: str = "auto",
    progress: bool = True,
    **config,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``method_or_recipe``: a registered name (``"rtn"``, ``"gptq"``), a
    ``+``-joined recipe (``"awq+gptq"``), a method config, or a list of them;
    ``config`` fills the configs built from names (``bits=4, group_size=128``).
    The last method of a recipe that quantizes decides the codes; the methods
    before it transform the model first.

    ``calib`` (for methods that need data): token ids ``[n, seqlen]``, a list of
    model inputs, or a text file path read with ``tokenizer`` into ``nsamples``
    random windows of ``seqlen`` tokens (``seed``). ``skip``: glob patterns of
    module names to keep in full precision. Every weight-bearing layer ends up in
    ``model.lowbit_coverage``, quantized or skipped with a reason.
    """
    methods = parse_recipe(method_or_recipe, **config)
    check_recipe(methods)
    quantizer = methods[-1]
    if not quantizer.quantizes:
        raise ValueError(f"recipe ends with {quantizer.name}, which does not quantize; add a quantizer such as rtn")
    transforms = methods[:-1]
    start = time.perf_counter()
    targets = plan(model, skip=skip, include_lm_head=include_lm_head)
    if not any(is_linear(t.module) or isinstance(t.module, QLinear) for t in targets):
        raise ValueError(f"{type(model).__name__} holds no nn.Linear layers to quantize")
    todo = [t for t in targets if t.skip is None and not isinstance(t.module, QLinear)]
    for t in todo:
        check_finite(linear_weight(t.module), f"{t.name}.weight")

    records: dict[str, LayerRecord] = {}
    batches = None
    if any(m.needs_calibration for m in methods) or quantizer.static_activations:
        batches = _calibration_batches(model, calib, tokenizer, nsamples, seqlen, seed, batch_size)
        _quantize_calibrated(model, transforms, quantizer, todo, batches, device, kernel, progress, records)
    elif transforms:
        raise ValueError(f"{'+'.join(m.name for m in methods)}: transforms need calibration data")
    fmt = quantizer.weight_format
    rest = [t for t in todo if t.name not in records]
    calibrated = any(m.needs_calibration for m in methods) or quantizer.static_activations
    stats = {}
    if calibrated and rest:  # outside the blocks: observed on whole-model passes through the quantized blocks
        modules = {t.name: t.module for t in rest}
        stats = collect_model_stats(model, batches, modules, hessian=quantizer.uses_hessian)
    for t in tqdm(rest, desc=f"{quantizer.name} {fmt.describe()}", disable=not progress or not rest, unit="layer"):
        st = stats.get(t.name)
        act, how = quantizer, quantizer.name
        if not calibrated:
            qw = quantizer.quantize_weight(linear_weight(t.module).float())
        elif st is not None and st.tokens:
            qw, how = _quantize_weight(t.module, quantizer, st), f"{quantizer.name} (after the blocks)"
        else:  # never reached by the calibration data
            qw, how = QuantizedWeight.quantize(linear_weight(t.module).float(), fmt), "rtn (not reached by calibration)"
            if quantizer.static_activations:
                act = replace(quantizer, act_granularity="token", act_dynamic=True)
                how += ", dynamic per-token activations"
        _replace(model, t, qw, kernel, records, how, act=act, stats=st)

    coverage = Coverage()
    for t in targets:
        reason = "already quantized" if isinstance(t.module, QLinear) else t.skip
        coverage.add(records.get(t.name) or LayerRecord(t.name, type(t.module).__name__, "skipped", reason, t.in_block))
    model.lowbit_coverage = coverage
    model.lowbit_recipe = [{"method": m.name, **asdict(m)} for m in methods]
    model.lowbit_seconds = time.perf_counter() - start
    return model


def _replace(root, t: Target, qw: QuantizedWeight, kernel: str, records: dict, method: str, rel=None, act=None,
             stats=None):  # fmt: skip
    new = _integer_linear(t.module, qw, act, stats) if act is not None and act.act_bits else None
    if new is None:
        new = QLinear(qw, t.module.bias, kernel)
    set_module(root, rel or t.name, new)
    records[t.name] = LayerRecord(
        t.name, type(t.module).__name__, "quantized", "", t.in_block, qw.fmt.describe(), qw.bits_per_weight,
        qw.numel, method, new.act.describe() if isinstance(new, W8A8Linear) else "",
    )  # fmt: skip


def _integer_linear(module: nn.Module, qw: QuantizedWeight, config: MethodConfig, stats) -> W8A8Linear:
    """The integer-activation linear for ``module``: its activation format, static scales from
    ``stats`` (observed after any input transform), and what earlier methods attached to it."""
    fmt = config.act_format
    perm, bounds = getattr(module, "lowbit_act_groups", (None, None))
    if bounds is not None:
        fmt = replace(fmt, granularity="group", dynamic=False)
    shift, inv_scale = input_transform(module)
    kw = {}
    if not fmt.dynamic:
        if stats is None:
            raise ValueError("static activation scales need calibration data")
        scale, zero = static_params(stats.channel_stats(), fmt, config.act_observer, perm, bounds,
                                    config.act_percentile)  # fmt: skip
        kw = dict(act_scale=scale, act_zero=zero, act_bounds=bounds)
    return W8A8Linear(qw, module.bias, fmt, perm=perm, input_shift=shift, input_scale=inv_scale,
                      outlier_threshold=getattr(config, "threshold", None), **kw)  # fmt: skip


def _quantize_weight(module: nn.Module, quantizer: MethodConfig, stats) -> QuantizedWeight:
    """Codes for ``module``'s weight, its columns in the order its activation groups put them."""
    w = linear_weight(module).float()
    perm, _ = getattr(module, "lowbit_act_groups", (None, None))
    if perm is not None:
        w = w[:, perm]
        stats = stats.permuted(perm) if stats is not None else None
    return quantizer.quantize_linear(w, stats)


def _calibration_batches(model, calib, tokenizer, nsamples, seqlen, seed, batch_size) -> list:
    from lowbit.data import calibration_windows, read_text

    if calib is None:
        raise ValueError("this recipe needs calibration data: pass calib= (token ids or a text file)")
    if isinstance(calib, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("calib is a text file: pass tokenizer= to read it")
        calib = calibration_windows(tokenizer, read_text(calib), nsamples, seqlen, seed)
    if torch.is_tensor(calib):
        if calib.dim() == 1:
            calib = calib.unsqueeze(0)
        return list(calib.split(batch_size))
    if isinstance(calib, (list, tuple)) and calib:
        return list(calib)
    raise TypeError("calib must be token ids [n, seqlen], a list of model inputs, or a text file path")


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quantize_calibrated(model, transforms, quantizer, todo, batches, device, kernel, progress, records) -> None:
    adapter = adapter_for(model)
    blocks = adapter.blocks(model) or [("", model)]
    wanted = {t.name: t for t in todo}

    def process(block_name: str, block: nn.Module, inputs, replay) -> None:
        prefix = f"{block_name}." if block_name else ""
        linears = {rel: m for rel, m in block_linears(block).items() if prefix + rel in wanted}
        for transform in [*transforms, quantizer]:
            transform.transform_block(block, inputs, adapter.scale_pairs(block), linears, quantizer)
            linears = {rel: block.get_submodule(rel) for rel in linears}
            replay.changed()
        if quantizer.true_sequential:
            groups = execution_groups(block, inputs, list(linears))
        else:
            groups = [list(linears)]
        for group in groups:
            modules = {rel: block.get_submodule(rel) for rel in group}
            stats = collect_stats(block, inputs, modules, replay, hessian=quantizer.uses_hessian)
            for rel in group:
                module = block.get_submodule(rel)
                qw = _quantize_weight(module, quantizer, stats[rel])
                t = wanted[prefix + rel]
                target = Target(t.name, module, t.in_block, None)
                _replace(block, target, qw, kernel, records, quantizer.name, rel, act=quantizer, stats=stats[rel])
            replay.changed(group)

    sequential(model, blocks, batches, _default_device(device), process, progress)
