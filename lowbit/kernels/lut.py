"""lowbit's look-up-table kernel for CPUs (``csrc/lut_gemv.cpp``): weights whose value is a table entry.

A weight ``W[n, k] = T[n, g][q[n, k]]`` is its code looked up in its row's (or group's) table:
a learned codebook (``kind="lut"``: SqueezeLLM, GOBO, k-means), or a fixed codebook times the
group's scale (``nf4``, ``fp4``), and 2- and 3-bit integer grids (each group's levels ``(q - zero) *
scale``). ``decode_table`` turns each kind into that one form, and the
kernel reads the codes as ``QuantizedWeight`` stores them, 2, 3 or 4 bits (5 to 8 on the
portable path). Each group's table is formed once in fp32 and held in registers (AVX2
``vpermps`` over two halves of 8 entries, AVX-512 ``vpermps`` over all 16), the activations
stay fp32 and the products accumulate in fp32, so every path agrees with dequantize-then-matmul
to fp32 rounding. The instruction set is chosen at run time; ``LOWBIT_ISA=portable|avx2|avx512``
(or the ``isa`` argument) forces one, which is how the tests check every path on one machine.

Up to ``MAX_ROWS`` (16) rows run the GEMV; more rows dequantize tiles of weight rows and call
the BLAS GEMM. Kept outliers (``QuantizedWeight.outliers``) are added by the kernel itself in
the same pass (``y += x @ S^T``), or by its CSR add after the GEMM.
"""

from __future__ import annotations

import functools

import torch

from lowbit.formats import binary, codebook, floating, integer
from lowbit.formats.spec import SCALED_CODEBOOKS
from lowbit.kernels.build import build_extension, resolve_isa
from lowbit.quantized_weight import QuantizedWeight

ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
KINDS = ("lut", "bcq", *SCALED_CODEBOOKS, "int")  # the kinds decode_table turns into tables
INT_BITS = (2, 3)  # integer grids the LUT kernel runs (4 and 8 bits have the integer kernels, kernels/wq.py)
MAX_ROWS = 16  # rows the GEMV takes (the kernel's kMaxRows)
PAD = 8  # zero bytes after the code stream, so that SIMD loads of the last codes stay inside it
TILE_BYTES = 8 * 2**20  # one dequantized fp32 tile of weight rows for the GEMM past MAX_ROWS


@functools.cache
def extension():
    """The compiled module, or ``None`` where it cannot be built."""
    return build_extension("lowbit_lut_gemv", "lut_gemv.cpp", [], "its look-up-table CPU kernel")


def available_isas() -> list[str]:
    """The instruction sets this CPU runs the kernel with, ``portable`` first."""
    ext = extension()
    return [] if ext is None else list(ext.available_isas())


def isa_code(isa: str | None = None) -> int:
    """``isa`` (or ``LOWBIT_ISA``, or the best available) as the kernel's integer code.

    ``neon`` (a path of the integer kernels only) runs this kernel's best path: portable C++ on AArch64.
    """
    return resolve_isa(isa, ISAS, available_isas, "LUT kernel", best=("auto", "neon"))


def supported(qw: QuantizedWeight) -> bool:
    """Whether the kernel runs ``qw``: a kind of ``KINDS`` with 2- to 8-bit codes and fp16 / fp32 tables."""
    fmt = qw.fmt
    if fmt.kind == "int" and fmt.bits not in INT_BITS:
        return False
    return fmt.kind in KINDS and 2 <= fmt.bits <= 8 and qw.scale.dtype in (torch.float16, torch.float32)


