"""The public verb: ``lowbit.quantize(model, method_or_recipe, **config)``."""

from __future__ import annotations

import time
from dataclasses import asdict

from torch import nn
from tqdm.auto import tqdm

from lowbit.coverage import Coverage, LayerRecord
from lowbit.methods import MethodConfig, parse_recipe
from lowbit.models.adapters import is_linear, plan, set_module
from lowbit.nn.qlinear import QLinear, linear_weight
from lowbit.quantized_weight import check_finite


def quantize(
    model: nn.Module,
    method_or_recipe: str | MethodConfig | list = "rtn",
    *,
    calib=None,
    skip: list[str] | tuple[str, ...] = (),
    include_lm_head: bool = False,
    kernel: str = "auto",
    progress: bool = True,
    **config,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``method_or_recipe``: a registered name (``"rtn"``), a ``+``-joined recipe, a
    method config, or a list of them. ``config`` fills the configs built from
    names (``bits=4, group_size=128, symmetric=False, ...``). ``skip``: glob
    patterns of module names to keep in full precision. Every weight-bearing
    layer ends up in ``model.lowbit_coverage``, quantized or skipped with a reason.
    """
    methods = parse_recipe(method_or_recipe, **config)
    quantizer = methods[-1]
    if quantizer.needs_calibration or len(methods) > 1:
        raise NotImplementedError(
            f"recipe {'+'.join(m.name for m in methods)} needs the calibration engine; "
            f"only single calibration-free methods (rtn) run in this version"
        )
    start = time.perf_counter()
    targets = plan(model, skip=skip, include_lm_head=include_lm_head)
    todo = [t for t in targets if t.skip is None and not isinstance(t.module, QLinear)]
    if not any(is_linear(t.module) for t in targets):
        raise ValueError(f"{type(model).__name__} holds no nn.Linear layers to quantize")
    for t in todo:
        check_finite(linear_weight(t.module), f"{t.name}.weight")

    fmt = quantizer.weight_format
    records: dict[str, LayerRecord] = {}
    for t in tqdm(todo, desc=f"{quantizer.name} {fmt.describe()}", disable=not progress, unit="layer"):
        qw = quantizer.quantize_weight(linear_weight(t.module).float())
        set_module(model, t.name, QLinear(qw, t.module.bias, kernel))
        records[t.name] = LayerRecord(
            t.name,
            type(t.module).__name__,
            "quantized",
            "",
            t.in_block,
            fmt.describe(),
            qw.bits_per_weight,
            qw.numel,
        )
    coverage = Coverage()
    for t in targets:
        reason = "already quantized" if isinstance(t.module, QLinear) else t.skip
        coverage.add(records.get(t.name) or LayerRecord(t.name, type(t.module).__name__, "skipped", reason, t.in_block))

    model.lowbit_coverage = coverage
    model.lowbit_recipe = [{"method": m.name, **_config_dict(m)} for m in methods]
    model.lowbit_seconds = time.perf_counter() - start
    return model


def _config_dict(m: MethodConfig) -> dict:
    return asdict(m)
