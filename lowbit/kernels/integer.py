"""Integer-only arithmetic for transformer encoders (I-BERT, Kim et al. 2021; I-ViT, Li & Gu 2023).

Every op here takes tensors of integers and returns integers: dyadic
requantization (multiply by an integer, add half, shift right), integer
square root, the two integer exponentials (I-BERT's second-order polynomial
and I-ViT's shift-based base-2 form), the softmaxes, GELUs and LayerNorm built
on them. Scales never appear at run time: they are folded offline into the
integer multipliers, shifts and constants that ``lowbit.nn.integer`` builds.

The ops are written once against a *backend* — the handful of primitives an
integer graph needs (add, multiply, floor division, shift, clamp, max, sum,
integer matmul, gather, reshape) — so one model definition runs three ways:

- ``TorchBackend()``: int8/int32/int64 torch tensors (the deployed path);
- ``TorchBackend(simulate=True)``: the same integers carried in float64, as the
  I-BERT/I-ViT reference code computes them. Every intermediate is kept below
  2**53 (the sizes below are chosen for it), so the two agree bit for bit, and
  any int32/int64 overflow would show as a mismatch;
- ``OnnxBackend``: records an ONNX graph of integer ops (``MatMulInteger``,
  integer ``Add``/``Mul``/``Div``/``Mod``, ``ReduceMax``/``ReduceSum``, ``Gather``),
  which ONNX Runtime runs to the same integers.

Floor semantics throughout: a right shift is floor division by a power of two
(arithmetic shift on negative numbers), and floor division of a negative by a
positive number rounds down, in all three backends.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MULT_BITS = 20  # dyadic multipliers lie in [2**19, 2**20): 6e-7 relative precision
EXACT_BITS = 52  # every intermediate stays below 2**52, so float64 simulation is exact
RESIDUAL_BITS = 16  # residual stream and LayerNorm inputs: signed 16-bit values held in int32
SOFTMAX_BITS = 8  # softmax probabilities: unsigned, scale 2**-8
EXP_MAX_SHIFT = 30  # exp(x) for x below -30 ln 2 is taken as its 2**-30 value (I-BERT's n = 30)


# --- backends --------------------------------------------------------------------------------------------------


@functools.cache
def fused_kernels():
    """The compiled fused integer ops (``csrc/integer_ops.cpp``: portable C++, any CPU), or ``None``."""
    from lowbit.kernels.build import build_extension

    return build_extension("lowbit_integer_ops", "integer_ops.cpp", [], "its fused integer kernels")


class TorchBackend:
    """Integer primitives on torch tensors: real integer dtypes, or (``simulate``) their values in float64.

    With ``fused`` (the default for integer tensors on the CPU) requantization, softmax, LayerNorm and
    GELU run as one C++ pass each (``fused_kernels``), computing the same integers as the composite ops.
    """

    def __init__(self, simulate: bool = False, fused: bool = True):
        self.simulate = simulate
        self.wide = torch.float64 if simulate else torch.int64
        self.kernels = fused_kernels() if fused and not simulate else None

    def fused(self, x):
        """The fused kernels when they can take ``x`` (an integer CPU tensor), else ``None``."""
        if self.kernels is None or not torch.is_tensor(x) or x.is_floating_point() or x.device.type != "cpu":
            return None
        return self.kernels

    def const(self, value: torch.Tensor | int) -> torch.Tensor:
        """A constant (weights, multipliers) in this backend's form: its own integer dtype, or float64."""
        if not torch.is_tensor(value):
            value = torch.tensor(value, dtype=torch.int64)
        return value.to(torch.float64) if self.simulate else value

    def cast(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        """``x`` as ``dtype`` ('int8', 'uint8', 'int16', 'int32', 'int64'); values must already fit (clamp first)."""
        return x if self.simulate else x.to(getattr(torch, dtype))

    def wide_(self, x: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(x):
            return self.const(x)
        return x if x.dtype == self.wide else x.to(self.wide)

    def add(self, x, y):
        return self.wide_(x) + y

    def sub(self, x, y):
        return self.wide_(x) - y

    def mul(self, x, y):
        return self.wide_(x) * y

    def floordiv(self, x, y):
        """``floor(x / y)`` for ``y > 0``; exact in float64 too (PyTorch's floor division goes through fmod)."""
        return torch.div(self.wide_(x), y, rounding_mode="floor")

    def shr(self, x, s: int | torch.Tensor):
        """``floor(x / 2**s)``: an arithmetic right shift."""
        if self.simulate:
            return torch.div(x, 2.0**s, rounding_mode="floor")
        return torch.bitwise_right_shift(self.wide_(x), s)

    def clamp(self, x, lo: int, hi: int):
        return torch.clamp(x, lo, hi)

    def maximum(self, x, y):
        return torch.maximum(self.wide_(x), self.wide_(y) if torch.is_tensor(y) else self.const(y))

    def minimum(self, x, y):
        return torch.minimum(self.wide_(x), self.wide_(y) if torch.is_tensor(y) else self.const(y))

    def abs(self, x):
        return torch.abs(x)

    def sign(self, x):
        return torch.sign(x)

    def amax(self, x, dim: int):
        return torch.amax(x, dim=dim, keepdim=True)

    def sum(self, x, dim: int):
        return torch.sum(self.wide_(x), dim=dim, keepdim=True)

    def where_zero(self, keep, x):
        """``x`` where ``keep`` is nonzero, 0 elsewhere (``keep`` broadcasts against ``x``)."""
        return torch.where(keep != 0, x, torch.zeros((), dtype=x.dtype))

    def where_fill(self, keep, x, fill: int):
        """``x`` where ``keep`` is nonzero, ``fill`` elsewhere."""
        return torch.where(keep != 0, x, torch.full((), fill, dtype=x.dtype))

    def matmul(self, a, b):
        """``a @ b`` of 8-bit integers (``a`` int8 or uint8 values, ``b`` int8), exact, as int32.

        A 2-D weight goes through ``torch._int_mm`` (int8 x int8 -> int32, oneDNN's
        integer GEMM); batched products (attention) through int32 matmul.
        """
        if self.simulate:
            return a.to(torch.float64) @ b.to(torch.float64)
        if b.dim() == 2 and a.dtype == torch.int8 and b.dtype == torch.int8:
            lead = a.shape[:-1]
            return torch._int_mm(a.reshape(-1, a.shape[-1]), b).view(*lead, b.shape[-1])
        return a.to(torch.int32) @ b.to(torch.int32)

    def matmul_nt(self, a, b):
        """``a @ b^T`` over the last two axes of 8-bit integers (``a`` int8 or uint8, ``b`` int8), as int32."""
        if self.simulate:
            return a.to(torch.float64) @ b.to(torch.float64).transpose(-2, -1)
        k = self.fused(a)
        if k is not None and a.dtype in (torch.int8, torch.uint8) and b.dtype == torch.int8:
            return k.bmm_nt(a, b)
        return a.to(torch.int32) @ b.to(torch.int32).transpose(-2, -1)

    def gather(self, table, ids):
        return table[ids]

    def positions(self, ids):
        """``[0, 1, ..., T-1]`` for ``ids`` of shape ``[N, T]``."""
        return torch.arange(ids.shape[1], device=ids.device)

    def reshape(self, x, shape: list[int]):
        """ONNX semantics: 0 copies the input's size there, -1 is inferred."""
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    def permute(self, x, perm: list[int]):
        return x.permute(perm)

    def slice(self, x, dim: int, start: int, end: int):
        return x.narrow(dim, start, min(end, x.shape[dim]) - start)

    def concat(self, xs, dim: int):
        return torch.cat([self.wide_(x) for x in xs], dim=dim)


@dataclass
class OnnxValue:
    name: str
    dtype: str  # 'int8', 'uint8', 'int16', 'int32', 'int64', 'float'


class OnnxBackend:
    """Records the same integer computation as ONNX nodes; ``graph`` puts them in a model.

    Elementwise ops run in int64 (ONNX does not promote types, so every operand is
    cast there first); ``matmul`` casts its operands to 8 bits for
    ``MatMulInteger``. Floor division is ``(x - Mod(x, y)) / y``: ONNX's integer
    ``Div`` truncates toward zero, its ``Mod`` (fmod=0) takes the divisor's sign,
    which for ``y > 0`` makes the difference an exact multiple of ``y``.
    """

    def __init__(self):
        import onnx  # noqa: F401  (fail early with the import error, not halfway through a graph)

        self.nodes: list = []
        self.initializers: list = []
        self._consts: dict = {}
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def node(self, op: str, inputs: list, dtype: str, **attrs) -> OnnxValue:
        from onnx import helper

        out = self._name(op.lower())
        self.nodes.append(
            helper.make_node(op, [i.name if isinstance(i, OnnxValue) else i for i in inputs], [out], **attrs)
        )
        return OnnxValue(out, dtype)

    def const(self, value: torch.Tensor | int) -> OnnxValue:
        from onnx import numpy_helper

        if not torch.is_tensor(value):
            value = torch.tensor(value, dtype=torch.int64)
        value = value.detach().cpu().contiguous()
        key = (value.dtype, tuple(value.shape), hash(value.numpy().tobytes()))
        if key not in self._consts:
            name = self._name("const")
            self.initializers.append(numpy_helper.from_array(value.numpy(), name))
            self._consts[key] = OnnxValue(name, str(value.dtype).removeprefix("torch.").replace("float32", "float"))
        return self._consts[key]

    def _as(self, x, dtype: str) -> OnnxValue:
        from onnx import TensorProto

        if not isinstance(x, OnnxValue):
            x = self.const(x)
        if x.dtype == dtype:
            return x
        return self.node("Cast", [x], dtype, to=getattr(TensorProto, dtype.upper()))

    def cast(self, x, dtype: str) -> OnnxValue:
        return self._as(x, dtype)

    def _binary(self, op: str, x, y) -> OnnxValue:
        return self.node(op, [self._as(x, "int64"), self._as(y, "int64")], "int64")

    def add(self, x, y):
        return self._binary("Add", x, y)

    def sub(self, x, y):
        return self._binary("Sub", x, y)

    def mul(self, x, y):
        return self._binary("Mul", x, y)

    def floordiv(self, x, y):
        x, y = self._as(x, "int64"), self._as(y, "int64")
        rem = self.node("Mod", [x, y], "int64", fmod=0)
        return self.node("Div", [self.sub(x, rem), y], "int64")

    OFFSET = 1 << 62  # a multiple of every 2**s used here; |x| < 2**52 keeps x + OFFSET positive

    def shr(self, x, s):
        """``floor(x / 2**s)`` by an unsigned shift (ONNX's ``BitShift`` takes unsigned types only):
        ``((x + 2**62) >> s) - (2**62 >> s)``, exact for ``|x| < 2**62``, no division."""
        if isinstance(s, OnnxValue):  # a computed shift (exp's integer part)
            s = self._as(s, "uint64")
            back = self.node("BitShift", [self._as(self.const(self.OFFSET), "uint64"), s], "uint64", direction="RIGHT")
        else:
            s_t = torch.as_tensor(s, dtype=torch.int64)
            back = self.const(torch.bitwise_right_shift(torch.full_like(s_t, self.OFFSET), s_t))
            s = self._as(self.const(s_t), "uint64")
        lifted = self._as(self.add(x, self.OFFSET), "uint64")
        shifted = self._as(self.node("BitShift", [lifted, s], "uint64", direction="RIGHT"), "int64")
        return self.sub(shifted, back)

    def clamp(self, x, lo: int, hi: int):
        return self.node("Clip", [self._as(x, "int64"), self.const(lo), self.const(hi)], "int64")

    def maximum(self, x, y):
        return self._binary("Max", x, y)

    def minimum(self, x, y):
        return self._binary("Min", x, y)

    def abs(self, x):
        return self.node("Abs", [self._as(x, "int64")], "int64")

    def sign(self, x):
        return self.node("Sign", [self._as(x, "int64")], "int64")

    def amax(self, x, dim: int):
        return self.node("ReduceMax", [self._as(x, "int64"), self.const(torch.tensor([dim]))], "int64", keepdims=1)

    def sum(self, x, dim: int):
        return self.node("ReduceSum", [self._as(x, "int64"), self.const(torch.tensor([dim]))], "int64", keepdims=1)

    def where_zero(self, keep, x):
        return self.where_fill(keep, x, 0)

    def where_fill(self, keep, x, fill: int):
        cond = self.node("Not", [self.node("Equal", [self._as(keep, "int64"), self.const(0)], "bool")], "bool")
        return self.node("Where", [cond, self._as(x, "int64"), self.const(fill)], "int64")

    def matmul(self, a, b):
        a = a if isinstance(a, OnnxValue) and a.dtype in ("int8", "uint8") else self._as(a, "int8")
        b = b if isinstance(b, OnnxValue) and b.dtype in ("int8", "uint8") else self._as(b, "int8")
        return self.node("MatMulInteger", [a, b], "int32")

    def matmul_nt(self, a, b):
        """``a @ b^T`` of 4-D operands (``[N, H, M, K]`` and ``[N, H, N', K]``) by ``MatMulInteger``."""
        return self.matmul(a, self.permute(self._as(b, "int8"), [0, 1, 3, 2]))

    def gather(self, table, ids):
        table = self.const(table) if torch.is_tensor(table) else table
        return self.node("Gather", [table, self._as(ids, "int64")], table.dtype, axis=0)

    def positions(self, ids):
        shape = self.node("Shape", [ids], "int64")
        length = self.node("Gather", [shape, self.const(1)], "int64", axis=0)
        return self.node("Range", [self.const(0), length, self.const(1)], "int64")

    def reshape(self, x, shape: list[int]):
        return self.node("Reshape", [x, self.const(torch.tensor(shape, dtype=torch.int64))], x.dtype)

    def permute(self, x, perm: list[int]):
        return self.node("Transpose", [x], x.dtype, perm=list(perm))

    def slice(self, x, dim: int, start: int, end: int):
        c = [self.const(torch.tensor([v], dtype=torch.int64)) for v in (start, end, dim)]
        return self.node("Slice", [x, *c], x.dtype)

    def concat(self, xs, dim: int):
        return self.node("Concat", [self._as(x, "int64") for x in xs], "int64", axis=dim)


# --- dyadic requantization ---------------------------------------------------------------------------------------


@dataclass
class Requant:
    """``y = clamp((((x + bias) >> pre) * m + 2**(s-1)) >> s, lo, hi)``: ``x`` at one scale to ``y`` at another.

    ``m``/``s`` are int64 tensors broadcasting over the last axis (one per output
    channel, or one for the tensor); ``pre`` drops low bits first when ``x`` is so
    wide that ``x * m`` would pass 2**52; ``bias`` (int64, one per channel, or
    ``None``) is a linear layer's integer bias, added to its accumulator here.
    """

    pre: int
    m: torch.Tensor
    s: torch.Tensor
    lo: int
    hi: int
    bias: torch.Tensor | None = None

    @classmethod
    def make(cls, ratio: float | torch.Tensor, bound: float, bits: int, signed: bool = True,
             bias: torch.Tensor | None = None, lo: int | None = None) -> Requant:  # fmt: skip
        """Multiply by ``ratio`` (> 0; the input scale over the output scale), for inputs below ``bound`` in
        magnitude, into a ``bits``-wide integer (symmetric ``±(2**(bits-1) - 1)``, or ``[0, 2**bits - 1]``)."""
        ratio = torch.as_tensor(ratio, dtype=torch.float64).reshape(-1)
        if not (torch.isfinite(ratio).all() and (ratio > 0).all()):
            raise ValueError(f"requantization ratios must be finite and positive; got {ratio.tolist()[:4]}")
        pre = max(0, math.ceil(math.log2(max(bound, 1.0) + 1)) + MULT_BITS - EXACT_BITS)
        ratio = ratio * 2.0**pre
        s = (MULT_BITS - 1 - torch.floor(torch.log2(ratio))).clamp(min=0).to(torch.int64)
        m = torch.round(ratio * torch.pow(2.0, s.double())).to(torch.int64)
        over = m >= 1 << MULT_BITS
        m = torch.where(over & (s > 0), torch.div(m + 1, 2, rounding_mode="floor"), m)
        s = torch.where(over & (s > 0), s - 1, s)
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        low = (-hi if signed else 0) if lo is None else lo
        return cls(pre, m, s, low, hi, None if bias is None else bias.to(torch.int64))

    def __call__(self, o, x):
        k = o.fused(x) if isinstance(o, TorchBackend) else None
        if k is not None:
            out = torch.int8 if -128 <= self.lo and self.hi <= 127 else torch.int32 if self.hi < 2**31 else torch.int64
            bias = self.bias if self.bias is not None else torch.empty(0, dtype=torch.int64)
            return k.requant(x, self.pre, self.m, self.s, bias, self.lo, self.hi, out)
        if self.bias is not None:
            x = o.add(x, o.const(self.bias))
        if self.pre:
            x = o.shr(x, self.pre)
        half = torch.div(torch.bitwise_left_shift(torch.ones_like(self.s), self.s), 2, rounding_mode="floor")
        y = o.shr(o.add(o.mul(x, o.const(self.m)), o.const(half)), self.s if self.s.numel() > 1 else int(self.s))
        return o.clamp(y, self.lo, self.hi)



# --- integer functions -------------------------------------------------------------------------------------------


def isqrt(o, v, iterations: int = 28, start_bits: int = 21):
    """``floor(sqrt(v))`` for ``1 <= v < 2**(2 * start_bits)``: Newton's iteration in integers from ``2**start_bits``,
    which decreases monotonically to the root (at most ``start_bits`` halvings, then quadratic convergence)."""
    x = o.add(o.mul(v, 0), 1 << start_bits)
    for _ in range(iterations):
        x = o.maximum(o.minimum(x, o.shr(o.add(x, o.floordiv(v, x)), 1)), 1)
    return x


@dataclass
class ExpConstants:
    """Integer constants of exp at input scale ``S``, for I-BERT's polynomial or I-ViT's shift form."""

    kind: str  # 'poly' (I-BERT) or 'shift' (I-ViT)
    x0: int  # the integer for ln 2 (poly) or 1 (shift, after multiplying by log2 e) at scale S
    b: int = 0
    c: int = 0

    @classmethod
    def make(cls, kind: str, scale: float) -> ExpConstants:
        if kind == "poly":  # exp(p) ~ 0.3585 (p + 1.353)**2 + 0.344 on (-ln 2, 0] (I-BERT, eq. 8)
            return cls(
                kind,
                x0=math.floor(math.log(2) / scale),
                b=math.floor(1.353 / scale),
                c=math.floor(0.344 / (0.3585 * scale**2)),
            )
        if kind == "shift":
            return cls(kind, x0=max(1, round(1.0 / scale)))
        raise ValueError(f"exp kind {kind!r}: use 'poly' (I-BERT) or 'shift' (I-ViT)")


def int_exp(o, x, k: ExpConstants):
    """``exp(x * S)`` for integer ``x <= 0``, at an (unnamed) scale common to all outputs of the same ``k``.

    ``poly`` (I-BERT): ``x = -z ln2 + p`` with ``p`` in (-ln 2, 0], then the
    second-order polynomial of ``p``, shifted right by ``z``. ``shift`` (I-ViT's
    Shiftmax): ``x log2 e`` as ``x + x/2 - x/16``, split into ``-z + r`` with
    ``r`` in (-1, 0], ``2**r`` as ``1 + r/2``, shifted by ``z`` (left-aligned
    by 16 bits first so that the shift loses little).
    """
    if k.kind == "shift":
        x = o.sub(o.add(x, o.shr(x, 1)), o.shr(x, 4))
    x = o.maximum(x, -EXP_MAX_SHIFT * k.x0)
    z = o.floordiv(o.mul(x, -1), k.x0)
    r = o.add(x, o.mul(z, k.x0))  # in (-x0, 0]
    if k.kind == "poly":
        t = o.add(r, k.b)
        return o.shr(o.add(o.mul(t, t), k.c), z)
    return o.shr(o.mul(o.add(o.shr(r, 1), k.x0), 1 << 16), z)


def int_softmax(o, x, k: ExpConstants, keep=None, bits: int = SOFTMAX_BITS):
    """Softmax over the last axis of integer scores ``x`` (scale S inside ``k``), as unsigned ``bits``-bit
    probabilities at scale ``2**-bits`` (rounded, the last value clamped); ``keep`` masks keys out (exactly 0)."""
    k_ops = o.fused(x) if isinstance(o, TorchBackend) else None
    if k_ops is not None:
        t = x.shape[-1]
        mask = torch.empty(0, dtype=torch.int64) if keep is None else keep.reshape(-1, t)
        per = x.numel() // t // (1 if keep is None else mask.shape[0])
        return k_ops.softmax(x, mask, per, 0 if k.kind == "poly" else 1, k.x0, k.b, k.c, EXP_MAX_SHIFT, bits)
    if keep is not None:
        x = o.where_fill(keep, x, -(1 << 40))
    e = int_exp(o, o.sub(x, o.amax(x, -1)), k)
    if keep is not None:
        e = o.where_zero(keep, e)
    total = o.sum(e, -1)
    p = o.floordiv(o.add(o.mul(e, 1 << (bits + 1)), total), o.mul(total, 2))
    return o.clamp(p, 0, (1 << bits) - 1)


@dataclass
class GeluConstants:
    """Integer constants of GELU at input scale ``S``; ``out_scale`` is the scale of ``int_gelu``'s result."""

    kind: str  # 'poly' (I-BERT i-GELU) or 'shift' (I-ViT ShiftGELU)
    out_scale: float
    b: int = 0
    c: int = 0
    exp: ExpConstants | None = None
    frac_bits: int = 15

    @classmethod
    def make(cls, kind: str, scale: float) -> GeluConstants:
        if kind == "poly":  # erf(u) ~ sign(u) (a (min(|u|, -b) + b)**2 + 1), a = -0.2888, b = -1.769 (I-BERT, eq. 12)
            a, b = -0.2888, -1.769
            se = scale / math.sqrt(2)
            c = math.floor(1 / (a * se**2))  # the "1" at scale a * se**2 (negative)
            return cls(kind, out_scale=-scale * a * se**2 / 2, b=math.floor(b / se), c=c)  # the sign goes into int_gelu
        if kind == "shift":  # x sigmoid(1.702 x), 1.702 ~ 1 + 1/2 + 1/8 + 1/16 (I-ViT, eq. 14)
            return cls(kind, out_scale=scale * 2.0**-15, exp=ExpConstants.make("shift", scale))
        raise ValueError(f"GELU kind {kind!r}: use 'poly' (I-BERT) or 'shift' (I-ViT)")


def int_gelu(o, x, g: GeluConstants):
    """GELU of integer ``x``; the result's scale is ``g.out_scale``."""
    k = o.fused(x) if isinstance(o, TorchBackend) else None
    if k is not None:
        x0 = g.exp.x0 if g.exp is not None else 0
        return k.gelu(x, 0 if g.kind == "poly" else 1, g.b, g.c, x0, EXP_MAX_SHIFT, g.frac_bits)
    if g.kind == "poly":
        sgn = o.sign(x)
        t = o.add(o.minimum(o.abs(x), -g.b), g.b)
        erf = o.mul(sgn, o.add(o.mul(t, t), g.c))  # at scale a * se**2, sign included
        return o.mul(o.mul(x, -1), o.add(erf, g.c))  # -x (erf + 1): a * se**2 < 0, so out_scale carries the other sign
    t = o.add(o.add(o.add(x, o.shr(x, 1)), o.shr(x, 3)), o.shr(x, 4))
    top = o.maximum(t, 0)
    e1 = int_exp(o, o.sub(t, top), g.exp)
    e0 = int_exp(o, o.mul(top, -1), g.exp)
    sig = o.floordiv(o.mul(e1, 1 << g.frac_bits), o.add(e0, e1))  # sigmoid at scale 2**-15
    return o.mul(x, sig)


@dataclass
class LayerNormConstants:
    """I-LayerNorm: integer mean and variance, integer square root, fixed-point normalize, integer affine."""

    n: int
    eps: int  # eps in units of (S / 2**up)**2
    up: int  # input bits added before the variance, so that the root keeps precision
    frac: int  # the normalized value has scale 2**-frac
    gamma: torch.Tensor  # int64 [C]: gamma 2**(s - frac) / S_out (S_out: one scale, or one per channel)
    beta: torch.Tensor  # int64 [C]: beta 2**s / S_out
    out: Requant  # only its shift and clamp are used (m = 1)

    @classmethod
    def make(
        cls,
        ln: torch.nn.LayerNorm,
        in_scale: float,
        out_scale: float | torch.Tensor,
        out_bits: int = 8,
        in_bits: int = RESIDUAL_BITS,
    ) -> LayerNormConstants:
        if ln.weight is None:
            raise ValueError("integer LayerNorm needs an affine LayerNorm (elementwise_affine=True)")
        n = ln.normalized_shape[-1]
        up = max(0, (EXACT_BITS - 1 - math.ceil(math.log2(n))) // 2 - in_bits)
        up = min(up, 8)
        frac = 10
        gamma = ln.weight.detach().double()
        beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros_like(gamma)
        out_scale = torch.as_tensor(out_scale, dtype=torch.float64)  # one, or one per channel
        gmax = max((gamma.abs() / out_scale).max().item(), 1e-30)
        s = max(0, frac + math.floor(math.log2(2.0**15 / gmax)))
        hi = (1 << (out_bits - 1)) - 1
        eps = max(1, round(ln.eps / (in_scale / 2**up) ** 2))
        return cls(
            n,
            eps,
            up,
            frac,
            torch.round(gamma * 2.0 ** (s - frac) / out_scale).to(torch.int64),
            torch.round(beta * 2.0**s / out_scale).clamp(-(2**40), 2**40).to(torch.int64),
            Requant(0, torch.ones(1, dtype=torch.int64), torch.tensor([s]), -hi, hi),
        )


def int_layernorm(o, x, c: LayerNormConstants):
    """LayerNorm over the last axis of integer ``x``, into ``c.out``'s integer range at the output scale."""
    start = max(1, (EXACT_BITS - math.ceil(math.log2(c.n))) // 2 + 1)
    k = o.fused(x) if isinstance(o, TorchBackend) else None
    if k is not None:
        out = torch.int8 if c.out.hi <= 127 else torch.int32
        s = int(c.out.s)
        return k.layernorm(x, c.eps, c.up, c.frac, c.gamma, c.beta, s, c.out.lo, c.out.hi, start, 28, out)
    total = o.sum(x, -1)
    mean = o.floordiv(o.add(total, c.n // 2), c.n)
    y = o.mul(o.sub(x, mean), 1 << c.up)
    var = o.add(o.floordiv(o.sum(o.mul(y, y), -1), c.n), c.eps)
    std = isqrt(o, var, iterations=28, start_bits=start)
    normed = o.floordiv(o.add(o.mul(y, 1 << (c.frac + 1)), std), o.mul(std, 2))  # round(y 2**frac / std)
    return c.out(o, o.add(o.mul(normed, o.const(c.gamma)), o.const(c.beta)))
