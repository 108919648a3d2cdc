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

- **PoT-aware smoothing** (``smooth=True``; off by default, see below): SmoothQuant's
  per-channel migration between each linear's input and its weight columns, every factor
  rounded to the nearest power of two, so that dividing the input by it is a shift (in a
  post-LayerNorm ViT the input quantizer applies it; where a norm's affine can absorb it
  exactly, the norm does). The migration strength is searched per input from 0 to 1 (and no
  smoothing) by the consumers' output error with both operands quantized, the activations on
  MSE-shrunk ranges as lowbit's observer will set them (the paper's exact criterion was not
  readable here). On the CIFAR ViT (10,000 test images, 256 calibration images) it lowered
  top-1: W4A4 69.08 against 69.34 without it (68.44 when the search scored min-max ranges),
  W6A6 71.47 against 71.49 (71.20 scoring min-max ranges), W8A8 71.60 against 71.56 (scoring
  min-max ranges). The per-layer output error it minimises does not foresee the effect on the
  model, so it stays an option. The mixed widths (``mixed=True``, no smoothing) gave 69.84 /
  71.35 / 71.56 at W4A4 / W6A6 / W8A8 against 69.34 / 71.49 / 71.56 with uniform widths.
- **Coarse-to-fine mixed precision** (``mixed=True``; off by default, so that "W4A4" means 4-bit
  weights everywhere): weight widths chosen within the uniform allocation's weight bits (the
  model is never larger). Coarse: one width per block (``bits + d``, ``d`` in ``offsets``) from
  the measured output KL with all of that block's linears rounded together, allocated on a
  frontier of block choices; fine: inside each block, per linear, from each linear's own
  measured output KL, within the bits the coarse step gave that block. Activation widths stay
  uniform. The measurements are PMQ's (``search_images`` calibration images); the paper's
  sensitivity measure and search were not readable here, so both steps are lowbit's.

Only the paper's summary could be read here (the adaptive rounding, the PoT-aware smoothing and
the coarse-to-fine mixed precision are named there); where it is silent the choices are
lowbit's and said above. The accelerator half of the paper is hardware. The activation error
is measured on up to 2^20 sampled values per grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.formats import integer
from lowbit.methods import pmq
from lowbit.methods.base import register, static_act_format
from lowbit.methods.ptq4vit import _ranges
from lowbit.methods.rtn import RTN
from lowbit.methods.smoothquant import SmoothQuant
from lowbit.nn.qmodule import QModule
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
    smooth: bool = False  # PoT-aware smoothing of each linear's input (measured: it cost accuracy on the CIFAR ViT)
    mixed: bool = False  # coarse-to-fine mixed weight widths within the uniform size
    offsets: tuple = (-1, 0, 1)  # the mixed widths: bits + d
    search_images: int = 32  # calibration images the mixed-precision costs are measured on

    def __post_init__(self):
        super().__post_init__()
        self.offsets = tuple(int(d) for d in self.offsets)
        if 0 not in self.offsets:
            raise ValueError(f"offsets {list(self.offsets)} must include 0 (the uniform widths are the budget)")
        if self.search_images < 1:
            raise ValueError(f"search_images ({self.search_images}) must be >= 1")

    def prepare(self, model, adapter, batches) -> None:
        self._plan = self._costs = None
        if not self.mixed:
            return
        batches = pmq._first(batches or [], self.search_images)
        widths = {b for b in (self.bits + d for d in self.offsets) if b in pmq.WIDTHS}
        sens = pmq.sensitivities(model, batches, self.search_images, self.weight_format, acts=False)
        pmq.output_costs(model, batches, sens, self.weight_format, {"w": widths, "a": set()},
                         getattr(self, "progress", False), desc="p2_vit sensitivity")  # fmt: skip
        groups: dict[str, list[str]] = {}
        blocks = [n + "." for n, _ in adapter.blocks(model)]
        for name in sens:
            groups.setdefault(next((b[:-1] for b in blocks if name.startswith(b)), name), []).append(name)
        kl = all(s["weighted"] for s in sens.values())
        self._costs = (sens, groups, block_costs(model, batches, groups, self.weight_format, widths, kl))

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "turns static activation scales into powers of two")
        if self.mixed and self._plan is None:
            self._plan = self.allocate(unit.model)
        for name, qm in unit.qmodules().items():
            if self.mixed and name in self._plan:
                qm.weight_q.fmt = replace(qm.weight_q.fmt, bits=self._plan[name])
                unit.log.append({"layer": name, "weight_bits": self._plan[name]})
        if self.smooth:
            SmoothQuant(pot=True, mse_range=True).transform(unit, quantizer)
            unit.log.append({"note": "power-of-two smoothing searched per linear input"})

    def allocate(self, model) -> dict[str, int]:
        """``{linear: weight bits}``: one width per block (coarse), then per linear inside it (fine)."""
        sens, groups, coarse = self._costs or ({}, {}, {})

        def eligible(n):
            m = model.get_submodule(n) if pmq._has(model, n) else None
            return isinstance(m, QModule) and m.weight_q.fmt is not None and m.weight_q.fmt.bits == self.bits

        layers = {
            g: [(n, sens[n]["numel"], sens[n]["w_out"]) for n in names if eligible(n)] for g, names in groups.items()
        }
        return coarse_to_fine({g: v for g, v in layers.items() if v}, coarse, self.bits)

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
        # what each grid sees: its input after any exact input transform (a smoothing division)
        hooks = [q.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(m.transform(a[0].detach()).reshape(-1)))
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
                    err = float((q.quantize(x[:, None]).reshape(-1) - x).pow(2).mean())
                if best is None or err < best[0]:
                    best = (err, s.clone(), z.clone())
            q.set_static(best[1], best[2])
            q.locked = True
            unit.log.append({"grid": n, "pot_scale": float(best[1]), "observed_scale": float(s0)})


