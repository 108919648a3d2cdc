"""lowbit's weight-only 4- and 8-bit kernels for CPUs (``csrc/wq_gemm.cpp``).

One compiled module holds the code paths for each kernel: AVX-512 and AVX2 + FMA on
x86, NEON on AArch64, and portable C++ (no intrinsics) everywhere. The best path the
CPU runs is chosen at run time; ``LOWBIT_ISA=portable|avx2|avx512|neon`` (or the ``isa``
argument) forces one, which is how the tests check every path on one machine (the NEON
path is checked under qemu-aarch64 by ``tests/native/wq_check.cpp``).

Activations stay fp32 and products accumulate in fp32, so every path agrees with
dequantize-then-matmul to fp32 rounding, and a model's outputs (a perplexity, a
top-1) do not depend on which CPU ran them. Up to ``Packed.gemv_rows`` rows (4; with AVX-512 VNNI
16 for 4-bit codes in groups of 128, 8 in other multiples of 32) run the GEMV kernels, which read the
packed codes as ``QuantizedWeight`` stores them; up to ``fused_rows`` more (192 on AVX2 and
AVX-512) the fused dequantize-GEMM (weight blocks dequantized in L2 and met by a register-tiled
FMA kernel); more rows dequantize tiles of weight rows and call the BLAS GEMM. Where AMX-INT8
runs, 4-bit groups of a multiple of 128 take the integer-digit GEMM on AMX tiles past the GEMV
rows instead (``Packed.amx``).
"""

from __future__ import annotations

import functools
import os

import torch

from lowbit.formats import integer
from lowbit.kernels.build import build_extension, resolve_isa
from lowbit.quantized_weight import QuantizedWeight

ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "neon": 3}
TILE_BYTES = 8 * 2**20  # one dequantized fp32 tile: a few MiB, so it stays in cache


@functools.cache
def extension():
    """The compiled module, or ``None`` where it cannot be built."""
    return build_extension("lowbit_wq_gemm", "wq_gemm.cpp", [], "its weight-only CPU kernels")


def available_isas() -> list[str]:
    """The instruction sets this CPU runs the kernels with, ``portable`` first."""
    ext = extension()
    return [] if ext is None else list(ext.available_isas())


def isa_code(isa: str | None = None) -> int:
    """``isa`` (or ``LOWBIT_ISA``, or the best available) as the kernel's integer code."""
    return resolve_isa(isa, ISAS, available_isas, "kernels")


def selected_isa(isa: str | None = None) -> str:
    """The name of the path ``isa`` (default: ``LOWBIT_ISA`` or auto) runs on this CPU."""
    code = isa_code(isa)
    if code >= 0:
        return next(k for k, v in ISAS.items() if v == code)
    return available_isas()[-1]


def supported(qw: QuantizedWeight) -> bool:
    """Whether the kernels run ``qw``: integer codes of 4 (even K) or 8 bits."""
    fmt = qw.fmt
    if fmt.kind != "int" or fmt.bits not in (4, 8) or qw.scale.dtype not in (torch.float16, torch.float32):
        return False
    _, k = qw.matrix_shape
    return not (fmt.bits == 4 and (k % 2 or _group(qw) % 2))


def _group(qw: QuantizedWeight) -> int:
    return integer.effective_group_size(qw.matrix_shape[1], qw.fmt.group_size)


def _per_group(t: torch.Tensor, n: int, ngroups: int) -> torch.Tensor:
    """A per-tensor, per-channel or per-group parameter as a contiguous ``[n, ngroups]``."""
    return (t.reshape(1, 1).expand(n, ngroups) if t.numel() == 1 else t.reshape(n, ngroups)).contiguous()


