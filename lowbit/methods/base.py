"""Method configs and the registry of methods by name."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import torch

from lowbit.formats.activation import ActFormat
from lowbit.formats.sparse import Outliers
from lowbit.formats.spec import WeightFormat
from lowbit.observers import check_observer
from lowbit.quantized_weight import QuantizedWeight

REGISTRY: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    REGISTRY[cls.name] = cls
    return cls


# Activation defaults per model family, for knobs a recipe leaves unset: language models and
# encoders quantize linear inputs per token at run time (symmetric); vision models use static
# per-tensor ranges, unsigned after ReLUs (asymmetric), from the MSE observer, as their papers do.
FAMILY_ACT_DEFAULTS = {
    "cnn": {"act_granularity": "tensor", "act_symmetric": False, "act_observer": "mse"},
    "vit": {"act_granularity": "tensor", "act_symmetric": False, "act_observer": "mse"},
}
ACT_DEFAULTS = {"act_granularity": "token", "act_symmetric": True, "act_observer": "minmax"}


@dataclass
class MethodConfig:
    """The knobs every method shares; a method's dataclass adds its own, and the hooks the
    engine calls for each unit (``transform``, then ``quantize``) and at the end (``finetune``).

    ``bits``: 2-8. ``group_size``: positive, ``-1`` per-channel. ``symmetric``:
    fixed mid-range zero point instead of a per-group integer zero. ``format``:
    ``int``, ``lut``, ``bcq``, ``vq``, ``nf4``, ``fp4``, ``pot``, ``apot``, ``log``, ``fp8_e4m3`` or ``fp8_e5m2``. ``act_*``: integer
    activations (unset knobs take the model family's defaults).
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    uses_hessian: ClassVar[bool] = False  # quantize_linear reads stats.H
    needs_float_inputs: ClassVar[bool] = False  # the unit's float inputs and target (reconstruction)
    quantizes: ClassVar[bool] = True  # False for pure transforms (smoothing, rotations)
    supports_scale_bits: ClassVar[bool] = False  # computes its codes against second-level scales

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    format: str = "int"
    # quantized scales (QLoRA's double quantization, SpQR's statistics): formats.double
    scale_bits: int | None = None
    scale_group_size: int = 256
    # integer activations (W8A8, W4A8, ...): None keeps them in floating point
    act_bits: int | None = None
    act_granularity: str | None = None  # token: a scale per row; tensor: one scale
    act_dynamic: bool | None = None  # None: token -> at run time, tensor -> static from calibration
    act_symmetric: bool | None = None
    act_observer: str | None = None  # static scales: minmax, ema, percentile, mse or kl
    act_percentile: float = 99.99
    true_sequential: bool = True

    def __post_init__(self):
        if self.scale_bits == 0:  # "--scale-bits 0": plain fp16 scales where a method defaults to quantized ones
            self.scale_bits = None
        fmt = self.weight_format  # validates bits, group size and format early
        if fmt.scale_bits is not None and self.quantizes and not self.supports_scale_bits:
            raise ValueError(f"{self.name} does not compute its codes against quantized scales (scale_bits); "
                             "rtn, gptq, owq, spqr, lorc and nf4 do")  # fmt: skip
        if fmt.scale_bits is not None and self.act_bits is not None:
            raise ValueError("integer activations (act_bits) run on plain scales; leave scale_bits unset")
        if self.act_bits is not None:
            if self.act_granularity not in (None, "token", "tensor"):
                raise ValueError(f"act_granularity {self.act_granularity!r} is not supported; use token or tensor")
            _ = self.act_format  # validates the activation knobs
            check_observer(self._act("act_observer"))
            if fmt.kind != "int" or fmt.group_size is None:
                raise ValueError(
                    f"integer activations need integer weights per channel or per group, not {fmt.describe()}"
                )

    def _act(self, knob: str):
        value = getattr(self, knob)
        return ACT_DEFAULTS[knob] if value is None else value

    @property
    def observer(self) -> str:
        """The activation observer, with the default for an unset knob."""
        return self._act("act_observer")

    def for_family(self, family: str) -> MethodConfig:
        """This config with the family's defaults for the activation knobs left unset."""
        unset = {k: v for k, v in FAMILY_ACT_DEFAULTS.get(family, {}).items() if getattr(self, k) is None}
        return replace(self, **unset) if unset else self

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.format, self.bits, self.group_size, self.symmetric, self.scale_bits,
                            self.scale_group_size)  # fmt: skip

    @property
    def act_format(self) -> ActFormat | None:
        if self.act_bits is None:
            return None
        gran = self._act("act_granularity")
        dynamic = gran == "token" if self.act_dynamic is None else self.act_dynamic
        return ActFormat(self.act_bits, gran, dynamic, self._act("act_symmetric"))

    @property
    def static_activations(self) -> bool:
        return self.act_bits is not None and not self.act_format.dynamic

    def refuses(self, family: str) -> str | None:
        """Why this method cannot run on a model of ``family``, or ``None``."""
        return None

    # --- what a method computes ---------------------------------------------------------

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        """Codes and parameters for ``w: [out, in]``; calibration-free methods implement it."""
        raise NotImplementedError(f"{self.name} needs calibration data; pass calib=...")

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        """Codes and parameters for ``w: [out, in]`` given its input statistics (``None`` if none)."""
        return self.quantize_weight(w)

    # --- the hooks the engine calls -------------------------------------------------------

    def prepare(self, model, adapter, batches) -> None:
        """Before anything is wrapped: look at the whole float model (BRECQ's Fisher weights)."""

    def transform(self, unit, quantizer: MethodConfig) -> None:
        """Rewrite ``unit`` exactly before quantization (AWQ scales, SmoothQuant, ...); most do nothing."""

    def quantize(self, unit) -> None:
        """Decide the unit's codes and activation ranges: its quantized modules and sites in
        execution order, each observed with everything before it already quantized (true
        sequential), modules that read the same input together."""
        groups = unit.groups() if self.true_sequential else [list(unit.order())]
        for group in groups:
            hessian = self.uses_hessian and unit.inputs is not None
            stats = unit.stats(group, hessian=hessian, weights=self.needs_calibration) if unit.inputs else {}
            mine = unit.owned(group)  # all of them, but under data-parallel calibration
            for name in group:
                m = unit.get(name)
                if hasattr(m, "weight_q") and name in mine:
                    self.quantize_module(m, stats.get(name))
            unit.share_decisions(group)
            unit.changed(group)

    def quantize_module(self, qm, stats) -> None:
        """Codes for one quantized module from its input statistics (in its stored column order)."""
        w = qm.stored_weight().detach()
        if stats is not None and qm.perm is not None:
            stats = stats.permuted(qm.perm)
        method = self.with_format(qm.weight_q.fmt)
        label = self.name
        if self.needs_calibration and (stats is None or stats.tokens == 0):
            why = getattr(stats, "unsupported", "") or "saw no calibration input for this layer"
            qw = QuantizedWeight.quantize(w.reshape(w.shape[0], -1).float(), qm.weight_q.fmt)
            label = f"rtn (fallback: {self.name} {why})"
        elif stats is not None and stats.groups > 1:
            qw = method.quantize_groups(w.reshape(w.shape[0], -1).float(), stats)
        else:
            qw = method.quantize_linear(w.reshape(w.shape[0], -1).float(), stats)
        qm.weight_q.set_fixed(replace(qw, shape=tuple(w.shape)), label)

    def quantize_groups(self, w: torch.Tensor, stats) -> QuantizedWeight:
        """A grouped conv: its groups are independent layers (group ``j``'s output channels read
        only block ``j`` of the patches), each quantized on its own block's statistics."""
        if self.weight_format.scale_bits is not None:
            raise ValueError("a grouped convolution's groups are quantized apart, and quantized scales (scale_bits) "
                             "run across output channels: quantize it with plain scales")  # fmt: skip
        parts = [self.quantize_linear(wj, stats.group(j)) for j, wj in enumerate(w.chunk(stats.groups))]
        zero = None if parts[0].zero is None else torch.cat([q.zero for q in parts])
        outliers = Outliers.cat([q.outliers for q in parts], [q.matrix_shape for q in parts])
        return QuantizedWeight.from_codes(torch.cat([q.codes() for q in parts]), torch.cat([q.scale for q in parts]),
                                          zero, parts[0].fmt, outliers=outliers)  # fmt: skip

    def with_format(self, fmt: WeightFormat) -> MethodConfig:
        """This config targeting ``fmt`` (the first and last layers may keep more bits)."""
        if fmt == self.weight_format:
            return self
        return replace(self, bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric, format=fmt.kind,
                       scale_bits=fmt.scale_bits, scale_group_size=fmt.scale_group_size)  # fmt: skip

    def finetune(self, model, batches) -> None:
        """After every unit: whole-model training (QAT, distillation); most methods do nothing."""


