"""Fake quantization for convolutional networks: simulated integer weights and
activations in floating point, differentiable where reconstruction needs it.

``QuantLayer`` wraps an ``nn.Conv2d`` or ``nn.Linear``: per-output-channel integer
weights (2-8 bits, asymmetric) whose rounding is nearest, learned hard (0/1
offsets), or soft (AdaRound's rectified sigmoid, while it is being learned).
``ActQuantizer`` fake-quantizes a tensor with one static scale and zero point
(unsigned when the calibrated input is non-negative, as after a ReLU), observed
with lowbit's observers, optionally learned (LSQ, Esser et al. 2020) and
optionally dropped at random per element while training (QDrop, Wei et al. 2022).
``ActSite`` puts an ``ActQuantizer`` on a module's output (a ReLU, a residual add).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.activation import ActFormat
from lowbit.formats.activation import params_from_range as act_params
from lowbit.observers import ChannelStats, check_observer, observe_range

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020, eq. 23)
ZETA, GAMMA = 1.1, -0.1
OBSERVED_VALUES = 1 << 18  # values an ActQuantizer keeps for percentile/MSE/KL observers


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` strictly inside ``(0, 1)``."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def weight_params(w: torch.Tensor, bits: int, search: bool = True, grid: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric scale and zero ``[N, 1]`` for ``w`` flattened to ``[N, K]``.

    With ``search``, each channel's range is shrunk by the factor in ``(0.2, 1]`` that
    minimises its squared rounding error (the MSE initialisation BRECQ and QDrop use);
    every method starts from the same parameters, so they differ only in rounding.
    """
    w = w.detach().reshape(w.shape[0], -1).float()
    top = (1 << bits) - 1
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    best_s = ((hi - lo) / top).clamp(min=1e-8)
    best_z = torch.round(-lo / best_s)
    if search:
        best_err = torch.full((w.shape[0],), float("inf"))
        for i in range(grid):
            p = 1 - i * 0.8 / grid
            s = ((hi - lo) * p / top).clamp(min=1e-8)
            z = torch.round(-lo * p / s).clamp(0, top)
            q = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, top) - z[:, None]) * s[:, None]
            err = (q - w).pow(2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s[:, None], best_z[:, None]


class QuantLayer(nn.Module):
    """A conv or linear with fake-quantized weights (and optionally its input).

    ``rounding``: ``"nearest"``, ``"soft"`` (AdaRound's ``h(V)``, learnable ``alpha``)
    or ``"learned"`` (the hardened 0/1 offsets of a finished AdaRound).
    """

    def __init__(self, layer: nn.Module, bits: int, search: bool = True, input_quant: ActQuantizer | None = None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps nn.Conv2d or nn.Linear, not {type(layer).__name__}")
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be 2-8, not {bits}")
        w = layer.weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("the layer's weight holds NaN or Inf")
        self.kind = type(layer).__name__
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                         groups=layer.groups) if isinstance(layer, nn.Conv2d) else None  # fmt: skip
        self.bits = bits
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        b = layer.bias.detach().float().clone() if layer.bias is not None else torch.zeros(w.shape[0])
        self.bias = nn.Parameter(b, requires_grad=False)
        scale, zero = weight_params(w, bits, search)
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.register_buffer("scale", scale.reshape(shape))
        self.register_buffer("zero", zero.reshape(shape))
        self.register_buffer("offset", torch.zeros(0))  # learned 0/1 rounding offsets, once hardened
        self.alpha: nn.Parameter | None = None
        self.rounding = "nearest"
        self.quantize_weight = True
        self.input_quant = input_quant

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def start_adaround(self) -> None:
        """Soft rounding, initialised so that ``h(alpha)`` is each weight's fractional part."""
        frac = self.weight / self.scale - torch.floor(self.weight / self.scale)
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(frac))
        self.rounding = "soft"

    def harden(self) -> None:
        """Fix the learned rounding: up where ``h(alpha) >= 0.5``."""
        if self.alpha is None:
            raise RuntimeError("harden() after start_adaround()")
        self.offset = (rectified_sigmoid(self.alpha.detach()) >= 0.5).float()
        self.alpha = None
        self.rounding = "learned"

    def round_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2 h(V) - 1|^beta)``: pushes every ``h`` to 0 or 1 as ``beta`` falls."""
        return (1 - (2 * rectified_sigmoid(self.alpha) - 1).abs().pow(beta)).sum()

    def codes(self) -> torch.Tensor:
        """Integer codes ``[0, 2**bits)`` of the current (nearest or hardened) rounding."""
        base = torch.floor(self.weight / self.scale)
        if self.rounding == "learned":
            r = self.offset
        elif self.rounding == "soft":
            r = (rectified_sigmoid(self.alpha.detach()) >= 0.5).float()
        else:
            r = torch.round(self.weight / self.scale) - base
        return torch.clamp(base + r + self.zero, 0, self.qmax)

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weight:
            return self.weight
        if self.rounding == "soft":
            q = torch.floor(self.weight / self.scale) + rectified_sigmoid(self.alpha)
            return (torch.clamp(q + self.zero, 0, self.qmax) - self.zero) * self.scale
        return (self.codes() - self.zero) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = self.quantized_weight()
        if self.conv is not None:
            return F.conv2d(x, w, self.bias, **self.conv)
        return F.linear(x, w, self.bias)

    def describe(self) -> str:
        how = {"nearest": "nearest", "soft": "adaround (soft)", "learned": "learned rounding"}[self.rounding]
        return f"int{self.bits} asym per-channel, {how}"

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.describe()}"


class ActQuantizer(nn.Module):
    """Static fake quantization of a tensor: observe, then quantize with one scale and zero.

    States: ``observing`` (pass-through, collecting min/max and a sample of values),
    ``enabled`` (quantize), or neither (pass-through). ``learn_scale()`` makes the
    scale an LSQ parameter; ``drop_prob`` keeps each element in float with that
    probability while the module is in training mode (QDrop).
    """

    def __init__(self, bits: int, observer: str = "mse", percentile: float = 99.99):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be 2-8, not {bits}")
        check_observer(observer)
        self.bits, self.observer, self.percentile = bits, observer, percentile
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero", torch.zeros(()))
        self.signed = False
        self.observing, self.enabled = False, False
        self.drop_prob = 0.0
        self._lo: list[torch.Tensor] = []
        self._hi: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._seen = 0

    @property
    def fmt(self) -> ActFormat:
        # asymmetric: a non-negative input gets a zero point of 0 and all 2**bits levels (unsigned)
        return ActFormat(self.bits, "tensor", dynamic=False, symmetric=False)

    def observe(self) -> None:
        self.observing, self.enabled = True, False
        self._lo, self._hi, self._values, self._seen = [], [], [], 0

    def finish_observing(self) -> None:
        """Pick the range with the observer and switch quantization on."""
        if not self._lo:
            raise RuntimeError("this activation site saw no calibration data")
        lo, hi = torch.stack(self._lo), torch.stack(self._hi)
        values = torch.cat(self._values)[:OBSERVED_VALUES]
        stats = ChannelStats(lo.min().reshape(1), hi.max().reshape(1), lo.reshape(-1, 1), hi.reshape(-1, 1),
                             values.reshape(-1, 1))  # fmt: skip
        lo_v, hi_v = observe_range(stats, self.observer, self.fmt, self.percentile)
        scale, zero = act_params(torch.tensor(lo_v), torch.tensor(hi_v), self.fmt)
        if not (torch.isfinite(scale) and scale > 0):
            raise ValueError(f"activation range [{lo_v}, {hi_v}] gives no usable scale")
        self.scale = scale.reshape(()).clone()
        self.zero = zero.reshape(()).clone()
        self.signed = float(lo.min()) < 0
        self.observing, self.enabled = False, True
        self._lo, self._hi, self._values = [], [], []

    def learn_scale(self) -> nn.Parameter:
        """Turn the scale into a learnable parameter (LSQ) and return it."""
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(value)
        return self.scale

    def freeze_scale(self) -> None:
        if isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.register_buffer("scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                self._lo.append(x.min().float())
                self._hi.append(x.max().float())
                if self._seen < OBSERVED_VALUES:
                    flat = x.detach().reshape(-1).float()
                    take = min(flat.numel(), max(1, OBSERVED_VALUES // 16))
                    g = torch.Generator().manual_seed(len(self._lo))
                    self._values.append(flat[torch.randint(flat.numel(), (take,), generator=g)])
                    self._seen += take
            return x
        if not self.enabled:
            return x
        top = (1 << self.bits) - 1
        # PyTorch's fused fake-quant ops: (clamp(round(x / s) + z, 0, top) - z) * s in one pass,
        # straight-through for x; the learnable one gives LSQ's step-size gradient, scaled by g
        if isinstance(self.scale, nn.Parameter) and self.scale.requires_grad:
            g = 1.0 / math.sqrt(x[0].numel() * top)
            q = torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.reshape(1), self.zero.reshape(1).float(), 0, top, g
            )
        else:
            q = torch.fake_quantize_per_tensor_affine(
                x, self.scale.reshape(()).float(), self.zero.reshape(()).to(torch.int32), 0, top
            )
        if self.training and self.drop_prob > 0:
            keep = torch.rand_like(x) < self.drop_prob
            q = torch.where(keep, x, q)
        return q

    def describe(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"a{self.bits} per-tensor static ({kind}, {self.observer})"

    def extra_repr(self) -> str:
        return f"bits={self.bits}, observer={self.observer}, scale={float(self.scale):.4g}, zero={float(self.zero):g}"


class ActSite(nn.Module):
    """``quant(module(x))``: an activation quantizer on a module's output."""

    def __init__(self, module: nn.Module, quant: ActQuantizer):
        super().__init__()
        self.module = module
        self.quant = quant

    def forward(self, *args, **kwargs):
        return self.quant(self.module(*args, **kwargs))
