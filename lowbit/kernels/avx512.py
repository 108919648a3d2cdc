"""lowbit's AVX-512 BF16 4-bit GEMV (``csrc/int4_gemv.cpp``): a bf16 mode, used only when asked for.

``QLinear(kernel="int4_avx512")`` runs it: activations rounded to bf16 and AVX512-BF16
dot products (where the CPU has them), up to 8 rows, reading ``QuantizedWeight.packed``
as it is. ``auto`` picks the exact fp32 kernels of ``kernels/wq.py`` instead. It is
compiled on first use with ``torch.utils.cpp_extension`` into the torch extensions
cache; where the CPU lacks AVX-512 or the build fails, lowbit says so once.
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels.build import build_extension, cpu_flags
from lowbit.quantized_weight import QuantizedWeight

MAX_ROWS = 8


@functools.cache
def extension():
    """The compiled module, or ``None`` where it cannot be had."""
    flags = cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return None
    cflags = ["-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if "avx512_bf16" in flags:
        cflags.append("-mavx512bf16")
    name = "lowbit_int4_gemv_" + ("bf16" if "avx512_bf16" in flags else "fp32")
    return build_extension(name, "int4_gemv.cpp", cflags, "its AVX-512 int4 kernel")


def kernel_group(qw: QuantizedWeight) -> int | None:
    """The group size the kernel runs ``qw`` with, or ``None`` if it cannot run it."""
    fmt = qw.fmt
    k = qw.shape[1]
    if fmt.kind != "int" or fmt.bits != 4 or k % 32 or qw.scale.dtype != torch.float16:
        return None
    group = k if qw.scale.shape[1] == 1 else fmt.group_size
    return group if group % 32 == 0 else None


def supported(qw: QuantizedWeight) -> bool:
    return kernel_group(qw) is not None and extension() is not None


def int4_gemv(x: torch.Tensor, qw: QuantizedWeight, zero: torch.Tensor, use_bf16: bool = True) -> torch.Tensor:
    """``x @ dequantize(qw).T`` for ``x: [..., K]`` with at most ``MAX_ROWS`` rows."""
    flat = x.reshape(-1, x.shape[-1]).float()
    y = extension().int4_gemv(flat, qw.packed, qw.scale, zero, qw.shape[0], kernel_group(qw), use_bf16)
    return y.reshape(*x.shape[:-1], qw.shape[0]).to(x.dtype)
