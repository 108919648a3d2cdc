"""QConv: a weight-only quantized ``nn.Conv1d`` / ``nn.Conv2d`` that holds packed weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.spec import WeightFormat
from lowbit.quantized_weight import EXTRAS, QuantizedWeight

CONV_FNS = {1: F.conv1d, 2: F.conv2d}


def _tuple(value, dims: int, name: str) -> tuple[int, ...]:
    """``value`` (an int or a ``dims``-tuple) as a ``dims``-tuple of ints, as ``nn.Conv*d`` stores it."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"{name}={value} has {len(value)} entries; a {dims}-D conv needs an int or {dims} of them")
    return value


def _padding(value, dims: int) -> tuple[int, ...] | str:
    """Padding as ``F.conv*d`` takes it: ``'same'`` / ``'valid'`` stay strings, the rest a ``dims``-tuple."""
    if isinstance(value, str):
        if value not in ("same", "valid"):
            raise ValueError(f"padding={value!r} is not supported; use 'same', 'valid', an int or a tuple")
        return value
    return _tuple(value, dims, "padding")


class QConv(nn.Module):
    """``y = conv(x, dequantize(W), b)`` for a conv whose weight is stored packed at its real bit width.

    The packed codes, scales and zero points (the matrix view ``[out, in/groups*k...]``
    of ``QuantizedWeight``) are the module's state, so a 4-bit conv saves 4-bit codes.
    Forward runs PyTorch's float conv on the dequantized weight, which is built once
    per (device, dtype) and cached (not saved): unpacking on every call would cost
    more than the conv itself for small feature maps.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        dims: int,
    ):
        super().__init__()
        if dims not in CONV_FNS:
            raise ValueError(f"dims={dims!r} is not supported; QConv runs 1-D and 2-D convs (dims=1 or 2)")
        shape = tuple(int(d) for d in qw.shape)
        if len(shape) != dims + 2:
            raise ValueError(
                f"a {dims}-D conv weight is [out, in/groups, {', '.join(['k'] * dims)}], got shape {shape}; "
                f"pass dims={len(shape) - 2} or quantize the conv's own weight"
            )
        if groups < 1 or shape[0] % groups:
            raise ValueError(f"groups={groups} must be positive and divide the {shape[0]} output channels")
        if bias is not None and tuple(bias.shape) != (shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({shape[0]},) for {shape[0]} outputs")
        self.dims = dims
        self.weight_shape = shape  # [out, in/groups, *kernel]
        self.out_channels, self.in_channels = shape[0], shape[1] * groups
        self.kernel_size = shape[2:]
        self.stride = _tuple(stride, dims, "stride")
        self.padding = _padding(padding, dims)
        self.dilation = _tuple(dilation, dims, "dilation")
        self.groups = int(groups)
        self.fmt = qw.fmt
        self.register_buffer("qweight", qw.packed)
        self.register_buffer("scales", qw.scale)
        self.register_buffer("zeros", qw.zero if qw.zero is not None else None)
        for name, t in qw.extras().items():  # kept outliers, low-rank factors, second-level scales:
            self.register_buffer(name, t)  # part of the dequantized weight the float conv runs on
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._cache: dict = {}

    @classmethod
    def from_conv(cls, conv: nn.Module, fmt: WeightFormat) -> QConv:
        """Quantize ``conv`` (an ``nn.Conv1d`` or ``nn.Conv2d``) to ``fmt`` with min-max parameters."""
        dims = 1 if isinstance(conv, nn.Conv1d) else 2 if isinstance(conv, nn.Conv2d) else None
        if dims is None:
            raise TypeError(f"QConv.from_conv takes an nn.Conv1d or nn.Conv2d, not {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={conv.padding_mode!r} is not supported; QConv pads with zeros only. "
                "Pad the input explicitly (F.pad) and use padding=0, or keep this conv in floating point"
            )
        return cls(
            QuantizedWeight.quantize(conv.weight.detach(), fmt),
            conv.bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            dims=dims,
        )

    def conv_config(self) -> dict:
        """The keyword arguments that rebuild this conv around its weight (what a checkpoint records)."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"stride": list(self.stride), "padding": padding, "dilation": list(self.dilation),
                "groups": self.groups, "dims": self.dims}  # fmt: skip

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            packed=self.qweight.cpu(),
            scale=self.scales.cpu(),
            zero=None if self.zeros is None else self.zeros.cpu(),
            fmt=self.fmt,
            shape=self.weight_shape,
        ).with_extras({n: None if getattr(self, n) is None else getattr(self, n).cpu() for n in EXTRAS})

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in/groups, *kernel]`` (float32, on the module's device)."""
        return self.quantized_weight.dequantize().to(self.scales.device)

    def describe(self) -> str:
        return self.fmt.describe()

    def _weight_for(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight on ``device`` in ``dtype``, unpacked once and cached."""
        key = (device, dtype)
        if key not in self._cache:
            # an inference tensor cached by a first call under inference_mode could not be
            # saved for backward later, so build an ordinary one
            with torch.inference_mode(False):
                self._cache[key] = self.quantized_weight.dequantize().to(device=device, dtype=dtype)
        return self._cache[key]

    def __getstate__(self):
        # caches hold kernel-specific packings (some not even copyable): rebuilt on first use
        return {**self.__dict__, "_cache": {}}

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, in, *spatial] (or unbatched [in, *spatial]) -> [batch, out, *spatial']
        w = self._weight_for(x.device, x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return CONV_FNS[self.dims](x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        bpw = self.quantized_weight.bits_per_weight
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"format={self.describe()}, bits_per_weight={bpw:.3f}"
        )