def decode_table(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values each code stands for, as ``(table, scale)``:

    - ``table [out, ngroups, 2^bits]`` in the stored dtype (fp16, or fp32 where fp16 would change
      a value) and ``scale=None``: a table per row or group (``lut``; a per-tensor table is ``[1, 1, 2^bits]``);
    - ``table fp32 [1, 1, 2^bits]`` shared by every group and ``scale [out, ngroups]``: ``W = table[q] * scale``
      (``nf4``, ``fp4``).
    """
    kind, bits = qw.fmt.kind, qw.fmt.bits
    rows, k = qw.matrix_shape
    levels = codebook.levels(bits)
    if kind == "lut":
        per_tensor = qw.scale.numel() == levels  # one table for the whole weight (GOBO)
        ngroups = 1 if per_tensor else integer.num_groups(k, qw.fmt.group_size)
        return qw.scale.reshape(1 if per_tensor else rows, ngroups, levels), None
    if kind in SCALED_CODEBOOKS:  # nf4, fp4 and the pot / apot / log grids: one table times a scale
        ngroups = integer.num_groups(k, qw.fmt.group_size)
        scale = qw.scale if qw.scale.numel() != 1 else qw.scale.reshape(1, 1).expand(rows, ngroups)
        return floating.codebook(kind, bits).float().reshape(1, 1, levels), scale.reshape(rows, ngroups)
    if kind == "bcq":  # binary coding: each group's 2^bits signed sums of its alphas plus its offset (fp16)
        ngroups = integer.num_groups(k, qw.fmt.group_size)
        return binary.table(qw.scale, bits, rows, ngroups).half().reshape(rows, ngroups, levels), None
    if kind == "int" and bits in INT_BITS:  # 2- and 3-bit grids: each group's levels (q - zero) * scale in fp32,
        ngroups = integer.num_groups(k, qw.fmt.group_size)  # the operations dequantize does, so the same values
        scale, zero = qw.scale.float().reshape(-1), qw.zero_or_default().float().reshape(-1)
        if scale.numel() == 1:  # per-tensor
            scale, zero = scale.expand(rows * ngroups), zero.expand(rows * ngroups)
        q = torch.arange(levels, dtype=torch.float32)
        return (q - zero.reshape(rows, ngroups, 1)) * scale.reshape(rows, ngroups, 1), None
    raise ValueError(f"lowbit's LUT kernel cannot decode {qw.fmt.describe()}; it runs {', '.join(KINDS)} "
                     f"(integer grids of {' and '.join(map(str, INT_BITS))} bits)")


class Packed:
    """What the kernel reads: the stored codes padded with ``PAD`` zero bytes, the tables (or the
    shared table and ``[N, G]`` scales) and the outliers as int32 / fp32 CSR arrays."""

    def __init__(self, qw: QuantizedWeight, device: torch.device):
        if not supported(qw):
            raise ValueError(f"lowbit's LUT kernel cannot run {qw.fmt.describe()} with shape {qw.shape}")
        if torch.device(device).type != "cpu":
            raise ValueError(f"lowbit's LUT kernel runs on CPU, not {device}")
        self.n, self.k = qw.matrix_shape
        self.bits = qw.fmt.bits
        self.group = max(1, integer.effective_group_size(self.k, qw.fmt.group_size))
        ngroups = integer.num_groups(self.k, qw.fmt.group_size)
        table, scale = decode_table(qw)
        if scale is None and table.shape[0] != self.n:  # one table for the whole weight: one per row
            table = table.expand(self.n, ngroups, -1)
        self.table = table.contiguous().reshape(-1)
        self.scale = None if scale is None else scale.contiguous()
        self.codes = torch.cat([qw.packed.reshape(-1), torch.zeros(PAD, dtype=torch.uint8)])
        o = qw.outliers
        self.crow = None if o is None else o.crow.to(torch.int32).contiguous()
        self.col = None if o is None else o.col.to(torch.int32).contiguous()
        self.val = None if o is None else o.val.float().contiguous()
        self.tile = max(16, TILE_BYTES // (4 * max(self.k, 1)))
        self.isa = isa_code()  # LOWBIT_ISA as it is when the layer first runs
        self.ext = extension()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` in fp32 for ``x: [..., K]`` (any dtype; the result in ``x.dtype``),
        ``W`` the dequantized weight with its outliers.

        Differentiable in ``x`` and ``bias`` (the weight is frozen): the backward pass is
        ``grad @ W``. Without gradients the bias is fused.
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
        flat = flat.contiguous()
        if flat.shape[0] <= MAX_ROWS:
            y = self.ext.lut_gemv(flat, self.codes, self.table, self.scale, self.crow, self.col, self.val, bias,
                                  self.n, self.bits, self.group, code)  # fmt: skip
        else:
            y = self._gemm(flat, bias)
        y = y.view(*x.shape[:-1], self.n)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _gemm(self, flat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Tiles of ``tile`` dequantized weight rows met by the BLAS GEMM (the fp32 weight never
        exists whole), then the outliers."""
        y = torch.empty(flat.shape[0], self.n)
        for n0 in range(0, self.n, self.tile):
            n1 = min(self.n, n0 + self.tile)
            w = self.ext.lut_dequant(self.codes, self.table, self.scale, self.n, self.k, self.bits, self.group, n0, n1)
            if bias is None:
                torch.mm(flat, w.t(), out=y[:, n0:n1])
            else:
                torch.addmm(bias[n0:n1], flat, w.t(), out=y[:, n0:n1])
        if self.crow is not None:
            self.ext.csr_add(y, flat, self.crow, self.col, self.val)
        return y

    def dequantize(self) -> torch.Tensor:
        """The whole weight as fp32 ``[N, K]``, outliers included (``QuantizedWeight.dequantize``'s matrix view)."""
        w = self.ext.lut_dequant(self.codes, self.table, self.scale, self.n, self.k, self.bits, self.group, 0, self.n)
        if self.crow is not None:
            rows = torch.repeat_interleave(torch.arange(self.n), (self.crow[1:] - self.crow[:-1]).long())
            w.index_put_((rows, self.col.long()), self.val, accumulate=True)
        return w


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, isa):
        ctx.packed, ctx.dtype = packed, x.dtype
        return packed._forward(x, isa)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.packed.dequantize()
        return (grad.float() @ w).to(ctx.dtype), None, None
