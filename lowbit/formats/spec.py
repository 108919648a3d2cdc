"""WeightFormat: which numeric format a weight is stored in, and at what granularity."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lowbit.formats import vector
from lowbit.formats.floating import FP8_DTYPES, GRIDS
from lowbit.formats.integer import check_bits, check_group_size

KINDS = ("int", "lut", "bcq", "vq", "nf4", "fp4", *GRIDS, *FP8_DTYPES)
SCALED_CODEBOOKS = ("nf4", "fp4", *GRIDS)  # a fixed table of levels times a scale per group


@dataclass(frozen=True)
class WeightFormat:
    """``kind`` is ``int``, ``lut`` (a learned codebook of ``2^bits`` values per row or group,
    ``formats.codebook``), ``bcq`` (``bits`` signed binary planes with scales and an offset per row
    or group, ``formats.binary``), ``nf4``, ``fp4``, the fixed non-uniform grids ``pot`` (powers
    of two), ``apot`` (additive powers of two) and ``log`` (powers of sqrt 2) of 2 to 8 bits
    (``formats.floating``), ``fp8_e4m3`` or ``fp8_e5m2``.

    ``group_size``: a positive size (ragged last group allowed), ``-1`` per-channel,
    ``None`` per-tensor (a ``lut`` weight then has one codebook ``[1, 2^bits]``: GOBO's and Deep
    Compression's per-layer centroids). ``symmetric`` applies to ``int`` only; the float and
    codebook formats are symmetric by construction.

    ``scale_bits`` (``int`` and the scaled codebooks ``nf4``, ``fp4``, ``pot``, ``apot``, ``log``, by group or channel): the scales are themselves
    stored quantized -- QLoRA's double quantization, SpQR's second-level statistics
    (``formats.double``): each run of ``scale_group_size`` scales along the output channels
    of one column group keeps ``scale_bits``-bit codes and one fp16 base and step.

    ``vq`` (``formats.vector``, GPTVQ): ``vq_dim`` (1, 2 or 4; default 2) consecutive columns of a row
    are one vector, stored as a ``bits * vq_dim``-bit index into a codebook of ``2^(bits*vq_dim)``
    fp16 vectors; a codebook serves ``group_size`` columns of ``vq_block // columns`` rows
    (``vq_block``: weights per codebook, default GPTVQ's overhead of 1/8 bit per weight).
    """

    kind: str = "int"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_bits: int | None = None
    scale_group_size: int = 256
    vq_dim: int | None = None
    vq_block: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown weight format {self.kind!r}; choose one of {', '.join(KINDS)}")
        natural = {"nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8}.get(self.kind)
        if natural is not None and self.bits != natural:
            object.__setattr__(self, "bits", natural)
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.kind == "bcq" and self.group_size is None:
            raise ValueError(f"a {self.kind} weight is per row or per group: use group_size -1 or a positive size")
        if self.kind != "int":
            object.__setattr__(self, "symmetric", True)
        if self.kind == "vq":
            dim, block = vector.check(self.bits, self.group_size, self.vq_dim, self.vq_block)
            object.__setattr__(self, "vq_dim", dim)
            object.__setattr__(self, "vq_block", block)
        elif self.vq_dim is not None or self.vq_block is not None:
            raise ValueError(f"vq_dim and vq_block belong to vq weights, not {self.kind}")
        if self.scale_bits is not None:
            check_bits(self.scale_bits)
            if self.kind not in ("int", *SCALED_CODEBOOKS) or self.group_size is None:
                raise ValueError(
                    f"quantized scales (scale_bits={self.scale_bits}) need an int, {', '.join(SCALED_CODEBOOKS)} format "
                    f"per channel or per group, not {self.kind} with group_size {self.group_size}"
                )
            if not isinstance(self.scale_group_size, int) or self.scale_group_size <= 0:
                raise ValueError(f"scale_group_size {self.scale_group_size!r} must be a positive number of scales")

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
        name = f"{self.kind}{self.bits}" if self.kind in ("int", "lut", "bcq", "vq", *GRIDS) else self.kind
        sym = ("sym" if self.symmetric else "asym") if self.kind == "int" else ""
        dq = f"scales int{self.scale_bits}/{self.scale_group_size}" if self.scale_bits is not None else ""
        vq = f"d{self.vq_dim} block{self.vq_block}" if self.kind == "vq" else ""
        return " ".join(p for p in (name, gran, sym, dq, vq) if p)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.scale_bits is None:  # plain scales: the dict older checkpoints hold
            del d["scale_bits"], d["scale_group_size"]
        if self.kind != "vq":
            del d["vq_dim"], d["vq_block"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WeightFormat:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
