"""QuantizedWeight: the one representation every other layer consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats import binary, codebook, double, floating, integer, packing, vector
from lowbit.formats.double import QuantizedScales
from lowbit.formats.lowrank import LowRank
from lowbit.formats.sparse import Outliers
from lowbit.formats.spec import WeightFormat


def matrix_shape_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(out, prod(rest))``: the ``[out, K]`` view every weight is grouped and packed in.

    A conv ``[out, in/groups, kh, kw]`` becomes ``[out, in/groups*kh*kw]`` (row-major,
    so a row is one output channel's whole filter), which lets convs share the
    linear layers' groups, codes and packing unchanged.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(
            f"a quantized weight needs at least 2 dimensions [out, ...], got shape {shape}; "
            "biases and norms stay in floating point"
        )
    return shape[0], math.prod(shape[1:])


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN/Inf values; repair or retrain the model before quantizing it"
        )


def _check_scale_shape(scale: torch.Tensor, shape: tuple, fmt: WeightFormat, what: str) -> None:
    """Integer scales are ``[out, ngroups]`` of the matrix view, codebooks ``[out, ngroups * 2^bits]``,
    binary codes ``[out, ngroups * (bits + 1)]``: anything else is a corrupted file."""
    if fmt.kind == "vq":  # codebooks [nbooks, 2^(bits*d), d] (formats.vector)
        return vector.check_books(scale, *matrix_shape_of(shape), fmt, what)
    if fmt.kind not in ("int", "lut", "bcq"):
        return
    rows, k = matrix_shape_of(shape)
    per = {"lut": codebook.levels(fmt.bits), "bcq": binary.params_per_group(fmt.bits)}.get(fmt.kind, 1)
    want = (rows, integer.num_groups(k, fmt.group_size) * per)
    per_tensor = fmt.group_size is None and tuple(scale.shape) == (1, per)  # one scale (codebook) for the tensor
    if tuple(scale.shape) != want and not per_tensor:
        raise ValueError(f"{what} are {list(scale.shape)}; {list(want)} were expected for a weight of shape "
                         f"{list(shape)} in groups of {fmt.group_size}")  # fmt: skip


@dataclass
class QuantizedWeight:
    """Packed codes + scales (+ integer zero points) + format + original shape.

    ``shape`` is the original weight's shape: ``[out, in]`` for a linear,
    ``[out, in/groups, kh, kw]`` for a Conv2d, ``[out, in/groups, k]`` for a Conv1d.
    Everything else lives in the matrix view ``matrix_shape = [out, K]``,
    ``K = prod(shape[1:])``, with groups along ``K`` (ragged last group allowed):

    ``packed``: ``uint8`` bit stream of the ``[out, K]`` codes (see ``formats.packing``).
    ``scale``: ``[out, ngroups]`` in fp16 (fp32 when a scale does not fit fp16).
    ``zero``: ``uint8 [out, ngroups]`` for asymmetric integer formats, else ``None``.
    ``outliers``: weights kept in fp16 (``formats.sparse``), added to the dequantized codes.
    ``lowrank``: fp16 factors ``U @ V`` (``formats.lowrank``), added to the dequantized codes.
    ``scale_q``: the second-level codes the scales are stored as when ``fmt.scale_bits`` is set
    (``formats.double``); ``scale`` then holds the decoded scales.
    ``residual``: REx's expansion term, a second quantized weight over some output rows
    (``Residual``), added to those rows.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: WeightFormat
    shape: tuple[int, ...]
    outliers: Outliers | None = None
    lowrank: LowRank | None = None
    scale_q: QuantizedScales | None = None
    residual: Residual | None = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        fmt: WeightFormat,
        shape: tuple[int, ...] | None = None,
        outliers: Outliers | None = None,
        lowrank: LowRank | None = None,
        scale_q: QuantizedScales | None = None,
    ) -> QuantizedWeight:
        """Pack ``codes: [out, K]`` (the matrix view) of a weight whose original shape is ``shape``.

        ``shape`` defaults to the codes' own shape (a linear); a conv passes its
        N-D shape so that ``dequantize()`` gives the conv weight back. ``outliers``:
        fp16 weights added to the dequantized codes; ``lowrank``: fp16 factors added too.
        With ``fmt.scale_bits``, ``scale`` must be decoded second-level scales
        (``formats.double.round_scales``); ``scale_q`` is their encoding (found again if not given).
        """
        if codes.dim() != 2:
            raise ValueError(
                f"codes must be the 2-D matrix view [out, K], got shape {tuple(codes.shape)}; "
                "reshape them with codes.reshape(shape[0], -1)"
            )
        if fmt.kind == "vq":  # vector indices [out, ceil(K / d)] (formats.vector)
            shape = tuple(int(d) for d in (shape or (codes.shape[0], codes.shape[1] * fmt.vq_dim)))
            vector.check_codes(codes, *matrix_shape_of(shape), fmt)
        shape = tuple(int(d) for d in (codes.shape if shape is None else shape))
        if fmt.kind != "vq" and matrix_shape_of(shape) != tuple(codes.shape):
            raise ValueError(
                f"codes of shape {tuple(codes.shape)} are not the matrix view of a weight of shape {shape}; "
                f"expected {matrix_shape_of(shape)}"
            )
        # fp16 when that loses nothing (lowbit's own scales are rounded to fp16 when found);
        # scales from elsewhere that fp16 would change stay fp32
        exact = scale.float().to(torch.float16).float()
        fp16_ok = torch.equal(exact, scale.float()) and (
            fmt.kind in ("lut", "vq", "bcq") or integer.scale_storage_dtype(scale) == torch.float16  # tables may hold 0
        )
        storage = torch.float16 if fp16_ok else torch.float32
        if fmt.has_zero and zero is None:
            raise ValueError(f"{fmt.describe()} needs zero points")
        _check_scale_shape(scale, shape, fmt, "the scales")
        if zero is not None and fmt.has_zero and tuple(zero.shape) != tuple(scale.shape):
            raise ValueError(f"zero points of shape {list(zero.shape)} do not match the scales' {list(scale.shape)}")
        if outliers is not None:
            outliers.check(matrix_shape_of(shape), "the outliers")
        if lowrank is not None:
            lowrank.check(matrix_shape_of(shape), "the low-rank term")
        if fmt.scale_bits is not None:
            if scale_q is None:
                scale_q = QuantizedScales.encode(scale.t(), fmt.scale_bits, fmt.scale_group_size)
            if not torch.equal(scale_q.decode().t(), scale.float().cpu()):
                raise ValueError(f"{fmt.describe()}: the scales are not on their second-level grid; compute the "
                                 "codes against formats.double.round_scales(scale) and pass its encoding")  # fmt: skip
        elif scale_q is not None:
            raise ValueError(f"{fmt.describe()} stores plain scales; quantized scales need fmt.scale_bits")
        return cls(
            packed=vector.pack(codes, fmt) if fmt.kind == "vq" else packing.pack(codes.cpu(), fmt.bits),
            scale=scale.detach().to(storage).cpu().contiguous(),
            zero=zero.detach().to(torch.uint8).cpu().contiguous() if fmt.has_zero else None,
            fmt=fmt,
            shape=shape,
            outliers=outliers,
            lowrank=lowrank,
            scale_q=scale_q,
        )

    @classmethod
    def quantize(
        cls,
        w: torch.Tensor,
        fmt: WeightFormat,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """Quantize ``w: [out, ...]`` through its matrix view ``[out, K]``; min-max (or absmax) unless given.

        ``scale`` / ``zero``, when given, are ``[out, ngroups]`` of that matrix view.
        """
        if w.dim() < 2:
            raise ValueError(
                f"expected a weight of at least 2 dimensions ([out, in] or a conv's [out, in/groups, *kernel]), "
                f"got shape {tuple(w.shape)}; biases and norms stay in floating point"
            )
        check_finite(w)
        shape = tuple(int(d) for d in w.shape)
        w = w.detach().float().reshape(matrix_shape_of(shape))  # [out, K]
        scale_q = None
        if fmt.kind == "int":
            if scale is None:
                scale, zero = integer.minmax_params(w, fmt.bits, fmt.group_size, fmt.symmetric)
            if fmt.scale_bits is not None:
                scale, scale_q, zero = second_level(w, scale, zero, fmt)
            codes = integer.quantize(w, scale, zero, fmt.bits, fmt.group_size)
        elif fmt.kind == "lut":  # ``scale`` is the codebook; k-means of each row or group unless given
            if scale is None:
                scale = codebook.fit(w, fmt.bits, fmt.group_size)
            codes = codebook.quantize(w, scale, fmt.bits, fmt.group_size)
        elif fmt.kind == "bcq":  # ``scale``: each group's alphas and offset; fitted unless given
            if scale is None:
                scale = binary.fit(w, fmt.bits, fmt.group_size)
            codes = binary.quantize(w, scale, fmt.bits, fmt.group_size)
        elif fmt.kind == "vq":  # ``scale``: the codebooks; plain k-means of each block's vectors unless given
            if scale is None:
                scale = vector.fit(w, fmt)
            codes = vector.quantize(w, scale, fmt)
        else:
            if scale is None:
                scale = floating.absmax_scale(w, fmt.kind, fmt.group_size, fmt.bits)
            if fmt.scale_bits is not None:
                scale, scale_q, _ = second_level(w, scale, None, fmt)
            codes = floating.quantize(w, scale, fmt.kind, fmt.group_size, fmt.bits)
        return cls.from_codes(codes, scale, zero, fmt, shape, scale_q=scale_q)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, K)``, ``K = prod(shape[1:])``: the shape of ``codes()`` and what groups split."""
        return matrix_shape_of(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """Unpacked codes ``uint8 [out, K]`` (the matrix view, also for convs); vq: ``[out, ceil(K / d)]``."""
        if self.fmt.kind == "vq":
            return vector.unpack(self.packed, self.fmt, *self.matrix_shape)
        return packing.unpack(self.packed, self.fmt.bits, self.numel).reshape(self.matrix_shape)

    def zero_or_default(self) -> torch.Tensor:
        if self.zero is not None:
            return self.zero
        return torch.full(self.scale.shape, 1 << (self.fmt.bits - 1), dtype=torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in its original shape ``shape`` (``[out, in]`` or a conv's N-D shape)."""
        codes = self.codes()  # [out, K]
        if self.fmt.kind == "int":
            w = integer.dequantize(codes, self.scale, self.zero_or_default(), self.fmt.group_size)
        elif self.fmt.kind == "lut":
            w = codebook.dequantize(codes, self.scale, self.fmt.bits, self.fmt.group_size)
        elif self.fmt.kind == "bcq":
            w = binary.dequantize(codes, self.scale, self.fmt.bits, self.fmt.group_size)
        elif self.fmt.kind == "vq":
            w = vector.dequantize(codes, self.scale, self.fmt, self.matrix_shape[1])
        else:
            w = floating.dequantize(codes, self.scale, self.fmt.kind, self.fmt.group_size, self.fmt.bits)
        if self.outliers is not None:
            w = w + self.outliers.to_dense(self.matrix_shape).to(w.device)
        if self.lowrank is not None:
            w = w + self.lowrank.to_dense().to(w.device)
        if self.residual is not None:
            w = w.index_add(0, self.residual.rows.long().to(w.device), self.residual.weight.dequantize().to(w.device))
        return w.reshape(self.shape).to(dtype)

    def storage_bits(self) -> int:
        """Exact bits stored: packed codes, scales (or their second-level codes), zero points packed
        at ``bits``, kept outliers and low-rank factors."""
        bits = self.packed.numel() * 8
        if self.scale_q is not None:
            bits += self.scale_q.storage_bits()
        else:
            bits += self.scale.numel() * self.scale.element_size() * 8
        if self.zero is not None:
            bits += packing.packed_nbytes(self.zero.numel(), self.fmt.bits) * 8
        if self.outliers is not None:
            bits += self.outliers.storage_bits()
        if self.lowrank is not None:
            bits += self.lowrank.storage_bits()
        if self.residual is not None:
            bits += self.residual.storage_bits()
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.packed}
        if self.zero is not None:
            out[f"{prefix}.qzeros"] = packing.pack(self.zero, self.fmt.bits)
        if self.scale_q is None:
            out[f"{prefix}.scales"] = self.scale
        out.update({f"{prefix}.{k}": v for k, v in self.extras().items() if v is not None})
        return out

    def extras(self) -> dict[str, torch.Tensor | None]:
        """What a weight may carry beside its codes, scales and zeros, by name (``EXTRAS``; ``None``
        where absent): a module keeps them as buffers of these names."""
        o, lr, sq, rx = self.outliers, self.lowrank, self.scale_q, self.residual
        rw = None if rx is None else rx.weight
        return {
            "outlier_crow": None if o is None else o.crow,
            "outlier_col": None if o is None else o.col,
            "outlier_val": None if o is None else o.val,
            "lowrank_u": None if lr is None else lr.u,
            "lowrank_v": None if lr is None else lr.v,
            "scales_q": None if sq is None else sq.packed,
            "scales_base": None if sq is None else sq.base,
            "scales_step": None if sq is None else sq.step,
            "rex_rows": None if rx is None else rx.rows,
            "rex_qweight": None if rw is None else rw.packed,
            "rex_scales": None if rw is None else rw.scale,
            "rex_qzeros": None if rw is None or rw.zero is None else packing.pack(rw.zero, rw.fmt.bits),
        }

    def with_extras(self, tensors: dict[str, torch.Tensor | None], what: str = "the weight") -> QuantizedWeight:
        """This weight with the extras of ``tensors`` (``extras()``'s names; absent or ``None``: none),
        each checked against the weight's shape (a module rebuilding its weight from its buffers)."""
        rows, k = self.matrix_shape
        found = {n: v for n, v in tensors.items() if v is not None}
        outliers, lowrank, scale_q, residual = _extras(found, rows, k, self.fmt, what)
        return QuantizedWeight(self.packed, self.scale, self.zero, self.fmt, self.shape, outliers, lowrank, scale_q,
                               residual)  # fmt: skip

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, fmt: WeightFormat, shape: tuple
    ) -> QuantizedWeight:
        """Rebuild from ``to_tensors`` output; ``shape`` is the original (N-D for convs) shape."""
        shape = tuple(int(d) for d in shape)
        rows, k = matrix_shape_of(shape)  # refuses 0-D / 1-D shapes with a message
        found = {n: tensors[f"{prefix}.{n}"] for n in EXTRAS if f"{prefix}.{n}" in tensors}
        outliers, lowrank, scale_q, residual = _extras(found, rows, k, fmt, prefix)
        scale = scale_q.decode().t().contiguous() if scale_q is not None else tensors[f"{prefix}.scales"]
        _check_scale_shape(scale, shape, fmt, f"{prefix}.scales")
        zero = None
        if fmt.has_zero:
            zero = packing.unpack(tensors[f"{prefix}.qzeros"], fmt.bits, scale.numel())
            zero = zero.reshape(scale.shape)
        packed = tensors[f"{prefix}.qweight"]
        vq = fmt.kind == "vq"
        expected = vector.packed_nbytes(rows, k, fmt) if vq else packing.packed_nbytes(math.prod(shape), fmt.bits)
        if packed.numel() != expected or packed.dtype != torch.uint8:
            raise ValueError(
                f"{prefix}.qweight holds {packed.numel()} {packed.dtype} values; "
                f"{expected} uint8 were expected for {shape} at {fmt.bits} bits"
            )
        return cls(packed=packed, scale=scale, zero=zero, fmt=fmt, shape=shape, outliers=outliers, lowrank=lowrank,
                   scale_q=scale_q, residual=residual)  # fmt: skip


