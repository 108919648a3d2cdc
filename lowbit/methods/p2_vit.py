"""P2-ViT (Shi et al., "P2-ViT: Power-of-Two Post-Training Quantization and Acceleration for Fully
Quantized Vision Transformer", 2024): every scaling factor a power of two, so that every
requantization between layers is a bit shift instead of a multiplication.

- **Power-of-two scales** for the weights (each output channel's) and for every static
  activation grid (each linear's input and every site: softmax, MLP activation,
  residual sums, ``q @ k^T`` operands). A product of power-of-two scales is a power of
  two: the ratio between an accumulator's scale and the next grid's is a shift.
- **Adaptive power-of-two rounding**: each scale ``s`` becomes ``2^floor(log2 s)`` or
  ``2^ceil(log2 s)``, whichever gives the smaller squared quantization error (on the
  weights of that channel; on the calibration activations for an activation grid),
  rather than the nearest power in the log domain. An asymmetric grid's zero point is
  recomputed for the new scale so that it keeps covering the observed minimum.

Not done here, with the reason: the paper's PoT-aware smoothing (a SmoothQuant-style
channel migration constrained to powers of two) and its coarse-to-fine mixed precision
are left out; lowbit's ``smoothquant`` transform can run before it as a recipe
(``smoothquant+p2_vit`` is not wired: transforms pair with ``rtn`` today). The
accelerator half of the paper is hardware. The module's choices beyond the paper:
the activation error is measured on up to 2^20 sampled values per grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.formats import integer
from lowbit.methods.base import register, static_act_format
from lowbit.methods.ptq4vit import _ranges
from lowbit.methods.rtn import RTN
from lowbit.quantized_weight import QuantizedWeight


def pot_candidates(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The powers of two just below and just above each scale (equal when it already is one)."""
    e = torch.log2(scale)
    return torch.exp2(torch.floor(e)), torch.exp2(torch.ceil(e))


def is_power_of_two(x: torch.Tensor) -> bool:
    e = torch.log2(x.double())
    return bool(torch.all(e == torch.round(e)))


@register
@dataclass
class P2ViT(RTN):
    """P2-ViT: power-of-two weight and activation scales, adaptively rounded (floor or ceil by error)."""

    name = "p2_vit"
    needs_calibration = True

    adaptive: bool = True  # False: the power of two nearest in the log domain
    sample: int = 1 << 20

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "turns static activation scales into powers of two")

    def quantize(self, unit) -> None:
        super().quantize(unit)  # round-to-nearest weights and observed activation ranges
        for name, qm in unit.qmodules().items():
            if qm.weight_q.fmt is not None and qm.weight_q.fmt.kind == "int":
                unit.log.append({"layer": name, **self._pot_weight(qm)})
        self._pot_acts(unit)
        unit.changed()

    # --- weights ------------------------------------------------------------------------------

    def _pot_weight(self, qm) -> dict:
        w = qm.stored_weight().detach().float()
        fmt = qm.weight_q.fmt
        m = w.reshape(w.shape[0], -1)
        lo, hi = _ranges(w, fmt)
        scale, zero = integer.params_from_range(lo, hi, fmt.bits, fmt.symmetric)
        best_s, best_z, best_e = None, None, None
        for s in self._choices(scale):
            z = zero if fmt.symmetric else torch.round(-torch.minimum(lo, torch.zeros_like(lo)) / s)
            z = z.clamp(0, integer.qmax(fmt.bits))
            err = (integer.fake_quantize(m, s, z, fmt.bits, fmt.group_size) - m).pow(2)
            e = integer.to_groups(err, fmt.group_size).sum(-1)  # [rows, ngroups]
            if best_e is None:
                best_s, best_z, best_e = s, z, e
            else:
                better = e < best_e
                best_s, best_z, best_e = (
                    torch.where(better, s, best_s),
                    torch.where(better, z, best_z),
                    torch.minimum(e, best_e),
                )
        qw = QuantizedWeight.quantize(w, fmt, best_s, best_z)
        qm.weight_q.set_fixed(replace(qw, shape=tuple(qm.weight.shape)), self.name)
        return {"pot_weight_scales": int(best_s.numel()), "raised": float((best_s > scale).float().mean())}

    def _choices(self, scale: torch.Tensor) -> list[torch.Tensor]:
        down, up = pot_candidates(scale)
        if self.adaptive:
            return [down, up]
        return [torch.exp2(torch.round(torch.log2(scale)))]

    # --- activations --------------------------------------------------------------------------

    def _pot_acts(self, unit) -> None:
        quantizers = {}
        for name, m in unit.qmodules().items():
            if m.input_q.per_tensor_grid and m.input_q.scale is not None:
                quantizers[name + ".input"] = m.input_q
        for name, site in unit.sites().items():
            for i, q in enumerate(site.quantizers()):  # the op's operands (q @ k^T), then its output
                if q.per_tensor_grid and q.scale is not None:
                    quantizers[f"{name}.{i}"] = q
        if not quantizers:
            return
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in quantizers}
        hooks = [q.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach().reshape(-1)))
                 for n, q in quantizers.items()]  # fmt: skip
        try:
            unit.outputs()
        finally:
            for h in hooks:
                h.remove()
        g = torch.Generator().manual_seed(0)
        for n, q in quantizers.items():
            if not seen[n]:
                continue
            x = torch.cat(seen[n])
            if x.numel() > self.sample:
                x = x[torch.randperm(x.numel(), generator=g)[: self.sample]]
            s0, z0 = q.scale.float().reshape(()), q.zero.float().reshape(())
            lo_c, hi_c = q.fmt.code_range
            rmin = (lo_c - z0) * s0
            best = None
            for s in self._choices(s0.reshape(1)):
                z = z0 if q.fmt.symmetric else torch.round(lo_c - rmin / s).clamp(lo_c, hi_c)
                q.set_static(s, z)
                with torch.no_grad():
                    err = float((q(x[:, None]).reshape(-1) - x).pow(2).mean())
                if best is None or err < best[0]:
                    best = (err, s.clone(), z.clone())
            q.set_static(best[1], best[2])
            q.locked = True
            unit.log.append({"grid": n, "pot_scale": float(best[1]), "observed_scale": float(s0)})
