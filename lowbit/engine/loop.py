"""The one engine loop, for every model family.

``run`` wraps the model's weighted layers in ``QModule``s (and its activation
sites in ``QSite``s), then walks the adapter's units in execution order: each
unit receives the inputs the model as quantized so far gives it (and the float
model's, for methods that ask), the recipe's transforms rewrite it exactly, the
quantizer decides its codes (and activation ranges, and learns what it learns),
and its outputs become the next unit's inputs. At the end every ``QModule`` is
frozen into its packed runtime module and every parameter of two or more
dimensions is in the coverage report.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.coverage import Coverage, LayerRecord
from lowbit.engine.capture import Inputs, capture_inputs
from lowbit.engine.unit import Unit
from lowbit.models.adapters import Adapter, SiteSpec, Target, set_module
from lowbit.nn.qmodule import QModule, QSite, frozen_act, set_quantization
from lowbit.nn.quantizers import ActQuantizer


def run(model: nn.Module, adapter: Adapter, methods: list, targets: list[Target], batches: list | None,
        device: torch.device, first_last_bits: int | None, progress: bool, kernel: str = "auto",
        checkpoint=None, onload=None) -> Coverage:  # fmt: skip
    """Quantize ``model`` in place with the recipe ``methods`` (transforms, then the quantizer).

    ``checkpoint``: a ``lowbit.engine.checkpoint.Progress``; each finished unit is recorded there,
    and the units it already holds are restored instead of recomputed. ``onload``: a
    ``lowbit.io.onload.Onload``; the model's parameters are on ``meta`` and each unit is read
    when reached, frozen and written when finished (a model larger than memory)."""
    quantizer = methods[-1]
    todo = [t for t in targets if t.skip is None]
    for m in methods:
        m.progress = progress  # a long prepare step (a sensitivity pass) shows its own bar
        m.prepare(model, adapter, batches)
    wrap(model, adapter, quantizer, todo, first_last_bits)
    specs = adapter.units(model)
    records: dict[str, LayerRecord] = {}  # the units frozen as they finish (onloading)
    if onload is not None:
        onload.check(methods)
        onload.attach(specs)
    needs_float = any(m.needs_float_inputs for m in methods)
    prev_q = prev_fp = None
    model.lowbit_log = []  # what each method recorded per unit (searched factors, metrics, skipped layers)
    bar = tqdm(specs, desc=f"lowbit {'+'.join(m.name for m in methods)}", unit="unit", disable=not progress)
    for i, spec in enumerate(bar):
        bar.set_postfix_str(spec.name)  # the unit being worked on
        upcoming = i + 1 < len(specs) and specs[i + 1].follows
        has_work = any(isinstance(m, (QModule, QSite)) for n in spec.modules for m in model.get_submodule(n).modules())
        if not has_work and not upcoming:
            prev_q = prev_fp = None
            if checkpoint is not None and i >= checkpoint.done:
                checkpoint.save(i, model, [], [])
            continue
        if onload is not None:
            if not spec.follows and batches is not None and onload.written_units:
                raise ValueError(f"onloading: {spec.name} does not take the previous unit's output, so its "
                                 "inputs need the whole model; quantize in memory, or skip it")  # fmt: skip
            onload.load(spec)  # this unit's weights, read from the source now
        home = _device_of(model, spec)
        for n in spec.modules:
            model.get_submodule(n).to(device)
        inputs = float_inputs = None
        if batches is not None:
            inputs = prev_q if spec.follows and prev_q is not None else _capture(model, spec, batches, device)
            if needs_float:
                float_inputs = prev_fp if spec.follows and prev_fp is not None else _capture_float(model, spec,
                                                                                              batches, device)
            if onload is not None:
                onload.release_outside()  # the embedding a capture read
        unit = Unit(model, spec, adapter, inputs, float_inputs)
        if checkpoint is not None and i < checkpoint.done:
            unit.log = checkpoint.restore(i, model)  # finished before the interruption
            model.lowbit_log.extend({"unit": spec.name, **entry} for entry in unit.log)
        elif has_work:
            for m in methods:
                m.transform(unit, quantizer)
            quantizer.quantize(unit)
            model.lowbit_log.extend({"unit": spec.name, **entry} for entry in unit.log)
            if checkpoint is not None:
                checkpoint.save(i, model, spec.modules, unit.log, onload)
        elif checkpoint is not None:
            checkpoint.save(i, model, [], [])
        if upcoming and inputs is not None:
            prev_q = advance(unit.outputs, inputs, onload)
            prev_fp = advance(lambda sink=None, u=unit: u.float_outputs(on_output=sink), float_inputs, onload) \
                if needs_float else None  # fmt: skip
        else:
            prev_q = prev_fp = None
        if onload is not None:  # frozen now, written to its own shard, freed
            records.update(freeze_modules(model, spec.modules, kernel, adapter.input_sites(model)))
            onload.write(spec)
        else:
            for n in spec.modules:
                model.get_submodule(n).to(home)
    for m in methods:
        m.finetune(model, batches)
    return freeze(model, targets, methods, kernel, adapter.input_sites(model), records if onload else None)


def advance(outputs, inputs: Inputs, onload=None) -> Inputs:
    """The next unit's inputs: this unit's outputs (``outputs(sink)`` computes them batch by batch),
    with the same further arguments (mask, positions); in files when an onloaded run spills them."""
    if onload is not None and onload.spill_root is not None:
        return onload.spill(outputs, inputs)
    outs = outputs() if callable(outputs) else outputs
    return [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outs, inputs)]


def _device_of(model: nn.Module, spec) -> torch.device:
    for n in spec.modules:
        for p in model.get_submodule(n).parameters():
            return p.device
    return torch.device("cpu")


def _capture(model, spec, batches, device) -> Inputs:
    # a unit no batch reaches gets no inputs: its methods fall back, and the coverage says why
    return capture_inputs(model, model.get_submodule(spec.modules[0]), batches, device, require_all=False)


def _capture_float(model, spec, batches, device) -> Inputs:
    set_quantization(model, False)
    try:
        return _capture(model, spec, batches, device)
    finally:
        set_quantization(model, True)


# --- wrapping -----------------------------------------------------------------------------------


def wrap(model: nn.Module, adapter: Adapter, quantizer, todo: list[Target], first_last_bits: int | None) -> None:
    """Replace each target with a ``QModule`` (simulate mode, nothing decided yet) and put
    activation quantizers where the quantizer's activation format asks for them."""
    ends = {todo[0].name, todo[-1].name} if first_last_bits and todo else set()
    act = quantizer.act_format
    for t in todo:
        fmt = quantizer.weight_format
        afmt = act
        if t.name in ends:
            if fmt.kind == "vq" and first_last_bits * fmt.vq_dim > 8:  # codebook indices are at most 8 bits
                fmt = replace(fmt, bits=first_last_bits, vq_dim=max(1, 8 // first_last_bits))
            else:
                fmt = replace(fmt, bits=first_last_bits)
            afmt = replace(act, bits=first_last_bits) if act is not None else None
        qm = QModule(t.module, fmt)
        if afmt is not None and adapter.quantizes_input(t.name):
            qm.input_q = _act_quantizer(quantizer, afmt, qm.channel_dim)
        set_module(model, t.name, qm)
    if act is None:
        return
    for site in adapter.sites(model):
        set_module(model, site.name, _site(model.get_submodule(site.name), site, quantizer, act))


def _act_quantizer(quantizer, fmt, channel_dim: int) -> ActQuantizer:
    q = ActQuantizer(fmt, quantizer.observer, quantizer.act_percentile, channel_dim)
    q.outlier_threshold = getattr(quantizer, "threshold", None)
    return q


def _site(module: nn.Module, spec: SiteSpec, quantizer, fmt) -> QSite:
    ins = [_act_quantizer(quantizer, fmt, -1) for _ in range(spec.inputs)]
    out = _act_quantizer(quantizer, fmt, -1) if spec.output else None
    return QSite(module, ins, out, spec.role)


# --- freezing and coverage -------------------------------------------------------------------


def freeze(model: nn.Module, targets: list[Target], methods: list, kernel: str = "auto",
           input_sites: dict[str, str] | None = None, frozen: dict[str, LayerRecord] | None = None) -> Coverage:  # fmt: skip
    """Swap every ``QModule`` for its packed runtime module, fix every site's quantizers, and
    report every weight-bearing parameter. ``input_sites``: layer -> the site whose output is its
    whole input (a conv there runs on integers, on that site's grid). ``frozen``: the records of
    layers frozen already (an onloaded run freezes each unit as it finishes)."""
    records = frozen if frozen is not None else freeze_modules(model, [""], kernel, input_sites)
    coverage = Coverage()
    for t in targets:
        rec = records.get(t.name)
        if rec is not None:
            rec.in_block = t.in_block
            coverage.add(rec)
        else:
            coverage.add(LayerRecord(t.name, type(t.module).__name__, "skipped", t.skip or "not quantized",
                                     t.in_block, numel=t.numel))  # fmt: skip
    return coverage


def freeze_modules(model: nn.Module, tops: list[str], kernel: str = "auto",
                   input_sites: dict[str, str] | None = None) -> dict[str, LayerRecord]:  # fmt: skip
    """Freeze the ``QModule``s and sites inside the modules ``tops`` (``""``: the whole model);
    the quantized layers' records."""
    members = [(n, m) for top in tops for n, m in model.get_submodule(top).named_modules(prefix=top)]
    records: dict[str, LayerRecord] = {}
    for name, m in members:
        if isinstance(m, QModule):
            site = (input_sites or {}).get(name)
            grid = model.get_submodule(site).output_q if site and isinstance(model.get_submodule(site), QSite) \
                else None  # fmt: skip
            frozen = m.freeze(kernel, grid)
            qw = (frozen.module if isinstance(frozen, QSite) else frozen).quantized_weight
            if hasattr(frozen, "conv_quantized_weight"):
                qw = frozen.conv_quantized_weight
            set_module(model, name, frozen)
            act = m.input_q.describe()
            if getattr(m.input_q, "note", ""):
                act += f" ({m.input_q.note})"
            if m.input_q.fmt is None and grid is not None and grid.quantizes:
                how = "integer kernels" if getattr(frozen, "act", None) is not None else "simulated"
                act = f"{grid.describe()} (its input lies on {site}'s grid: {how})"
            records[name] = LayerRecord(name, m.source, "quantized", "", False, m.describe(), qw.bits_per_weight,
                                        qw.numel, m.weight_q.method, act)  # fmt: skip
    for name, m in members:
        if isinstance(m, QSite):
            for i, q in enumerate(m.input_q):
                if q.quantizes:
                    m.input_q[i] = frozen_act(q)
            if m.output_q is not None:
                m.output_q = frozen_act(m.output_q)
    return records