@torch.no_grad()
def block_costs(model, batches: list, groups: dict, fmt, widths: set, kl: bool = True) -> dict:
    """``{group: {bits: output distance}}`` with every linear of the group rounded to ``bits`` together
    (``kl``: the output distribution's KL divergence, else the relative squared error)."""
    if not batches:
        return {g: {b: 0.0 for b in widths} for g in groups}
    ref = [pmq._output(model, b) for b in batches]
    out = {}
    for g, names in groups.items():
        mods = [model.get_submodule(n) for n in names]
        saved = [m.weight.data for m in mods]
        out[g] = {}
        for b in sorted(widths):
            for m, w in zip(mods, saved):
                m.weight.data = pmq._weight_rtn(w, fmt, b).to(w.dtype)
            try:
                out[g][b] = pmq.output_distance(model, batches, ref, kl)
            finally:
                for m, w in zip(mods, saved):
                    m.weight.data = w
    return out


def coarse_to_fine(groups: dict, coarse: dict, bits: int) -> dict[str, int]:
    """``groups``: ``{group: [(linear, numel, {width: cost})]}``, ``coarse``: ``{group: {width: cost}}``.
    One width per group with the lowest summed cost within ``bits`` per weight over all groups, then
    per linear of each group the lowest summed cost within the bits its group was given."""
    if not groups:
        return {}
    size = {g: sum(numel for _, numel, _ in layers) for g, layers in groups.items()}
    options = [[(b * size[g], 0.0, c, b) for b, c in sorted(coarse[g].items())] for g in groups]
    cells = 8 * sum(len(o) for o in options)
    picks = pmq.pareto(options, sum(bits * size[g] for g in groups), 1.0, cells)
    plan = {}
    for (g, layers), (_, _, _, wc) in zip(groups.items(), picks):
        fine = [[(b * numel, 0.0, c, b) for b, c in sorted(costs.items())] for _, numel, costs in layers]
        for (n, _, _), (_, _, _, b) in zip(layers, pmq.pareto(fine, wc * size[g], 1.0, 8 * sum(map(len, fine)))):
            plan[n] = b
    return plan
