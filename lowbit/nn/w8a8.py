"""W8A8Linear: int8 activations times int8 (or 4-bit) weights, accumulated in int32.

Activations are quantized per token on the fly (symmetric, absmax / 127), or
per tensor with a static scale found on calibration data; weights are
per-output-channel. The product runs in ``torch._int_mm`` (int8 x
int8 -> int32) and is rescaled to float by ``s_x[token] * s_w[channel]``:

    y = (X_q @ (W_q - z)^T) * s_x s_w^T + b,   X_q @ z = rowsum(X_q) z^T

so asymmetric weights cost one rank-one correction. 4-bit weights (W4A8) are
widened to int8 for the same matmul. With ``outlier_threshold`` (LLM.int8(),
Dettmers et al., 2022) the feature columns holding any activation above it
bypass the int8 path and multiply the dequantized weights in floating point.
"""

from __future__ import annotations

import torch

from lowbit.nn.qlinear import QLinear
from lowbit.quantized_weight import QuantizedWeight

ACT_GRANULARITIES = ("token", "tensor")


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t [K, N] int8 -> int32``; exact, with a fallback where ``_int_mm`` refuses."""
    try:
        return torch._int_mm(a, b_t)
    except RuntimeError:  # e.g. CUDA's shape rules (M > 16, K and N multiples of 8)
        return (a.double() @ b_t.double()).round().to(torch.int32)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> int8 codes and per-row scales ``[M, 1]`` (symmetric absmax)."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8), scale


class W8A8Linear(QLinear):
    """Per-channel 8- or 4-bit weights, per-token dynamic int8 activations, int32 accumulation."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, act_bits: int = 8,
                 act_granularity: str = "token", outlier_threshold: float | None = None,
                 act_scale: float | None = None, input_scale: torch.Tensor | None = None):  # fmt: skip
        if qw.fmt.kind != "int" or qw.fmt.bits not in (4, 8) or qw.scale.shape[1] != 1:
            raise ValueError(
                f"int8 activations need per-channel 4- or 8-bit integer weights, not {qw.fmt.describe()}; "
                f"use --group-size -1"
            )
        if act_bits != 8:
            raise ValueError(f"act_bits={act_bits} is not supported; the integer matmul takes 8-bit activations")
        if act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity {act_granularity!r} is not supported; choose token or tensor")
        if act_granularity == "tensor" and not (act_scale is not None and act_scale > 0):
            raise ValueError("static per-tensor activations need a positive act_scale from calibration")
        super().__init__(qw, bias, kernel="dequant")
        self.act_bits = act_bits
        self.act_granularity = act_granularity
        self.outlier_threshold = outlier_threshold
        self.register_buffer("act_scale", torch.tensor(float(act_scale)) if act_scale is not None else None)
        # SmoothQuant's per-channel factor applied to the activation where no layer could absorb it
        self.register_buffer("input_scale", input_scale.detach().float().clone() if input_scale is not None else None)

    def _int_weight(self, device: torch.device):
        key = ("w8a8", device)
        if key not in self._cache:
            qw = self.quantized_weight
            mid = 1 << (qw.fmt.bits - 1)
            w = (qw.codes().to(torch.int16) - mid).to(torch.int8).to(device)  # [N, K]
            offset = None
            if qw.zero is not None and bool((qw.zero != mid).any()):
                offset = (qw.zero.reshape(-1).to(torch.int32) - mid).to(device)
            self._cache[key] = (w, qw.scale.float().reshape(-1).to(device), offset)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, w_scale, offset = self._int_weight(x.device)
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.input_scale is not None:
            flat = flat * self.input_scale
        outlier_part = None
        if self.outlier_threshold is not None:
            # LLM.int8(): feature columns with any |x| above the threshold stay in floating point
            cols = (flat.abs() > self.outlier_threshold).any(0).nonzero().flatten()
            if cols.numel():
                outlier_part = flat[:, cols] @ self.weight.to(x.device)[:, cols].t()
                flat = flat.index_fill(1, cols, 0.0)
        if self.act_granularity == "tensor":
            x_scale = self.act_scale
            qmax = (1 << (self.act_bits - 1)) - 1
            xq = torch.round(flat / x_scale).clamp(-qmax, qmax).to(torch.int8)
        else:
            xq, x_scale = quantize_per_token(flat, self.act_bits)
        acc = int8_matmul(xq, w.t())
        if offset is not None:
            acc = acc - xq.sum(-1, keepdim=True, dtype=torch.int32) * offset
        y = acc.float() * x_scale * w_scale
        if outlier_part is not None:
            y = y + outlier_part
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def extra_repr(self) -> str:
        extra = f", act_bits={self.act_bits}, act={self.act_granularity}"
        if self.outlier_threshold is not None:
            extra += f", outlier_threshold={self.outlier_threshold}"
        return super().extra_repr() + extra
