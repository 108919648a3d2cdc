"""QuantizedWeight: the one representation every other layer consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats import codebook, floating, integer, packing
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
    """Integer scales are ``[out, ngroups]`` of the matrix view, codebooks ``[out, ngroups * 2^bits]``:
    anything else is a corrupted file."""
    if fmt.kind not in ("int", "lut"):
        return
    rows, k = matrix_shape_of(shape)
    want = (rows, integer.num_groups(k, fmt.group_size) * (codebook.levels(fmt.bits) if fmt.kind == "lut" else 1))
    per_tensor = fmt.group_size is None and tuple(scale.shape) == (1, 1)  # one scale for the whole tensor
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
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: WeightFormat
    shape: tuple[int, ...]
    outliers: Outliers | None = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        fmt: WeightFormat,
        shape: tuple[int, ...] | None = None,
        outliers: Outliers | None = None,
    ) -> QuantizedWeight:
        """Pack ``codes: [out, K]`` (the matrix view) of a weight whose original shape is ``shape``.

        ``shape`` defaults to the codes' own shape (a linear); a conv passes its
        N-D shape so that ``dequantize()`` gives the conv weight back. ``outliers``:
        fp16 weights added to the dequantized codes.
        """
        if codes.dim() != 2:
            raise ValueError(
                f"codes must be the 2-D matrix view [out, K], got shape {tuple(codes.shape)}; "
                "reshape them with codes.reshape(shape[0], -1)"
            )
        shape = tuple(int(d) for d in (codes.shape if shape is None else shape))
        if matrix_shape_of(shape) != tuple(codes.shape):
            raise ValueError(
                f"codes of shape {tuple(codes.shape)} are not the matrix view of a weight of shape {shape}; "
                f"expected {matrix_shape_of(shape)}"
            )
        # fp16 when that loses nothing (lowbit's own scales are rounded to fp16 when found);
        # scales from elsewhere that fp16 would change stay fp32
        exact = scale.float().to(torch.float16).float()
        fp16_ok = torch.equal(exact, scale.float()) and (
            fmt.kind == "lut" or integer.scale_storage_dtype(scale) == torch.float16  # codebooks may hold 0
        )
        storage = torch.float16 if fp16_ok else torch.float32
        if fmt.has_zero and zero is None:
            raise ValueError(f"{fmt.describe()} needs zero points")
        _check_scale_shape(scale, shape, fmt, "the scales")
        if zero is not None and fmt.has_zero and tuple(zero.shape) != tuple(scale.shape):
            raise ValueError(f"zero points of shape {list(zero.shape)} do not match the scales' {list(scale.shape)}")
        if outliers is not None:
            outliers.check(tuple(codes.shape), "the outliers")
        return cls(
            packed=packing.pack(codes.cpu(), fmt.bits),
            scale=scale.detach().to(storage).cpu().contiguous(),
            zero=zero.detach().to(torch.uint8).cpu().contiguous() if fmt.has_zero else None,
            fmt=fmt,
            shape=shape,
            outliers=outliers,
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
        if fmt.kind == "int":
            if scale is None:
                scale, zero = integer.minmax_params(w, fmt.bits, fmt.group_size, fmt.symmetric)
            codes = integer.quantize(w, scale, zero, fmt.bits, fmt.group_size)
        elif fmt.kind == "lut":  # ``scale`` is the codebook; k-means of each row or group unless given
            if scale is None:
                scale = codebook.fit(w, fmt.bits, fmt.group_size)
            codes = codebook.quantize(w, scale, fmt.bits, fmt.group_size)
        else:
            if scale is None:
                scale = floating.absmax_scale(w, fmt.kind, fmt.group_size)
            codes = floating.quantize(w, scale, fmt.kind, fmt.group_size)
        return cls.from_codes(codes, scale, zero, fmt, shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, K)``, ``K = prod(shape[1:])``: the shape of ``codes()`` and what groups split."""
        return matrix_shape_of(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """Unpacked codes ``uint8 [out, K]`` (the matrix view, also for convs)."""
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
        else:
            w = floating.dequantize(codes, self.scale, self.fmt.kind, self.fmt.group_size)
        if self.outliers is not None:
            w = w + self.outliers.to_dense(self.matrix_shape).to(w.device)
        return w.reshape(self.shape).to(dtype)

    def storage_bits(self) -> int:
        """Exact bits stored: packed codes, scales, and zero points packed at ``bits``."""
        bits = self.packed.numel() * 8 + self.scale.numel() * self.scale.element_size() * 8
        if self.zero is not None:
            bits += packing.packed_nbytes(self.zero.numel(), self.fmt.bits) * 8
        if self.outliers is not None:
            bits += self.outliers.storage_bits()
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.packed, f"{prefix}.scales": self.scale}
        if self.zero is not None:
            out[f"{prefix}.qzeros"] = packing.pack(self.zero, self.fmt.bits)
        if self.outliers is not None:
            o = self.outliers
            out.update({f"{prefix}.outlier_crow": o.crow, f"{prefix}.outlier_col": o.col, f"{prefix}.outlier_val": o.val})
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, fmt: WeightFormat, shape: tuple
    ) -> QuantizedWeight:
        """Rebuild from ``to_tensors`` output; ``shape`` is the original (N-D for convs) shape."""
        shape = tuple(int(d) for d in shape)
        matrix_shape_of(shape)  # refuses 0-D / 1-D shapes with a message
        scale = tensors[f"{prefix}.scales"]
        _check_scale_shape(scale, shape, fmt, f"{prefix}.scales")
        zero = None
        if fmt.has_zero:
            zero = packing.unpack(tensors[f"{prefix}.qzeros"], fmt.bits, scale.numel())
            zero = zero.reshape(scale.shape)
        packed = tensors[f"{prefix}.qweight"]
        expected = packing.packed_nbytes(math.prod(shape), fmt.bits)
        if packed.numel() != expected or packed.dtype != torch.uint8:
            raise ValueError(
                f"{prefix}.qweight holds {packed.numel()} {packed.dtype} values; "
                f"{expected} uint8 were expected for {shape} at {fmt.bits} bits"
            )
        outliers = None
        keys = [f"{prefix}.outlier_{k}" for k in ("crow", "col", "val")]
        if any(k in tensors for k in keys):
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"{prefix} has outliers but {', '.join(missing)} is missing")
            outliers = Outliers(*(tensors[k] for k in keys))
            outliers.check(matrix_shape_of(shape), prefix)
        return cls(packed=packed, scale=scale, zero=zero, fmt=fmt, shape=shape, outliers=outliers)
