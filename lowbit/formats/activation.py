"""Integer activations: how a linear's input is turned into integer codes.

Codes are signed: symmetric formats use the full signed range ``[-qmax - 1,
qmax]`` with ``qmax = 2**(bits-1) - 1``, a scale ``absmax / qmax`` and no zero
point (what vLLM's int8 kernels, compressed-tensors and ONNX ``QuantizeLinear``
do: only a clipped static input reaches ``-qmax - 1``); asymmetric formats use ``[0, 2**bits - 1]``
with an integer zero point ``z``, and the value kept for the matmul is
``q - z`` (so ``x ~ (q - z) * scale`` in both cases).

Granularity:

- ``token``: one scale (and zero) per row, computed from that row at run time.
- ``tensor``: one scale for the whole input, static (from calibration) or
  computed from each batch at run time (``dynamic``).
- ``group``: static scales per group of input channels (PEG, RPTQ): the
  channels are permuted so that each group is a contiguous range (one channel
  per group: per-channel scales, e.g. FQ-ViT's power-of-two factors).

Kinds (``kind``): ``int`` is the uniform grid above. The others are static per
tensor, for the distributions transformers produce (``scale`` holds their
parameters; codes are ``bits`` wide, never more):

- ``log2`` (FQ-ViT's attention quantizer, Lin et al. 2022): ``q = clamp(round(-log2(x / s)),
  0, 2^b - 1)``, ``x^ = s 2^-q``; a value whose code would pass ``2^b - 1`` (and every
  ``x <= 0``) is 0. Non-negative inputs (the softmax output).
- ``logsqrt2`` (RepQ-ViT, Li et al. 2023): the same in base sqrt(2), ``x^ = s 2^(-q/2)``;
  at inference ``2^(-q/2) = 2^-ceil(q/2) (sqrt 2 if q is odd)``: shifts and one constant.
- ``twin`` (PTQ4ViT's twin uniform, Yuan et al. 2022): one bit picks one of two uniform
  ranges of ``b - 1`` bits each, ``scale = [d1, d2]`` with ``d2 = 2^m d1``. Unsigned
  (``symmetric=False``, the softmax output): values below ``(Q - 1/2) d1``
  (``Q = 2^(b-1)``) on ``d1``'s grid ``[0, Q - 1]``, the rest on ``d2``'s. Signed
  (``symmetric=True``, the GELU output): negative values on ``d1``'s grid ``[-Q, 0]``,
  non-negative ones on ``d2``'s ``[0, Q - 1]``. (PTQ4ViT's code adds its two terms
  instead of choosing one, which shifts every value above the split; lowbit selects.)

Every function here is mirrored exactly by lowbit's C++ kernel
(``kernels/csrc/int8_gemm.cpp``): the same float32 operations in the same order,
so the kernel and this reference produce the same codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GRANULARITIES = ("token", "tensor", "group")
KINDS = ("int", "log2", "logsqrt2", "twin")


@dataclass(frozen=True)
class ActFormat:
    bits: int = 8
    granularity: str = "token"
    dynamic: bool = True
    symmetric: bool = True
    kind: str = "int"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"act_bits={self.bits!r} is not supported; choose an integer from 2 to 8")
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind != "int" and (self.dynamic or self.granularity != "tensor"):
            raise ValueError(f"{self.kind} activations are static per tensor (act_granularity='tensor', static)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"act_granularity {self.granularity!r} is not supported; use token or tensor")
        if self.granularity == "token" and not self.dynamic:
            raise ValueError(
                "per-token scales are computed at run time; use act_granularity='tensor' for static scales"
            )
        if self.granularity == "group" and self.dynamic:
            raise ValueError("per-group activation scales are static (from calibration)")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def code_range(self) -> tuple[int, int]:
        return (-self.qmax - 1, self.qmax) if self.symmetric else (0, (1 << self.bits) - 1)

    @property
    def uniform(self) -> bool:
        """Whether the codes are one uniform integer grid (what the integer kernels take)."""
        return self.kind == "int"

    def describe(self) -> str:
        how = "dynamic" if self.dynamic else "static"
        if self.kind in ("log2", "logsqrt2"):
            return f"a{self.bits} {self.kind} per-tensor static"
        if self.kind == "twin":
            return f"a{self.bits} twin-uniform per-tensor static {'signed' if self.symmetric else 'unsigned'}"
        return f"a{self.bits} per-{self.granularity} {how} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ActFormat:
        return cls(**{k: d[k] for k in ("bits", "granularity", "dynamic", "symmetric", "kind") if k in d})


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: ActFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[lo, hi]`` (extended to contain 0), float32."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if fmt.symmetric:
        scale = torch.maximum(torch.maximum(lo.abs(), hi.abs()), torch.tensor(1e-8)) / fmt.qmax
        return scale, torch.zeros_like(scale)
    top = float(fmt.code_range[1])
    scale = torch.maximum(hi - lo, torch.tensor(1e-8)) / top
    zero = torch.round(-lo / scale).clamp(0, top)
    return scale, zero


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """``q - z`` (float32, integer-valued) for ``x`` with broadcastable ``scale``/``zero``."""
    lo, hi = fmt.code_range
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero.requires_grad):
        return (torch.round(x / scale) + zero).clamp(lo, hi) - zero
    return torch.div(x, scale).round_().add_(zero).clamp_(lo, hi).sub_(zero)  # the same, in one buffer


def dynamic_params(x: torch.Tensor, fmt: ActFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time scale and zero of ``x: [M, K]``: ``[M, 1]`` per token, ``[1, 1]`` per tensor."""
    if fmt.granularity == "token":
        return params_from_range(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), fmt)
    return params_from_range(x.amin().reshape(1, 1), x.amax().reshape(1, 1), fmt)