class Packed:
    """What the kernels read: the stored codes as they are, scales and zeros as ``[N, G]``."""

    def __init__(self, qw: QuantizedWeight, device: torch.device):
        if not supported(qw):
            raise ValueError(f"lowbit's CPU kernels cannot run {qw.fmt.describe()} with shape {qw.shape}")
        n, self.k = qw.matrix_shape
        self.n = n
        self.bits = qw.fmt.bits
        self.group = _group(qw)
        ngroups = -(-self.k // self.group)
        self.codes = qw.packed.to(device).contiguous()
        self.scales = _per_group(qw.scale.to(device), n, ngroups)
        self.zeros = None if qw.zero is None else _per_group(qw.zero.to(device), n, ngroups)
        self.tile = max(16, TILE_BYTES // (4 * self.k) // 16 * 16)
        self.isa = isa_code()  # LOWBIT_ISA as it is when the layer first runs
        # the integer-digit GEMV for 4-bit codes in groups of a multiple of 32 (see wq_gemm.cpp);
        # False: fp32 products on every path (LOWBIT_WQ_DIGITS=0)
        self.digits = os.environ.get("LOWBIT_WQ_DIGITS", "1") != "0"
        # the fused dequantize-GEMM past the GEMV rows: -1 up to fused_rows (auto), 1 always, 0 never
        self.fused = -1
        # the digit GEMM on AMX tiles for large batches (4-bit, groups of a multiple of 128, where the
        # CPU and kernel allow AMX): -1 past the GEMV rows (17 on), 1 always, 0 never
        self.amx = -1
        self.ext = extension()
        self._rows: dict[tuple[int, bool], int] = {}

    def gemv_rows(self, code: int | None = None) -> int:
        """The most rows the GEMV kernel takes on path ``code`` (default: this layer's); more
        rows take dequantized tiles and the BLAS GEMM."""
        key = (self.isa if code is None else code, self.digits)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = self.ext.gemv_rows(self.bits, self.group, key[0], self.digits)
        return rows

    @classmethod
    def concat(cls, parts: list[Packed]) -> Packed:
        """One layout over the rows of several weights (a fused q/k/v or gate/up projection): they
        must share the input width, bits, group size, scale dtype and zero-point kind."""
        first = parts[0]

        def kind(p: Packed) -> tuple:
            return p.k, p.bits, p.group, p.zeros is None, p.scales.dtype, p.codes.device

        if any(kind(p) != kind(first) for p in parts[1:]):
            raise ValueError(f"cannot fuse weights of different layouts: {[kind(p) for p in parts]}")
        out = cls.__new__(cls)
        out.__dict__.update(first.__dict__)
        out.n = sum(p.n for p in parts)
        out.codes = torch.cat([p.codes.reshape(-1) for p in parts])  # row-major rows, so rows stack
        out.scales = torch.cat([p.scales for p in parts])
        out.zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return out

    def matmul(self, x: torch.Tensor, isa: str | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ dequantize(W).T (+ bias)`` in fp32 for ``x: [..., K]`` (any dtype; the result in ``x.dtype``).

        Differentiable in ``x`` and ``bias`` (the weight is frozen): the backward
        pass is ``grad @ dequantize(W)``. Without gradients the bias is fused.
        """
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            y = _Matmul.apply(x, self, isa)
            return y if bias is None else y + bias.to(y.dtype)
        return self._forward(x, isa, None if bias is None else bias.detach().float())

    def _forward(self, x: torch.Tensor, isa: str | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        code = self.isa if isa is None else isa_code(isa)
        flat = x.detach().reshape(-1, x.shape[-1])
        if flat.dtype != torch.float32:
            flat = flat.float()
        if flat.shape[0] <= self.gemv_rows(code):
            y = self.ext.wq_gemv(
                flat, self.codes, self.scales, self.zeros, bias, self.n, self.bits, self.group, code, self.digits
            )
        else:
            y = self.ext.wq_gemm_tiled(
                flat, self.codes, self.scales, self.zeros, bias, self.n, self.bits, self.group, self.tile, code,
                self.fused, self.amx if self.digits else 0,
            )
        y = y.view(*x.shape[:-1], self.n)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def gemv(self, flat: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``flat @ W.T (+ bias)`` for a contiguous fp32 ``flat: [M, K]`` outside autograd: the
        kernel called with nothing around it (a decode step makes over a hundred such calls)."""
        if flat.shape[0] > self.gemv_rows():
            return self._forward(flat, None, bias)
        return self.ext.wq_gemv(
            flat, self.codes, self.scales, self.zeros, bias, self.n, self.bits, self.group, self.isa, self.digits
        )

    def dequantize(self, isa: str | None = None) -> torch.Tensor:
        """The whole weight as fp32 ``[N, K]`` (bit-identical to ``QuantizedWeight.dequantize``)."""
        return extension().wq_dequant(
            self.codes, self.scales, self.zeros, self.n, self.k, self.bits, self.group, 0, self.n, isa_code(isa)
        )


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, isa):
        ctx.packed, ctx.isa, ctx.dtype = packed, isa, x.dtype
        return packed._forward(x, isa)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.packed.dequantize(ctx.isa)
        return (grad.float() @ w).to(ctx.dtype), None, None