EXTRAS = ("outlier_crow", "outlier_col", "outlier_val", "lowrank_u", "lowrank_v", "scales_q", "scales_base",
          "scales_step", "rex_rows", "rex_qweight", "rex_scales", "rex_qzeros")  # fmt: skip


@dataclass
class Residual:
    """REx's expansion term (``methods.rex``): ``weight`` quantizes what the codes left of output rows
    ``rows`` (int32, ascending), in the layer's own format with plain scales."""

    rows: torch.Tensor
    weight: QuantizedWeight

    def storage_bits(self) -> int:
        return self.rows.numel() * 32 + self.weight.storage_bits()


def _extras(t: dict, rows: int, k: int, fmt: WeightFormat, what: str):
    """The outliers, low-rank term and second-level scales held in ``t`` (``EXTRAS``' names), checked."""
    outliers = lowrank = scale_q = None
    keys = ("outlier_crow", "outlier_col", "outlier_val")
    if any(n in t for n in keys):
        missing = [f"{what}.{n}" for n in keys if n not in t]
        if missing:
            raise ValueError(f"{what} has outliers but {', '.join(missing)} is missing")
        outliers = Outliers(*(t[n] for n in keys))
        outliers.check((rows, k), what)
    if "lowrank_u" in t or "lowrank_v" in t:
        if "lowrank_u" not in t or "lowrank_v" not in t:
            raise ValueError(f"{what} has a low-rank term but one of its factors (lowrank_u, lowrank_v) is missing")
        lowrank = LowRank(t["lowrank_u"], t["lowrank_v"])
        lowrank.check((rows, k), what)
    residual = None
    if "rex_rows" in t:
        sub = WeightFormat(fmt.kind, fmt.bits, fmt.group_size, fmt.symmetric)
        r = t["rex_rows"]
        if r.dtype != torch.int32 or r.dim() != 1 or (r.numel() and (int(r.min()) < 0 or int(r.max()) >= rows)):
            raise ValueError(f"{what}.rex_rows must be int32 indices of the {rows} output rows")
        sub_t = {f"{what}.rex.{n}": t[f"rex_{n}"] for n in ("qweight", "scales", "qzeros") if f"rex_{n}" in t}
        residual = Residual(r, QuantizedWeight.from_tensors(sub_t, f"{what}.rex", sub, (r.numel(), k)))
    if fmt.scale_bits is not None:
        ng = integer.num_groups(k, fmt.group_size)
        scale_q = QuantizedScales.from_tensors({f"{what}.{n}": v for n, v in t.items()}, what, fmt.scale_bits,
                                               fmt.scale_group_size, (ng, rows))  # fmt: skip
    elif "scales_q" in t:
        raise ValueError(f"{what} holds quantized scales but its format ({fmt.describe()}) has no scale_bits")
    return outliers, lowrank, scale_q, residual


def second_level(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: WeightFormat):
    """``scale`` through ``fmt``'s second level (``formats.double``): the decoded scales, their encoding,
    and the integer zero points found again against the decoded scales (``None`` stays ``None``)."""
    scale, scale_q = double.round_scales(scale, fmt.scale_bits, fmt.scale_group_size)
    if zero is not None and fmt.kind == "int" and not fmt.symmetric:
        lo = integer.to_groups(w.float(), fmt.group_size).amin(-1).clamp(max=0)
        zero = torch.round(-lo / scale).clamp(0, integer.qmax(fmt.bits))
    return scale, scale_q, zero
