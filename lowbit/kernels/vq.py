"""lowbit's vector-quantized kernel for CPUs (``csrc/vq_gemv.cpp``): GPTVQ's weights (``kind="vq"``).

``d`` consecutive columns of a row are one vector, stored as a ``bits * d``-bit index into the codebook of its
block (``formats.vector``). ``Packed`` lays the indices out for the kernel once per weight: in 4-, 6- or 8-bit
slots, transposed so that one SIMD register holds the index of the same vector for 16 rows (64 rows for 8-bit
slots), each column group padded to whole chunks of slots. Where a codebook serves fewer rows than that (GPTVQ's
default block for 1-D codebooks, say), the codebooks a row group touches are merged into one and the indices
offset into it, when a slot can hold the merged index. The codebooks become fp32 tables split by component (plus
the fp16 codebook's byte planes for 8-bit slots, and its ``(c0, c1)`` pairs as 32-bit words for the AVX2
gathers). The lookups give the dequantized weights exactly, the activations stay fp32 and the products
accumulate in fp32, so every path agrees with dequantize-then-matmul to fp32 rounding.

Paths (``LOWBIT_ISA=portable|avx2|avx512`` or the ``isa`` argument forces one; ``Packed.path`` says which runs):
AVX-512 looks indices up across rows with ``vpermps`` / ``vpermt2ps``, and 8-bit slots with ``vpermt2b`` over
byte planes (AVX-512 VBMI; without it they take the AVX2 path); for one activation row, 2-D codewords and
codebooks of 64 rows or more it forms each vector's dot products with all codewords once per codebook and looks
those up ("pair tables"). AVX2 looks 4-bit slots up with ``vpermps`` and gathers wider ones. 4-D codewords, and
blocks that neither hold whole row groups nor merge, run on the portable path.

Up to ``MAX_ROWS`` (16) rows run the GEMV, up to ``GEMV_CHUNKS`` times that as one GEMV pass per 16 rows (the
decode of the whole weight costs more than a few passes); more rows dequantize tiles of weight rows and call the
BLAS GEMM.
Kept outliers, low-rank terms and REx rows are not the kernel's: ``QLinear`` adds them.
"""

from __future__ import annotations

import functools

import torch

from lowbit.formats import vector
from lowbit.kernels.build import build_extension, resolve_isa
from lowbit.kernels.lut import ISAS
from lowbit.quantized_weight import QuantizedWeight

MAX_ROWS = 16  # rows the GEMV takes (the kernel's kMaxRows)
GEMV_CHUNKS = 8  # up to this many chunks of MAX_ROWS rows run as GEMV passes; more rows decode tiles for BLAS
TILE_BYTES = 8 * 2**20  # one dequantized fp32 tile of weight rows for the GEMM past MAX_ROWS
SLOTS = {4: 8, 6: 5, 8: 1}  # slot bits: slots per 32-bit word of a row (8-bit slots: one byte per row)


@functools.cache
def extension():
    """The compiled module, or ``None`` where it cannot be built."""
    return build_extension("lowbit_vq_gemv", "vq_gemv.cpp", [], "its vector-quantized CPU kernel")


@functools.cache
def assign_extension():
    """The compiled k-means assignment (``csrc/vq_assign.cpp``), or ``None`` where it cannot be built. Built
    without fused multiply-adds, so every instruction set gives the same indices."""
    return build_extension("lowbit_vq_assign", "vq_assign.cpp", ["-ffp-contract=off"], "its k-means assignment kernel")


def nearest(x: torch.Tensor, books: torch.Tensor, weight: torch.Tensor, isa: str | None = None) -> torch.Tensor | None:
    """``long [B, n]``: the entry of ``books: [B, E, d]`` nearest each of ``x: [B, n, d]`` under
    ``sum_j weight_j * (x_j - c_j)^2`` (``weight``: ``[B, n, d]``), the lowest index on a tie, computed without
    forming the ``[B, n, E]`` scores; ``None`` where the kernel does not run (no compiler, a non-CPU tensor,
    vectors of other than 1, 2 or 4 components)."""
    if x.device.type != "cpu" or x.shape[-1] not in vector.DIMS:
        return None
    ext = assign_extension()
    if ext is None:
        return None
    code = resolve_isa(isa, ISAS, lambda: list(ext.available_isas()), "k-means assignment", best=("auto", "neon"))
    return ext.vq_assign(x.float(), weight.float().expand_as(x), books.float(), code)


