"""Post-training quantization of convolutional networks (and any module of convs and
linears): BatchNorm folding, per-channel integer weights, static activation
quantization, and the reconstruction methods (AdaRound layer by layer; BRECQ and
QDrop block by block), all in fake quantization.

Data flow, per unit in execution order: the unit's inputs come from the quantized
model as quantized so far (and, for QDrop, from the float model too); its target
is the float model's output of the same unit; the method fits the unit's rounding
(and activation scales) to it; the next unit then sees the result.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.coverage import Coverage, LayerRecord
from lowbit.methods import bias_correction
from lowbit.methods.adaround import ReconConfig, reconstruct
from lowbit.methods.brecq import BRECQConfig
from lowbit.methods.qdrop import QDropConfig
from lowbit.models.adapters import set_module
from lowbit.models.cnn import CnnPlan, Unit, fold_batchnorm, plan_cnn, run_chain
from lowbit.nn.fakequant import ActQuantizer, ActSite, QuantLayer

ACT_CALIB_IMAGES = 512  # per activation site: ranges settle well before (millions of values)
CNN_METHODS = ("rtn", "bias_correction", "adaround", "brecq", "qdrop")


class _Stop(Exception):
    pass


@dataclass
class CnnResult:
    model: nn.Module
    coverage: Coverage
    plan: CnnPlan
    seconds: float
    log: list[dict] = field(default_factory=list)


def _batches(x: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i : i + size]


def _unit_inputs(model: nn.Module, images: torch.Tensor, first: str, batch: int = 256) -> torch.Tensor:
    """The inputs module ``first`` receives over ``images`` (each forward stops there)."""
    ins = []

    def stop(m, a):
        ins.append(a[0].detach())
        raise _Stop

    hook = model.get_submodule(first).register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for xb in _batches(images, batch):
                try:
                    model(xb)
                except _Stop:
                    pass
    finally:
        hook.remove()
    return torch.cat(ins)


def _wrap(model: nn.Module, plan: CnnPlan, bits: int, act_bits: int | None, first_last_bits: int | None,
          observer: str, search: bool) -> dict[str, QuantLayer]:  # fmt: skip
    """Swap in QuantLayers and activation quantizers, in place."""
    ends = {plan.layers[0], plan.layers[-1]} if plan.layers else set()
    layers = {}
    for name in plan.layers:
        b = first_last_bits if (first_last_bits and name in ends) else bits
        inq = None
        if act_bits is not None and name in plan.input_sites:
            ab = first_last_bits if (first_last_bits and name in ends) else act_bits
            inq = ActQuantizer(ab, observer)
        q = QuantLayer(model.get_submodule(name), b, search, inq)
        set_module(model, name, q)
        layers[name] = q
    if act_bits is not None:
        for name in plan.act_sites:
            set_module(model, name, ActSite(model.get_submodule(name), ActQuantizer(act_bits, observer)))
    return layers


def act_quantizers(module: nn.Module) -> list[ActQuantizer]:
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


def calibrate_acts(model: nn.Module, images: torch.Tensor, batch: int = 256) -> None:
    """Static ranges, site by site in execution order: each quantizer observes its input
    with every quantizer before it already quantizing, as the deployed model will."""
    quants = act_quantizers(model)
    order: list[ActQuantizer] = []
    hooks = [q.register_forward_pre_hook(lambda m, a: (order.append(m) if m not in order else None))
             for q in quants]  # fmt: skip
    for q in quants:
        q.observing = q.enabled = False
    try:
        with torch.no_grad():
            model(images[:2])
    finally:
        for h in hooks:
            h.remove()
    images = images[:ACT_CALIB_IMAGES]
    for q in order:
        q.observe()
        with torch.no_grad():
            for xb in _batches(images, batch):
                try:
                    h = q.register_forward_hook(_raise_stop)
                    model(xb)
                except _Stop:
                    pass
                finally:
                    h.remove()
        q.finish_observing()


def _raise_stop(*_):
    raise _Stop


def _set_acts(model: nn.Module, on: bool) -> None:
    for q in act_quantizers(model):
        q.enabled = on and not q.observing


def quantize_cnn(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "rtn",
    bits: int = 4,
    act_bits: int | None = 8,
    first_last_bits: int | None = 8,
    observer: str = "mse",
    recon: ReconConfig | None = None,
    skip: tuple[str, ...] = (),
    search: bool = True,
    progress: bool = False,
) -> CnnResult:
    """Quantize a copy of ``model`` with ``method`` on calibration ``images``.

    ``bits``/``act_bits``: weights and activations (``act_bits=None`` keeps activations
    float). ``first_last_bits``: the first and last layers' weights and input activations
    (8 as in the papers; ``None`` treats them like the rest). ``recon``: iterations,
    learning rates and the like of the reconstruction methods.
    """
    if method not in CNN_METHODS:
        raise ValueError(f"unknown CNN method {method!r}; choose one of {', '.join(CNN_METHODS)}")
    if images.dim() != 4 or not torch.isfinite(images).all():
        raise ValueError("calibration images must be a finite [N, C, H, W] tensor")
    t0 = time.perf_counter()
    fp = copy.deepcopy(model).eval().requires_grad_(False)
    example = images[:2]
    pairs = fold_batchnorm(fp, example)
    for name, p in fp.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"{name} holds NaN or Inf")
    plan = plan_cnn(fp, example, skip)
    plan.bn_pairs = pairs
    if not plan.layers:
        raise ValueError("found no conv or linear layer to quantize")
    q = copy.deepcopy(fp)
    layers = _wrap(q, plan, bits, act_bits, first_last_bits, observer, search)
    cfg = recon or {"brecq": BRECQConfig(), "qdrop": QDropConfig()}.get(method, ReconConfig())
    log: list[dict] = []
    bar = _progress(progress, method)

    if method in ("adaround", "brecq"):  # weights first, activations off (and fitted after)
        _set_acts(q, False)
        units = [Unit(n, [n]) for n in plan.layers] if method == "adaround" else plan.units
        _reconstruct_units(fp, q, units, images, cfg, log, bar, learn_acts=False, fisher=method == "brecq" and cfg.fisher)
    if method == "bias_correction":
        _bias_correct(q, plan, images, log, bar)
    if act_bits is not None:
        calibrate_acts(q, images)
    if method == "brecq" and act_bits is not None and getattr(cfg, "learn_act_scales", False):
        _reconstruct_units(fp, q, plan.units, images, cfg, log, bar, learn_acts=True, learn_rounding=False,
                           fisher=cfg.fisher)  # fmt: skip
    if method == "qdrop":
        _reconstruct_units(fp, q, plan.units, images, cfg, log, bar, learn_acts=act_bits is not None,
                           fisher=cfg.fisher, drop=True)  # fmt: skip
    if bar is not None:
        bar.close()
    q.eval()
    coverage = _coverage(q, plan, layers, method)
    return CnnResult(q, coverage, plan, time.perf_counter() - t0, log)


def _progress(on: bool, method: str):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=f"lowbit {method}", unit="unit")


def _float_units(fp: nn.Module, images: torch.Tensor, units: list[Unit], grads: bool, batch: int = 256) -> dict:
    """Every unit's float input, output and (with ``grads``) Fisher weight, from one pass over ``images``:
    the float model never changes, so one forward (and backward) serves all units."""
    store = {u.name: ([], [], []) for u in units}
    held: dict[str, torch.Tensor] = {}
    hooks = []
    for u in units:
        ins, outs, _ = store[u.name]
        hooks.append(fp.get_submodule(u.modules[0]).register_forward_pre_hook(
            lambda m, a, ins=ins: ins.append(a[0].detach()) and None))  # fmt: skip

        def out_hook(m, a, o, outs=outs, name=u.name):
            outs.append(o.detach())
            if grads:
                o.retain_grad()
                held[name] = o

        hooks.append(fp.get_submodule(u.modules[-1]).register_forward_hook(out_hook))
    try:
        for xb in _batches(images, batch):
            if grads:
                with torch.enable_grad():
                    logits = fp(xb.clone().requires_grad_(True))
                    nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
                for name, o in held.items():
                    store[name][2].append(o.grad.detach() if o.grad is not None else torch.zeros_like(o))
                held.clear()
            else:
                with torch.no_grad():
                    fp(xb)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, (ins, outs, gs) in store.items():
        weight = None
        if gs:
            weight = torch.cat(gs).pow(2)
            weight = weight / weight.mean().clamp(min=1e-30)  # mean 1: the regulariser keeps its weight
        result[name] = (torch.cat(ins), torch.cat(outs), weight)
    return result


def _reconstruct_units(fp, q, units, images, cfg, log, bar, learn_acts, fisher, learn_rounding=True, drop=False):
    floats = _float_units(fp, images, units, grads=fisher)
    for unit in units:
        layers = [m for n in unit.modules for m in q.get_submodule(n).modules() if isinstance(m, QuantLayer)]
        acts = [a for n in unit.modules for a in act_quantizers(q.get_submodule(n))]
        if not layers and not (learn_acts and acts):
            continue
        x_fp, target, weight = floats.pop(unit.name)
        x_q = _unit_inputs(q, images, unit.modules[0])
        run = _unit_runner(q, unit)
        stats = reconstruct(run, layers, acts, x_q, target, cfg, learn_rounding=learn_rounding and bool(layers),
                            learn_acts=learn_acts, x_fp=x_fp if drop else None, weight=weight)  # fmt: skip
        log.append({"unit": unit.name, **stats})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(unit.name)


def _unit_runner(model: nn.Module, unit: Unit):
    def run(x):
        return run_chain(model, unit.modules, x)

    return run


def _weight_error_means(model: nn.Module, name: str, images: torch.Tensor, batch: int = 256):
    """Per-channel output means of layer ``name`` with float and with quantized weights, both on
    the inputs ``model`` gives it (each pass stops at the layer)."""
    layer = model.get_submodule(name)
    sums = [0, 0]
    count = 0

    def hook(m, a, o):
        n = o.shape[0]
        sums[1] = sums[1] + bias_correction.channel_mean(o) * n
        layer.quantize_weight = False
        try:
            sums[0] = sums[0] + bias_correction.channel_mean(layer.forward(*a)) * n  # forward: no hooks
        finally:
            layer.quantize_weight = True
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for xb in _batches(images, batch):
                count += xb.shape[0]
                try:
                    model(xb)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return sums[0] / count, sums[1] / count


def _bias_correct(q, plan, images, log, bar) -> None:
    """Each layer in execution order, on the inputs the quantized model (as corrected so far)
    gives it: the mean output with float weights minus the mean with quantized weights."""
    for name in plan.layers:
        float_mean, quant_mean = _weight_error_means(q, name, images)
        log.append({"layer": name, "max_shift": bias_correction.correct(q.get_submodule(name), float_mean, quant_mean)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name)


def _coverage(q: nn.Module, plan: CnnPlan, layers: dict[str, QuantLayer], method: str) -> Coverage:
    coverage = Coverage()
    for name, layer in layers.items():
        act = layer.input_quant.describe() if layer.input_quant is not None else ""
        numel = layer.weight.numel()
        bpw = layer.bits + 32 * 2 / (numel / layer.weight.shape[0])  # codes + fp32 scale and zero per channel
        coverage.add(LayerRecord(name, layer.kind, "quantized", "", True, layer.describe(), bpw, numel, method, act))
    for name, why in plan.skipped.items():
        m = q.get_submodule(name)
        numel = sum(p.numel() for p in m.parameters(recurse=False))
        coverage.add(LayerRecord(name, type(m).__name__, "skipped", why, True, numel=numel))
    return coverage