def static_act_format(quantizer: MethodConfig, method: str, why: str) -> ActFormat:
    """The quantizer's activation format, which ``method`` needs static per tensor; else one clear error."""
    fmt = quantizer.act_format
    if fmt is None or fmt.dynamic or fmt.granularity != "tensor":
        raise ValueError(f"{method} {why}: pass act_bits with static per-tensor activations (the vision "
                         "families' default; act_granularity='tensor' elsewhere)")  # fmt: skip
    return fmt


def make_method(name: str, **config) -> MethodConfig:
    """Build the registered method ``name`` from the keys of ``config`` that it knows."""
    key = name.strip().lower()
    if key not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[key]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known and v is not None})


def check_recipe(methods: list[MethodConfig]) -> None:
    """Methods of one recipe must agree on the weight format they target."""
    formats = {m.weight_format for m in methods if m.quantizes}
    if len(formats) > 1:
        raise ValueError(
            f"the methods of a recipe disagree on the weight format: {sorted(f.describe() for f in formats)}"
        )


def load_recipe(path, **config) -> list[MethodConfig]:
    """A YAML recipe: a list of ``{method: NAME, knob: value, ...}`` (or ``{recipe: [...]}``).

    ``config`` supplies defaults that each entry's own keys override.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    data = yaml.safe_load(p.read_text())
    if isinstance(data, dict):
        data = data.get("recipe")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "method" in d for d in data):
        raise ValueError(f"recipe file {path} must hold a list of entries, each with a 'method' key")
    return [make_method(d["method"], **{**config, **{k: v for k, v in d.items() if k != "method"}}) for d in data]


def parse_recipe(recipe, **config) -> list[MethodConfig]:
    """``"rtn"``, ``"awq+gptq"``, a config, or a list of either, as a list of configs."""
    if isinstance(recipe, MethodConfig):
        return [recipe]
    if isinstance(recipe, str):
        parts = [p for p in recipe.split("+") if p.strip()]
        if not parts:
            raise ValueError("empty recipe; name a method such as rtn")
        return [make_method(p, **config) for p in parts]
    if isinstance(recipe, (list, tuple)):
        out = []
        for item in recipe:
            out.extend(parse_recipe(item, **config))
        return out
    raise TypeError(f"a recipe is a method name, a method config or a list of them, not {type(recipe).__name__}")
