"""WeightFormat: which numeric format a weight is stored in, and at what granularity."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.formats.floating import FP8_DTYPES
from lowbit.formats.integer import check_bits, check_group_size

KINDS = ("int", "lut", "nf4", "fp4", *FP8_DTYPES)


@dataclass(frozen=True)
class WeightFormat:
    """``kind`` is ``int``, ``lut`` (a learned codebook of ``2^bits`` values per row or group,
    ``formats.codebook``), ``nf4``, ``fp4``, ``fp8_e4m3`` or ``fp8_e5m2``.

    ``group_size``: a positive size (ragged last group allowed), ``-1`` per-channel,
    ``None`` per-tensor. ``symmetric`` applies to ``int`` only; the float and
    codebook formats are symmetric by construction.
    """

    kind: str = "int"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown weight format {self.kind!r}; choose one of {', '.join(KINDS)}")
        natural = {"nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8}.get(self.kind)
        if natural is not None and self.bits != natural:
            object.__setattr__(self, "bits", natural)
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.kind == "lut" and self.group_size is None:
            raise ValueError("a codebook (lut) is per row or per group: use group_size -1 or a positive size")
        if self.kind != "int":
            object.__setattr__(self, "symmetric", True)

    @property
    def has_zero(self) -> bool:
        return self.kind == "int" and not self.symmetric

    def describe(self) -> str:
        if self.group_size is None:
            gran = "per-tensor"
        elif self.group_size == -1:
            gran = "per-channel"
        else:
            gran = f"g{self.group_size}"
        name = f"{self.kind}{self.bits}" if self.kind in ("int", "lut") else self.kind
        sym = ("sym" if self.symmetric else "asym") if self.kind == "int" else ""
        return " ".join(p for p in (name, gran, sym) if p)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WeightFormat:
        return cls(**{k: d[k] for k in ("kind", "bits", "group_size", "symmetric") if k in d})
