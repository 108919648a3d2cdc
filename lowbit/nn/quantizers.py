"""The two quantizers every quantized module is built from, in simulate mode (fake
quantization in floating point, differentiable where methods learn).

``WeightQuantizer`` turns a float weight (any N-D shape; groups run along the
matrix view ``[out, prod(rest)]``) into its quantized value. Its state is one of:

- not set: the weight passes through unchanged (the model is still float there);
- ``params``: an integer grid (``scale``, ``zero``: ``[out, ngroups]``) with a
  rounding: nearest (straight-through gradient), soft (AdaRound's rectified
  sigmoid of a learnable ``alpha``, Nagel et al. 2020) or learned (hardened 0/1
  offsets);
- ``signed``: SignRound's learnable rounding offsets ``v`` added before rounding
  and learnable factors on each group's min and max (Cheng et al. 2023), all with
  straight-through rounding, until ``finish_signed_rounding`` fixes the codes;
- ``fixed``: codes a method decided (GPTQ, AWQ's clipping, codebook formats),
  held as the ``QuantizedWeight`` that freezing stores.

``ActQuantizer`` quantizes a tensor flowing between ops: an optional exact input
transform first (a shift and an inverse scale no neighbouring layer could
absorb: SmoothQuant, Outlier Suppression+), then integer fake quantization in an
``ActFormat`` (per token or per tensor, dynamic or static; per channel group
after a permutation for PEG / RPTQ), with static ranges from lowbit's observers,
optionally learned (LSQ, Esser et al. 2020), optionally dropped at random per
element while training (QDrop, Wei et al. 2022). With no format it is a
pass-through that still applies its transform.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.formats import activation as A
from lowbit.formats import integer
from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.observers import InputStats, check_observer, static_params
from lowbit.quantized_weight import QuantizedWeight, check_finite

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020, eq. 23)
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` strictly inside ``(0, 1)``."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def matrix(w: torch.Tensor) -> torch.Tensor:
    """The matrix view ``[out, prod(rest)]`` that groups and kernels work on."""
    return w.reshape(w.shape[0], -1)


class WeightQuantizer(nn.Module):
    """Simulated quantization of one weight in ``fmt`` (see the module docstring).

    ``method``: which method decided the current codes (what the coverage report says).
    """

    def __init__(self, fmt: WeightFormat):
        super().__init__()
        self.fmt = fmt
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.register_buffer("offset", None)  # hardened 0/1 rounding offsets [out, K]
        self.alpha: nn.Parameter | None = None
        self.signed: dict[str, torch.Tensor] | None = None  # SignRound: v, lo_factor, hi_factor, lo, hi
        self.fixed: QuantizedWeight | None = None
        self.method = ""
        self.enabled = True
        self._fixed_cache: torch.Tensor | None = None

    @property
    def is_set(self) -> bool:
        return self.fixed is not None or self.scale is not None or self.signed is not None

    @property
    def rounding(self) -> str:
        if self.fixed is not None:
            return "fixed"
        if self.signed is not None:
            return "signed"
        if self.alpha is not None:
            return "soft"
        return "learned" if self.offset is not None else "nearest"

    # --- setting the codes --------------------------------------------------------

    def set_params(self, scale: torch.Tensor, zero: torch.Tensor, method: str) -> None:
        """An integer grid (``[out, ngroups]`` of the matrix view) with nearest rounding."""
        if self.fmt.kind != "int":
            raise ValueError(f"{self.fmt.describe()} has no integer grid to set")
        self.scale, self.zero = scale.detach().float().clone(), zero.detach().float().clone()
        self.fixed, self.alpha, self.offset, self._fixed_cache, self.signed = None, None, None, None, None
        self.method = method

    def set_fixed(self, qw: QuantizedWeight, method: str) -> None:
        """Codes decided by a method; the simulation dequantizes exactly what freezing stores."""
        self.fixed, self._fixed_cache = qw, None
        self.scale = self.zero = self.offset = None
        self.alpha = self.signed = None
        self.method = method

    def init_params(self, w: torch.Tensor, method: str, mse: bool = False, mse_norm: float = 2.4,
                    factors: torch.Tensor | None = None) -> None:  # fmt: skip
        """Min-max (or MSE-searched) parameters for ``w``; formats without a grid get their codes."""
        check_finite(w)
        if self.fmt.kind != "int":
            self.set_fixed(QuantizedWeight.quantize(w.detach().float(), self.fmt), method)
            return
        m = matrix(w).detach().float()
        f = self.fmt
        if mse:
            scale, zero = integer.mse_params(m, f.bits, f.group_size, f.symmetric, factors, mse_norm)
        else:
            scale, zero = integer.minmax_params(m, f.bits, f.group_size, f.symmetric)
        self.set_params(scale, zero, method)

    # --- AdaRound --------------------------------------------------------------------

    def _grid(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = m.shape
        g = self.fmt.group_size
        s = integer._full(self.scale.to(m.device), shape, g)
        z = integer._full(self.zero.to(m.device), shape, g)
        return s, z

    def start_soft_rounding(self, w: torch.Tensor) -> nn.Parameter:
        """Soft rounding initialised so that ``h(alpha)`` is each weight's fractional part."""
        if self.scale is None:
            raise RuntimeError("soft rounding starts from an integer grid; call init_params first")
        m = matrix(w).detach().float()
        s, _ = self._grid(m)
        frac = m / s - torch.floor(m / s)
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(frac))
        self.offset = None
        return self.alpha

    def harden(self, w: torch.Tensor) -> None:
        """Fix the learned rounding: up where ``h(alpha) >= 0.5``."""
        if self.alpha is None:
            raise RuntimeError("harden() after start_soft_rounding()")
        self.offset = (rectified_sigmoid(self.alpha.detach()) >= 0.5).float()
        self.alpha = None

    def round_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2 h(V) - 1|^beta)``: pushes every ``h`` to 0 or 1 as ``beta`` falls."""
        return (1 - (2 * rectified_sigmoid(self.alpha) - 1).abs().pow(beta)).sum()

    # --- SignRound --------------------------------------------------------------------------

    def start_signed_rounding(self, w: torch.Tensor) -> list[nn.Parameter]:
        """SignRound's parameters for ``w``: rounding offsets ``v`` (``[out, K]``, from 0) and factors on
        each group's min and max (``[out, ngroups]``, from 1); returns ``[v, lo_factor, hi_factor]``."""
        if self.fmt.kind != "int":
            raise ValueError(f"signed rounding learns integer grids, not {self.fmt.describe()}")
        check_finite(w)
        m = matrix(w).detach().float()
        if self.fmt.group_size is None:
            lo, hi = m.min().reshape(1, 1), m.max().reshape(1, 1)
        else:
            groups = integer.to_groups(m, self.fmt.group_size)
            lo, hi = groups.amin(-1), groups.amax(-1)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range always holds 0, as params_from_range's
        bits = self.fmt.bits
        full = torch.maximum(hi, -lo) / ((1 << (bits - 1)) - 1) if self.fmt.symmetric else (hi - lo) / integer.qmax(bits)
        params = [nn.Parameter(torch.zeros_like(m)), nn.Parameter(torch.ones_like(lo)), nn.Parameter(torch.ones_like(hi))]
        self.signed = {"v": params[0], "lo_factor": params[1], "hi_factor": params[2], "lo": lo, "hi": hi, "full": full}
        self.fixed = self.scale = self.zero = self.offset = self.alpha = None
        self._fixed_cache = None
        return params

    def _signed_grid(self, shape: torch.Size, v=None, lo_factor=None, hi_factor=None):
        """Scale and zero ``[out, K]`` of the current (or given) SignRound parameters, differentiable in the
        factors; the scale rounded to the dtype it will be stored in, the zero point to an integer (both
        straight-through)."""
        sg = self.signed
        lo = sg["lo"] * (sg["lo_factor"] if lo_factor is None else lo_factor)
        hi = sg["hi"] * (sg["hi_factor"] if hi_factor is None else hi_factor)
        bits = self.fmt.bits
        if self.fmt.symmetric:
            scale = torch.maximum(hi, -lo) / ((1 << (bits - 1)) - 1)
        else:
            scale = (hi - lo) / integer.qmax(bits)
        full = sg["full"]  # the scale at factors 1: a floor far below it, and 1 for an all-zero group
        scale = torch.where(full > 0, torch.maximum(scale, 1e-3 * full), torch.ones_like(scale))
        scale = scale + (scale.detach().to(integer.scale_storage_dtype(scale.detach())).float() - scale.detach())
        if self.fmt.symmetric:
            zero = torch.full_like(scale, float(1 << (bits - 1)))
        else:
            zero = _round_ste(-lo / scale).clamp(0, integer.qmax(bits))
        g = self.fmt.group_size
        return integer._full(scale, shape, g), integer._full(zero, shape, g), scale, zero

    def _signed_value(self, m: torch.Tensor, v=None, lo_factor=None, hi_factor=None):
        s, z, scale, zero = self._signed_grid(m.shape, v, lo_factor, hi_factor)
        v = self.signed["v"] if v is None else v
        q = torch.clamp(_round_ste(m.detach() / s + v) + z, 0, integer.qmax(self.fmt.bits))
        return (q - z) * s, q, scale, zero

    def finish_signed_rounding(self, w: torch.Tensor, method: str, params: list[torch.Tensor] | None = None) -> None:
        """Fix the codes SignRound's parameters (the current ones, or ``params = [v, lo_factor,
        hi_factor]``, e.g. the best seen) give ``w``: what the simulation computed is what freezing stores."""
        if self.signed is None:
            raise RuntimeError("finish_signed_rounding() after start_signed_rounding()")
        m = matrix(w).detach().float()
        with torch.no_grad():
            v, lo_f, hi_f = params if params is not None else (None, None, None)
            _, q, scale, zero = self._signed_value(m, v, lo_f, hi_f)
        qw = QuantizedWeight.from_codes(q.to(torch.uint8).cpu(), scale.cpu(), zero.cpu() if self.fmt.has_zero else None,
                                        self.fmt, shape=tuple(w.shape))  # fmt: skip
        self.set_fixed(qw, method)

    # --- the simulation -----------------------------------------------------------------

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes ``[out, K]`` of the current hard rounding (integer grids only)."""
        m = matrix(w).detach().float()
        s, z = self._grid(m)
        base = torch.floor(m / s)
        if self.offset is not None:
            r = self.offset.to(m.device)
        elif self.alpha is not None:
            r = (rectified_sigmoid(self.alpha.detach()) >= 0.5).float()
        else:
            r = torch.round(m / s) - base
        return torch.clamp(base + r + z, 0, integer.qmax(self.fmt.bits))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.is_set:
            return w
        if self.fixed is not None:
            if self._fixed_cache is None or self._fixed_cache.device != w.device:
                self._fixed_cache = self.fixed.dequantize().to(w.device)
            return self._fixed_cache.to(w.dtype)
        m = matrix(w)
        if self.signed is not None:
            return self._signed_value(m)[0].reshape(w.shape).to(w.dtype)
        s, z = self._grid(m)
        top = integer.qmax(self.fmt.bits)
        if self.alpha is not None:
            q = torch.floor(m.detach() / s) + rectified_sigmoid(self.alpha)
            out = (torch.clamp(q + z, 0, top) - z) * s
        elif self.offset is not None:
            out = (self.codes(w) - z) * s
        else:  # nearest, straight-through for w (QAT)
            q = m / s
            q = q + (torch.round(q) - q).detach()
            out = (torch.clamp(q + z, 0, top) - z) * s
        return out.reshape(w.shape).to(w.dtype)

    def freeze(self, w: torch.Tensor) -> QuantizedWeight:
        """The packed weight the runtime module stores."""
        if self.signed is not None:
            self.finish_signed_rounding(w, self.method or "signround")
        if self.fixed is not None:
            return self.fixed
        if self.scale is None:
            raise RuntimeError("this weight was never quantized")
        codes = self.codes(w).to(torch.uint8)
        zero = self.zero if self.fmt.has_zero else None
        return QuantizedWeight.from_codes(codes.cpu(), self.scale.cpu(), None if zero is None else zero.cpu(),
                                          self.fmt, shape=tuple(w.shape))  # fmt: skip

    def describe(self) -> str:
        how = {"nearest": "", "soft": " (soft rounding)", "learned": " learned rounding", "fixed": "",
               "signed": " (signed rounding)"}[self.rounding]  # fmt: skip
        return self.fmt.describe() + how

    def extra_repr(self) -> str:
        return f"{self.describe()}, method={self.method or 'unset'}"


class ActQuantizer(nn.Module):
    """Simulated quantization of an activation (see the module docstring).

    ``channel_dim``: where the channels of the tensor are (-1 for a linear's input,
    1 for a conv's): observers and per-group scales work per channel there.
    It quantizes once it has a format and (for static formats) parameters; ``enabled=False`` passes through.
    """

    def __init__(self, fmt: ActFormat | None = None, observer: str = "minmax", percentile: float = 99.99,
                 channel_dim: int = -1):  # fmt: skip
        super().__init__()
        check_observer(observer)
        self.fmt, self.observer, self.percentile, self.channel_dim = fmt, observer, percentile, channel_dim
        for name in ("scale", "zero", "perm", "bounds", "input_shift", "input_scale", "token_bits"):
            self.register_buffer(name, None)
        self.outlier_threshold: float | None = None
        self.drop_prob = 0.0
        self.enabled = True
        self.locked = False  # static parameters a method set (RepQ-ViT's reparameterized grid): calibration keeps them
        self.stats: InputStats | None = None  # what calibration accumulated, until finish_observing()

    # --- configuration (what transforms attach) ------------------------------------

    @property
    def quantizes(self) -> bool:
        return self.fmt is not None

    @property
    def static(self) -> bool:
        return self.fmt is not None and not self.fmt.dynamic

    @property
    def per_tensor_grid(self) -> bool:
        """Static, one uniform grid for the whole tensor, no permutation (what a scale search or an
        integer kernel can take as one scale and zero point)."""
        return self.static and self.fmt.uniform and self.fmt.granularity == "tensor" and self.perm is None

    @property
    def observes(self) -> bool:
        """Whether calibration should observe this quantizer and set its static parameters."""
        return self.static and self.enabled and not self.locked

    @property
    def ready(self) -> bool:
        return self.fmt is not None and (self.fmt.dynamic or self.scale is not None)

    def add_transform(self, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        """Read ``x~ = (x - shift) / scale`` from now on, composed with any transform already there
        (the consumer's weights must already have absorbed it)."""
        k = next((t.numel() for t in (shift, scale, self.input_shift, self.input_scale) if t is not None), None)
        inv_before = self.input_scale if self.input_scale is not None else torch.ones(k)
        # (((x - z1) * i1) - z2) * i2 = (x - (z1 + z2 / i1)) * (i1 * i2)
        if shift is not None:
            add = shift.detach().float().cpu() / inv_before.cpu()
            self.input_shift = add if self.input_shift is None else self.input_shift.cpu() + add
        if scale is not None:
            self.input_scale = inv_before.cpu() / scale.detach().float().cpu()

    def set_groups(self, perm: torch.Tensor, bounds: torch.Tensor) -> None:
        """Static scales per group of channels ``perm[bounds[g]:bounds[g+1]]`` (PEG, RPTQ)."""
        if self.fmt is None:
            raise ValueError("per-group activation scales need an activation format (act_bits)")
        from dataclasses import replace

        self.fmt = replace(self.fmt, granularity="group", dynamic=False)
        self.perm, self.bounds = perm.long().cpu(), bounds.long().cpu()

    def set_token_bits(self, bits: torch.Tensor | None) -> None:
        """A width per token position (dim -2) on this static per-tensor grid (PMQ's patch-wise bits): each
        position's codes span the same range with ``2^bits`` levels. ``None``: every position at the format's."""
        if bits is not None:
            bits = torch.as_tensor(bits).long().reshape(-1).cpu()
            if self.fmt is None or not self.fmt.uniform or self.fmt.dynamic or self.fmt.granularity != "tensor":
                raise ValueError("token widths need a static per-tensor uniform activation grid")
            if not bool(((bits >= 2) & (bits <= 8)).all()):
                raise ValueError(f"token widths must be 2..8 bits, got {sorted(set(bits.tolist()))}")
        self.token_bits = bits

    def set_static(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        scale = torch.as_tensor(scale).detach().float().reshape(-1).clone()
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"activation scales must be positive and finite, got {scale.tolist()[:4]}")
        self.scale, self.zero = scale, torch.as_tensor(zero).detach().float().reshape(-1).clone()

    # --- observation -------------------------------------------------------------------

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[positions, channels]``."""
        if self.channel_dim not in (-1, x.dim() - 1):
            x = x.movedim(self.channel_dim, -1)
        return x.reshape(-1, x.shape[-1])

    def begin_observing(self) -> None:
        self.stats = None

    def accumulate(self, x: torch.Tensor) -> None:
        """Add ``x`` (already transformed) to what the observer will read."""
        rows = self.rows(x.detach())
        if self.stats is None:
            self.stats = InputStats.empty(rows.shape[1], rows.device)
        self.stats.add(rows)

    def finish_observing(self) -> None:
        """Static parameters from the observer over what was accumulated."""
        stats, self.stats = self.stats, None
        if stats is None or not stats.tokens:
            raise ValueError("this activation saw no calibration data; static activation scales need some")
        if self.observer == "ptf" and self.perm is None:  # one scale per channel (power-of-two factors)
            k = stats.lo.numel()
            self.set_groups(torch.arange(k), torch.arange(k + 1))
        scale, zero = static_params(stats.channel_stats(), self.fmt, self.observer, self.perm, self.bounds,
                                    self.percentile)  # fmt: skip
        self.set_static(scale, zero)

    # --- LSQ ----------------------------------------------------------------------------

    def learn_scale(self) -> nn.Parameter | None:
        """The static per-tensor scale as a learnable parameter (LSQ), or ``None`` if there is none."""
        if not self.static or self.scale is None or self.scale.numel() != 1 or not self.fmt.uniform:
            return None
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

    # --- the simulation ----------------------------------------------------------------

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift is None and self.input_scale is None:
            return x
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        if self.input_shift is not None:
            x = x - self.input_shift.to(x.device, x.dtype).reshape(shape)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.device, x.dtype).reshape(shape)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if not self.enabled or not self.ready:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        if not fmt.uniform:  # log2 / logsqrt2 / twin: static per tensor
            q = A.nonuniform_fake_quantize(x, fmt, self.scale)
        elif fmt.granularity == "tensor" and not fmt.dynamic and self.perm is None:
            q = self._per_tensor(x)
        else:
            rows = self.rows(x)
            keep = None
            if self.outlier_threshold is not None:  # LLM.int8(): outlier feature columns stay in float
                keep = (rows.abs() > self.outlier_threshold).any(0)
            v = rows if self.perm is None else rows[:, self.perm.to(rows.device)]
            qv = A.fake_quantize(v, fmt, self.scale, self.zero, self.bounds)
            if self.perm is not None:
                qv = qv[:, torch.argsort(self.perm.to(qv.device))]
            if keep is not None:
                qv = torch.where(keep, rows.float(), qv)
            q = self._unrows(qv.to(x.dtype), x)
        if self.training and self.drop_prob > 0:
            q = torch.where(torch.rand_like(x) < self.drop_prob, x, q)
        return q

    def _per_tensor(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.fmt.code_range
        scale, zero = self.scale.reshape(()), self.zero.reshape(())
        if self.token_bits is not None:
            return self._per_token_width(x, scale.float(), zero.float(), lo, hi)
        if isinstance(self.scale, nn.Parameter) and self.scale.requires_grad:
            # LSQ: the step size's gradient, scaled by g = 1 / sqrt(numel * qmax)
            g = 1.0 / math.sqrt(x[0].numel() * max(hi, 1))
            s = scale * g + (scale - scale * g).detach()
            v = x / s
            v = v + (torch.round(v) - v).detach()
            return ((v + zero).clamp(lo, hi) - zero) * s
        return A.codes(x.float(), scale.float(), zero.float(), self.fmt).mul_(scale.float()).to(x.dtype)

    def _per_token_width(self, x: torch.Tensor, scale, zero, lo: int, hi: int) -> torch.Tensor:
        """The per-tensor grid's range, cut into ``2^b`` levels at each token position's width ``b``."""
        if x.dim() < 2 or x.shape[-2] != self.token_bits.numel():
            raise ValueError(f"this quantizer has widths for {self.token_bits.numel()} token positions; the input has "
                             f"shape {tuple(x.shape)} (patch-wise widths need the calibration's sequence length)")
        b = self.token_bits.to(x.device).float()
        if self.fmt.symmetric:
            lo_t, hi_t = -torch.exp2(b - 1), torch.exp2(b - 1) - 1
        else:
            lo_t, hi_t = torch.zeros_like(b), torch.exp2(b) - 1
        s = scale * (hi - lo) / (hi_t - lo_t)
        z = torch.round(lo_t - (lo - zero) * scale / s)
        s, z, lo_t, hi_t = (t[:, None] for t in (s, z, lo_t, hi_t))
        xf = x.float()
        v = torch.round(xf / s)
        if torch.is_grad_enabled() and x.requires_grad:
            v = xf / s + (v - xf / s).detach()  # straight-through
        return ((v + z).clamp(lo_t, hi_t) - z).mul(s).to(x.dtype)

    def _unrows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channel_dim in (-1, like.dim() - 1):
            return rows.reshape(like.shape)
        moved = like.movedim(self.channel_dim, -1)
        return rows.reshape(moved.shape).movedim(-1, self.channel_dim)

    def describe(self) -> str:
        if self.fmt is None:
            return ""
        extra = f", {self.observer}" if self.static else ""
        return self.fmt.describe() + extra

    def extra_repr(self) -> str:
        return self.describe() or "float (pass-through)"