def group_columns(scale: torch.Tensor, zero: torch.Tensor, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``scale``/``zero`` ``[G]`` spread over the ``[K]`` columns their ``bounds`` cover."""
    sizes = (bounds[1:] - bounds[:-1]).long()
    return scale.float().repeat_interleave(sizes), zero.float().repeat_interleave(sizes)


def log_codes(x: torch.Tensor, scale: torch.Tensor, fmt: ActFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``log2``/``logsqrt2`` codes of ``x`` and the mask of values that are 0 (past the last code)."""
    base = 2.0 if fmt.kind == "logsqrt2" else 1.0  # -log_sqrt2(v) = -2 log2(v)
    top = (1 << fmt.bits) - 1
    with torch.no_grad():
        raw = torch.round(-base * torch.log2(x.float().clamp(min=0) / scale))  # +inf where x <= 0
        zero = raw > top
        return raw.clamp_(0, top), zero


def log_dequantize(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    half = 0.5 if fmt.kind == "logsqrt2" else 1.0
    return torch.where(zero, torch.zeros_like(q), scale * torch.exp2(-half * q))


def twin_fake_quantize(x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """Twin-uniform quantization (see the module docstring), straight-through for ``x``."""
    q = 1 << (fmt.bits - 1)
    v = x.float()
    if fmt.symmetric:
        low = v < 0
        small = torch.clamp(torch.round(v / d1), -q, 0) * d1
    else:
        low = v < (q - 0.5) * d1
        small = torch.clamp(torch.round(v / d1), 0, q - 1) * d1
    large = torch.clamp(torch.round(v / d2), 0, q - 1) * d2
    out = torch.where(low, small, large)
    return v + (out - v).detach() if v.requires_grad else out


def nonuniform_fake_quantize(x: torch.Tensor, fmt: ActFormat, scale: torch.Tensor) -> torch.Tensor:
    """``x`` on a ``log2``/``logsqrt2``/``twin`` grid with its static parameters ``scale``."""
    scale = scale.float().reshape(-1)
    if fmt.kind == "twin":
        out = twin_fake_quantize(x, scale[0], scale[1], fmt)
    else:
        q, zero = log_codes(x, scale[0], fmt)
        out = log_dequantize(q, zero, scale[0], fmt)
        if x.requires_grad:
            out = x + (out - x).detach()
    return out.to(x.dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: ActFormat,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x: [M, K]`` quantized and dequantized: dynamic formats find their own scales; static
    per-tensor takes a scalar ``scale``/``zero``; per-group takes ``[G]`` of each and ``bounds [G+1]``."""
    x = x.float()
    if not fmt.uniform:
        return nonuniform_fake_quantize(x, fmt, scale)
    if fmt.dynamic:
        scale, zero = dynamic_params(x, fmt)
    elif fmt.granularity == "group":
        scale, zero = group_columns(scale, zero, bounds)
    else:
        scale, zero = scale.float().reshape(1, 1), zero.float().reshape(1, 1)
    return codes(x, scale, zero, fmt) * scale
