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
  channels are permuted so that each group is a contiguous range.

Every function here is mirrored exactly by lowbit's C++ kernel
(``kernels/csrc/int8_gemm.cpp``): the same float32 operations in the same order,
so the kernel and this reference produce the same codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GRANULARITIES = ("token", "tensor", "group")


@dataclass(frozen=True)
class ActFormat:
    bits: int = 8
    granularity: str = "token"
    dynamic: bool = True
    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"act_bits={self.bits!r} is not supported; choose an integer from 2 to 8")
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

    def describe(self) -> str:
        how = "dynamic" if self.dynamic else "static"
        return f"a{self.bits} per-{self.granularity} {how} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ActFormat:
        return cls(**{k: d[k] for k in ("bits", "granularity", "dynamic", "symmetric") if k in d})


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
    if fmt.dynamic:
        scale, zero = dynamic_params(x, fmt)
    elif fmt.granularity == "group":
        scale, zero = group_columns(scale, zero, bounds)
    else:
        scale, zero = scale.float().reshape(1, 1), zero.float().reshape(1, 1)
    return codes(x, scale, zero, fmt) * scale
