"""Method configs and the registry of methods by name."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch

from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.observers import check_observer
from lowbit.quantized_weight import QuantizedWeight

REGISTRY: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class MethodConfig:
    """The knobs every weight quantizer shares; a method's dataclass adds its own.

    ``bits``: 2-8. ``group_size``: positive, ``-1`` per-channel. ``symmetric``:
    fixed mid-range zero point instead of a per-group integer zero. ``format``:
    ``int``, ``nf4``, ``fp4``, ``fp8_e4m3`` or ``fp8_e5m2``.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    uses_hessian: ClassVar[bool] = False  # quantize_linear reads stats.H

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    format: str = "int"
    # integer activations (W8A8, W4A8, ...): None keeps them in floating point
    act_bits: int | None = None
    act_granularity: str = "token"  # token: a scale per row; tensor: one scale
    act_dynamic: bool | None = None  # None: token -> at run time, tensor -> static from calibration
    act_symmetric: bool = True
    act_observer: str = "minmax"  # static scales: minmax, ema, percentile, mse or kl
    act_percentile: float = 99.99

    def __post_init__(self):
        fmt = self.weight_format  # validates bits, group size and format early
        if self.act_bits is not None:
            if self.act_granularity not in ("token", "tensor"):
                raise ValueError(f"act_granularity {self.act_granularity!r} is not supported; use token or tensor")
            _ = self.act_format  # validates the activation knobs
            check_observer(self.act_observer)
            if fmt.kind != "int" or fmt.group_size is None:
                raise ValueError(
                    f"integer activations need integer weights per channel or per group, not {fmt.describe()}"
                )

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.format, self.bits, self.group_size, self.symmetric)

    @property
    def act_format(self) -> ActFormat | None:
        if self.act_bits is None:
            return None
        dynamic = self.act_granularity == "token" if self.act_dynamic is None else self.act_dynamic
        return ActFormat(self.act_bits, self.act_granularity, dynamic, self.act_symmetric)

    quantizes: ClassVar[bool] = True  # False for pure transforms (smoothing, rotations)
    true_sequential: bool = True

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        """Codes and parameters for ``w: [out, in]``; calibration-free methods implement it."""
        raise NotImplementedError(f"{self.name} needs calibration data; pass calib=...")

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        """Codes and parameters for ``w: [out, in]`` given its input statistics (``None`` if none)."""
        return self.quantize_weight(w)

    @property
    def static_activations(self) -> bool:
        return self.act_bits is not None and not self.act_format.dynamic

    def transform_block(self, block, inputs, pairs, linears, quantizer) -> None:
        """Rewrite ``block`` exactly before quantization (AWQ scales, ...); most methods do nothing."""


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
