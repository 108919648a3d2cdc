"""QLinear: a weight-only quantized ``nn.Linear`` that holds packed weights."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.spec import WeightFormat
from lowbit.kernels import cpu
from lowbit.quantized_weight import QuantizedWeight

KERNELS = ("auto", "int4_cpu", "int8_cpu", "dequant")


class QLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` computed by the fastest kernel for the device.

    The packed codes, scales and zero points are the module's state (what is
    saved). The kernel's own layout is derived from them on first use on a
    device and cached; it is not saved.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.out_features, self.in_features = qw.shape
        self.fmt = qw.fmt
        self.kernel = kernel
        self.register_buffer("qweight", qw.packed)
        self.register_buffer("scales", qw.scale)
        self.register_buffer("zeros", qw.zero if qw.zero is not None else None)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._cache: dict = {}

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: WeightFormat, kernel: str = "auto") -> QLinear:
        return cls(QuantizedWeight.quantize(linear_weight(linear), fmt), linear.bias, kernel)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            packed=self.qweight.cpu(),
            scale=self.scales.cpu(),
            zero=None if self.zeros is None else self.zeros.cpu(),
            fmt=self.fmt,
            shape=(self.out_features, self.in_features),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]``, for inspection and reference paths."""
        return self.quantized_weight.dequantize().to(self.scales.device)

    def select_kernel(self, device: torch.device) -> str:
        if self.kernel != "auto":
            return self.kernel
        if device.type == "cpu":
            qw = self.quantized_weight
            if cpu.int4_group(qw) is not None:
                return "int4_cpu"
            if cpu.int8_supported(qw):
                return "int8_cpu"
        return "dequant"

    def _prepare(self, device: torch.device) -> tuple[str, object]:
        """The kernel for ``device`` and its packed layout, built once and cached."""
        plan = self._cache.get(device)
        if plan is None:
            kernel = self.select_kernel(device)
            qw = self.quantized_weight
            if kernel == "int4_cpu":
                plan = (kernel, cpu.pack_int4(qw, device))
            elif kernel == "int8_cpu":
                if not cpu.int8_supported(qw):
                    raise ValueError(f"int8_cpu needs 8-bit per-channel weights, not {qw.fmt.describe()}")
                plan = (kernel, cpu.pack_int8(qw, device))
            else:
                plan = (kernel, None)
            self._cache[device] = plan
        return plan

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, packed = self._prepare(x.device)
        if kernel == "int4_cpu":
            y = cpu.int4_mm(x, packed)
        elif kernel == "int8_cpu":
            y = cpu.int8_mm(x, packed)
        else:
            y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        bpw = self.quantized_weight.bits_per_weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.fmt.describe()}, bits_per_weight={bpw:.3f}, kernel={self.kernel}"
        )


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as ``[out, in]`` (transformers' GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t()
    return module.weight.detach()
