"""QuantizedWeight: the one representation every other layer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import floating, integer, packing
from lowbit.formats.spec import WeightFormat


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN/Inf values; repair or retrain the model before quantizing it"
        )


@dataclass
class QuantizedWeight:
    """Packed codes + scales (+ integer zero points) + format + original shape.

    ``packed``: ``uint8`` bit stream of the ``[out, in]`` codes (see ``formats.packing``).
    ``scale``: ``[out, ngroups]`` in fp16 (fp32 when a scale does not fit fp16).
    ``zero``: ``uint8 [out, ngroups]`` for asymmetric integer formats, else ``None``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: WeightFormat
    shape: tuple[int, int]

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        fmt: WeightFormat,
    ) -> QuantizedWeight:
        # fp16 when that loses nothing (lowbit's own scales are rounded to fp16 when found);
        # scales from elsewhere that fp16 would change stay fp32
        exact = scale.float().to(torch.float16).float()
        fp16_ok = integer.scale_storage_dtype(scale) == torch.float16 and torch.equal(exact, scale.float())
        storage = torch.float16 if fp16_ok else torch.float32
        if fmt.has_zero and zero is None:
            raise ValueError(f"{fmt.describe()} needs zero points")
        return cls(
            packed=packing.pack(codes.cpu(), fmt.bits),
            scale=scale.detach().to(storage).cpu().contiguous(),
            zero=zero.detach().to(torch.uint8).cpu().contiguous() if fmt.has_zero else None,
            fmt=fmt,
            shape=(int(codes.shape[0]), int(codes.shape[1])),
        )

    @classmethod
    def quantize(
        cls,
        w: torch.Tensor,
        fmt: WeightFormat,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """Quantize ``w: [out, in]``; min-max (or absmax) parameters unless given."""
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
        check_finite(w)
        w = w.detach().float()
        if fmt.kind == "int":
            if scale is None:
                scale, zero = integer.minmax_params(w, fmt.bits, fmt.group_size, fmt.symmetric)
            codes = integer.quantize(w, scale, zero, fmt.bits, fmt.group_size)
        else:
            if scale is None:
                scale = floating.absmax_scale(w, fmt.kind, fmt.group_size)
            codes = floating.quantize(w, scale, fmt.kind, fmt.group_size)
        return cls.from_codes(codes, scale, zero, fmt)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def codes(self) -> torch.Tensor:
        """Unpacked codes ``uint8 [out, in]``."""
        return packing.unpack(self.packed, self.fmt.bits, self.numel).reshape(self.shape)

    def zero_or_default(self) -> torch.Tensor:
        if self.zero is not None:
            return self.zero
        return torch.full(self.scale.shape, 1 << (self.fmt.bits - 1), dtype=torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes()
        if self.fmt.kind == "int":
            w = integer.dequantize(codes, self.scale, self.zero_or_default(), self.fmt.group_size)
        else:
            w = floating.dequantize(codes, self.scale, self.fmt.kind, self.fmt.group_size)
        return w.to(dtype)

    def storage_bits(self) -> int:
        """Exact bits stored: packed codes, scales, and zero points packed at ``bits``."""
        bits = self.packed.numel() * 8 + self.scale.numel() * self.scale.element_size() * 8
        if self.zero is not None:
            bits += packing.packed_nbytes(self.zero.numel(), self.fmt.bits) * 8
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.packed, f"{prefix}.scales": self.scale}
        if self.zero is not None:
            out[f"{prefix}.qzeros"] = packing.pack(self.zero, self.fmt.bits)
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, fmt: WeightFormat, shape: tuple
    ) -> QuantizedWeight:
        scale = tensors[f"{prefix}.scales"]
        zero = None
        if fmt.has_zero:
            zero = packing.unpack(tensors[f"{prefix}.qzeros"], fmt.bits, scale.numel())
            zero = zero.reshape(scale.shape)
        packed = tensors[f"{prefix}.qweight"]
        expected = packing.packed_nbytes(shape[0] * shape[1], fmt.bits)
        if packed.numel() != expected or packed.dtype != torch.uint8:
            raise ValueError(
                f"{prefix}.qweight holds {packed.numel()} {packed.dtype} values; "
                f"{expected} uint8 were expected for {shape} at {fmt.bits} bits"
            )
        return cls(packed=packed, scale=scale, zero=zero, fmt=fmt, shape=tuple(shape))