vector.register_nearest(nearest)


def available_isas() -> list[str]:
    """The instruction sets this CPU runs the kernel with, ``portable`` first."""
    ext = extension()
    return [] if ext is None else list(ext.available_isas())


def isa_code(isa: str | None = None) -> int:
    """``isa`` (or ``LOWBIT_ISA``, or the best available) as the kernel's integer code (``neon``: the best)."""
    return resolve_isa(isa, ISAS, available_isas, "vq kernel", best=("auto", "neon"))


def supported(qw: QuantizedWeight) -> bool:
    """Whether the kernel runs ``qw``: every ``vq`` weight with fp16 or fp32 codebooks (1-, 2- and 4-D)."""
    return qw.fmt.kind == "vq" and qw.scale.dtype in (torch.float16, torch.float32)


def _slots(n: int, r: int, nblocks: int, index_bits: int) -> tuple[int, int]:
    """``(slot bits, span)`` for indices of ``index_bits`` bits in codebook blocks of ``r`` rows: the narrowest
    slot whose row groups (16 rows; 64 for 8-bit slots) each lie in one codebook (``span`` 0), or else whose
    slots hold a row group's codebooks merged into one (``span`` codebooks, the most a row group touches); the
    narrowest slot that holds the index (no SIMD path then) where neither fits."""
    for slot in (s for s in SLOTS if index_bits <= s):
        rows = 64 if slot == 8 else 16
        if r % rows == 0 or nblocks <= 1:
            return slot, 0
        first = torch.arange(0, n, rows) // r
        span = int(((torch.clamp(torch.arange(0, n, rows) + rows, max=n) - 1) // r - first).max()) + 1
        if span << index_bits <= 1 << slot:
            return slot, span
    return next(s for s in SLOTS if index_bits <= s), 0


def _merge_books(book: torch.Tensor, n: int, r: int, rows: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebooks ``[nblocks, ngroups, entries, d]`` as one per row group of ``rows`` rows and group: the
    ``span`` codebooks from the row group's first, one after another; and each row's index offset ``int32 [N]``
    (its codebook's place in the merged one)."""
    nblocks, _, entries, d = book.shape
    first = torch.arange(0, n, rows) // r  # [row groups]
    which = torch.clamp(first[:, None] + torch.arange(span), max=nblocks - 1)  # [row groups, span]
    merged = book[which].permute(0, 2, 1, 3, 4).reshape(-1, span * entries, d)  # [row groups * ngroups, ...]
    place = torch.arange(n) // r - first[torch.arange(n) // rows]
    return merged, (place * entries).to(torch.int32)


class Packed:
    """What the kernel reads: the index units, the fp32 tables ``[nbooks, d, 2^S]`` (entries past the
    codebook's zero), the byte planes ``[nbooks, 2d, 256]`` (8-bit slots, fp16 codebooks), the pairs
    ``[nbooks, 2^S]`` (2-D fp16 codebooks) and the layout's integers."""

    def __init__(self, qw: QuantizedWeight, device: torch.device):
        if not supported(qw):
            raise ValueError(f"lowbit's vq kernel cannot run {qw.fmt.describe()} with shape {qw.shape}")
        if torch.device(device).type != "cpu":
            raise ValueError(f"lowbit's vq kernel runs on CPU, not {device}")
        self.ext = extension()
        if self.ext is None:
            raise RuntimeError("lowbit's vq kernel could not be built here (see the warning); use kernel='dequant'")
        fmt = qw.fmt
        self.n, self.k = qw.matrix_shape
        d = fmt.vq_dim
        g, ngroups, r, nblocks = vector.layout(self.n, self.k, fmt)
        self.slot, span = _slots(self.n, r, nblocks, fmt.bits * d)
        per = SLOTS[self.slot]
        gv = g // d
        gvp = -(-gv // per) * per  # each group's vectors padded to whole chunks
        rows = 64 if self.slot == 8 else 16  # rows of a unit (one row group)
        nrg = -(-self.n // rows)
        book, offsets = qw.scale, None
        if span:  # each row group's codebooks merged into one (indices offset into it): a block of `rows` rows
            book, offsets = _merge_books(book.reshape(nblocks, ngroups, *book.shape[1:]), self.n, r, rows, span)
            r = rows
        per_block = max(1, r // rows if r % rows == 0 else nrg)
        simd = span > 0 or r % rows == 0 or nblocks == 1  # no row group spans two codebooks
        self.layout = [self.n, self.k, d, self.slot, gv, gvp, ngroups, r, per_block, int(simd)]
        self.codes = self.ext.vq_units(qw.packed.reshape(-1).contiguous(), self.layout, fmt.bits * d,
                                       vector.vectors(self.k, d), offsets)  # fmt: skip
        self.table, self.planes, self.pairs = _tables(book, self.slot)
        self.tile = max(16, TILE_BYTES // (4 * max(self.k, 1)))
        self.isa = isa_code()  # LOWBIT_ISA as it is when the layer first runs

    def path(self, isa: str | None = None) -> str:
        """The instruction set that runs this weight when ``isa`` is asked for (the best where ``None``)."""
        code = self.isa if isa is None else isa_code(isa)
        return self.ext.path(self.codes, self.table, self.planes, self.pairs, self.layout, code)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` in fp32 for ``x: [..., K]`` (any dtype; the result in ``x.dtype``), ``W`` the
        decoded codebook vectors (no outliers or other terms).

        Differentiable in ``x`` and ``bias`` (the weight is frozen): the backward pass is ``grad @ W``.
        Without gradients the bias is fused.
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
            y = self.ext.vq_gemv(flat, self.codes, self.table, self.planes, self.pairs, bias, self.layout, code)
        elif flat.shape[0] <= GEMV_CHUNKS * MAX_ROWS:  # a few GEMV passes cost less than decoding the weight
            y = torch.cat([self.ext.vq_gemv(flat[r : r + MAX_ROWS].contiguous(), self.codes, self.table, self.planes,
                                            self.pairs, bias, self.layout, code)
                           for r in range(0, flat.shape[0], MAX_ROWS)])  # fmt: skip
        else:
            y = self._gemm(flat, bias)
        y = y.view(*x.shape[:-1], self.n)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _gemm(self, flat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Tiles of ``tile`` dequantized weight rows met by the BLAS GEMM (the fp32 weight never exists whole)."""
        y = torch.empty(flat.shape[0], self.n)
        for n0 in range(0, self.n, self.tile):
            n1 = min(self.n, n0 + self.tile)
            w = self.ext.vq_dequant(self.codes, self.table, self.layout, n0, n1)
            if bias is None:
                torch.mm(flat, w.t(), out=y[:, n0:n1])
            else:
                torch.addmm(bias[n0:n1], flat, w.t(), out=y[:, n0:n1])
        return y

    def dequantize(self) -> torch.Tensor:
        """The decoded weight as fp32 ``[N, K]`` (``vector.dequantize``'s, bit for bit)."""
        return self.ext.vq_dequant(self.codes, self.table, self.layout, 0, self.n)


def _tables(book: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(tables, planes, pairs)`` of the codebooks ``book [nbooks, entries, d]`` (``planes`` and ``pairs``
    ``None`` where they do not apply)."""
    nbooks, entries, d = book.shape
    size = 1 << slot
    tables = torch.zeros(nbooks, d, size)
    tables[:, :, :entries] = book.float().transpose(1, 2)
    planes = pairs = None
    if book.dtype == torch.float16:
        if slot == 8:
            bits = book.view(torch.int16).transpose(1, 2).to(torch.int32) & 0xFFFF  # [nbooks, d, entries]
            planes = torch.zeros(nbooks, d, 2, 256, dtype=torch.uint8)
            planes[:, :, 0, :entries] = (bits & 0xFF).to(torch.uint8)
            planes[:, :, 1, :entries] = (bits >> 8).to(torch.uint8)
            planes = planes.reshape(-1)
        if d == 2:
            pairs = torch.zeros(nbooks, size, dtype=torch.int32)
            pairs[:, :entries] = book.contiguous().view(torch.int32).reshape(nbooks, entries)
    return tables.reshape(-1).contiguous(), planes, pairs


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, isa):
        ctx.packed, ctx.dtype = packed, x.dtype
        return packed._forward(x, isa)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.packed.dequantize()
        return (grad.float() @ w).to(ctx.dtype), None, None
