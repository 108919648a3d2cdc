"""lowbit's integer-activation linear for AVX2 CPUs (``csrc/int8_gemm.cpp``).

Activations are quantized in the kernel (per token at run time, or with static
per-tensor / per-group scales, after an optional channel permutation, shift and
scale), multiplied exactly against 8- or 4-bit weight codes read as
``QuantizedWeight`` stores them, accumulated in int32 and rescaled to fp32.
2- and 3-bit codes are repacked as 4-bit, 5- to 7-bit codes widened to a byte (a
run-time copy).

``torch._int_mm`` on CPUs without VNNI runs a reference loop (on the 2-core
AVX2 machine this project is built on it is 10-100x slower than fp32 GEMM);
this kernel is what makes W8A8 fast there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.formats import integer, packing
from lowbit.formats.activation import ActFormat
from lowbit.kernels.build import build_extension, cpu_flags
from lowbit.quantized_weight import QuantizedWeight

MODES = {"token": 0, "tensor": 1, "group": 2}


@functools.cache
def extension():
    """The compiled module, or ``None`` where it cannot be had."""
    if not {"avx2", "fma"} <= cpu_flags():
        return None
    return build_extension("lowbit_int8_gemm", "int8_gemm.cpp", ["-mavx2", "-mfma"], "its AVX2 int8 kernel")


def has_fast_int_mm() -> bool:
    """CPUs whose ``torch._int_mm`` runs on int8 dot-product instructions (VNNI / AMX)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


@dataclass
class Int8Weights:
    """What the kernel reads: codes (as stored for 4/8 bits), zeros and fp32 scales ``[N, ngroups]``."""

    codes: torch.Tensor
    bits: int
    zeros: torch.Tensor
    scales: torch.Tensor
    group: int
    n: int
    k: int
    codes_nonzero: bool  # 8-bit codes all >= 1 (symmetric weights): the kernel's signed-int8 path


def supported(qw: QuantizedWeight) -> bool:
    return qw.fmt.kind == "int" and qw.fmt.group_size is not None


def pack(qw: QuantizedWeight) -> Int8Weights:
    n, k = qw.shape
    bits = qw.fmt.bits
    if bits in (4, 8) and (bits == 8 or k % 2 == 0):
        codes = qw.packed  # read as stored
    elif bits < 4 and k % 2 == 0:
        codes, bits = packing.pack(qw.codes(), 4), 4  # narrower codes ride the 4-bit path
    else:
        codes, bits = qw.codes().contiguous(), 8
    group = integer.effective_group_size(k, qw.fmt.group_size)
    nonzero = bits == 8 and bool((codes.min() >= 1).item()) if codes.numel() else False
    return Int8Weights(
        codes, bits, qw.zero_or_default().contiguous(), qw.scale.float().contiguous(), group, n, k, nonzero
    )


_EMPTY_F = torch.empty(0)
_EMPTY_L = torch.empty(0, dtype=torch.long)
_EMPTY_I = torch.empty(0, dtype=torch.int32)


def int8_linear(
    x: torch.Tensor,
    w: Int8Weights,
    fmt: ActFormat,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    premul: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x: [M, K]`` fp32 -> ``[M, N]``: quantize ``(x - shift) * premul`` (permuted), multiply, rescale.

    Static formats take ``scale``/``zero`` (``[G]``, ``G = 1`` per tensor) and ``bounds [G+1]``.
    """
    mode = MODES[fmt.granularity]
    if fmt.granularity == "tensor" and not fmt.dynamic:
        mode = 2
    if mode == 2:
        g = 1 if bounds is None else bounds.numel() - 1
        a_bounds = bounds if bounds is not None else torch.tensor([0, w.k])
        a_scale = scale.float().reshape(g).contiguous()
        a_zero = zero.reshape(g).round().to(torch.int32).contiguous()
    else:
        a_bounds, a_scale, a_zero = _EMPTY_L, _EMPTY_F, _EMPTY_I
    if shift is not None:  # (x - shift) * premul, folded into one premul and a pre-subtraction
        x = x - shift
    return extension().int8_linear(
        x.contiguous(), w.codes, w.bits, w.n, w.zeros, w.scales, w.group, mode, fmt.symmetric, fmt.qmax,
        a_bounds.long().contiguous(), a_scale, a_zero, _EMPTY_L if perm is None else perm.long().contiguous(),
        _EMPTY_F if premul is None else premul.float().contiguous(), bias, w.codes_nonzero,
    )  # fmt: skip
