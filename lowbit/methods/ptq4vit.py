"""PTQ4ViT (Yuan et al., "PTQ4ViT: Post-Training Quantization for Vision Transformers with Twin
Uniform Quantization", ECCV 2022).

- **Twin uniform quantization** of the two distributions one uniform grid serves
  badly: the softmax output (most values tiny, a few near 1) and the GELU output
  (a small negative tail, a long positive one). One bit picks one of two uniform
  grids of ``b - 1`` bits, the second ``2^m`` times coarser
  (``formats.activation``, kind ``twin``).
- **Hessian-guided scaling factors**: for every linear, in execution order, the
  weight's and the input's scaling factors are searched over
  ``(alpha + i (beta - alpha) / n) x`` their initial value (``i = 0 .. n-1``; the
  paper's 0.01, 1.2 and 100), alternately, for ``rounds`` rounds, minimising the
  output error weighted by the squared gradient of the task loss with respect to
  that output (``sum g^2 (O - O^)^2``, the diagonal Gauss-Newton approximation of
  the loss's change).

Where lowbit departs from the paper or its code, and why:

- The reference code takes the gradient of the KL divergence between the model's
  output and itself, which is zero at the float model (its issue #17); lowbit takes
  the gradient of the float model's cross-entropy against its own predictions (as
  its BRECQ does), which is not, and normalises each layer's weights to mean 1.
- The reference adds its twin grids' two terms instead of choosing one; lowbit
  chooses (see ``formats.activation``). The twin grids' parameters are chosen by
  squared error on the calibration sample (the split ``m`` for the softmax; the
  positive step for the GELU, whose negative step covers its minimum), not by the
  Hessian metric; the metric searches the linears' weights and inputs.
- Weights keep lowbit's per-channel grids (the paper: per tensor), each channel's
  range scaled by the same searched factor. Convs (the patch embedding) and the
  ``q @ k^T`` operands keep their round-to-nearest and observer ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import integer
from lowbit.formats.activation import ActFormat, nonuniform_fake_quantize, params_from_range
from lowbit.formats.activation import codes as act_codes
from lowbit.methods.adaround import layer_inputs, layer_targets
from lowbit.methods.base import register, static_act_format
from lowbit.methods.brecq import output_fisher
from lowbit.methods.rtn import RTN
from lowbit.quantized_weight import QuantizedWeight


@register
@dataclass
class PTQ4ViT(RTN):
    """PTQ4ViT: twin-uniform softmax and GELU outputs, Hessian-guided weight and input scales."""

    name = "ptq4vit"
    needs_calibration = True
    needs_float_inputs = True

    twin: bool = True
    search: bool = True
    alpha: float = 0.01
    beta: float = 1.2
    candidates: int = 100
    rounds: int = 3
    search_images: int = 64  # calibration examples the metric sums over (their gradients are kept)

    uses_gradients = True  # the metric weighs by squared output gradients (``prepare`` collects them)

    def refuses(self, family: str) -> str | None:
        if family != "vit":
            return "its twin-uniform quantizers sit at the softmax and GELU sites only the vision-transformer " \
                   "adapters name"  # fmt: skip
        return None

    # --- the gradients the metric weighs by ---------------------------------------------------

    def prepare(self, model, adapter, batches) -> None:
        """Each linear's squared output gradient on the first ``search_images`` calibration examples."""
        self._grads: dict[str, torch.Tensor] = {}
        if self.search and batches and self.uses_gradients:
            linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            self._grads = output_fisher(model, linears, batches, limit=self.search_images)

    # --- the engine's hooks ----------------------------------------------------------------

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "searches static activation grids")
        if not self.twin:
            return
        for site in unit.sites().values():
            q = site.output_q
            if q is None or q.fmt is None:
                continue
            if site.role == "softmax":
                q.fmt = ActFormat(q.fmt.bits, "tensor", dynamic=False, symmetric=False, kind="twin")
            elif site.role == "mlp_act":
                q.fmt = ActFormat(q.fmt.bits, "tensor", dynamic=False, symmetric=True, kind="twin")
        unit.changed()

    def quantize(self, unit) -> None:
        super().quantize(unit)  # round-to-nearest weights and observed ranges: the search's start
        grads = getattr(self, "_grads", {})
        names = [n for n, m in unit.qmodules().items()
                 if m.kind == "linear" and (n in grads or not self.uses_gradients)]  # fmt: skip
        if not self.search or not names or not unit.inputs or not unit.float_inputs:
            return
        targets = layer_targets(unit, names)
        sites = unit.adapter.input_sites(unit.model)
        for name in names:
            qm = unit.get(name)
            g2 = grads.get(name)
            k = g2.shape[0] if g2 is not None else self.search_images
            grid = qm.input_q if qm.input_q.quantizes else None
            site = unit.get(sites[name]).output_q if grid is None and name in sites else None
            if site is not None:  # the search quantizes the site's raw output itself
                site.enabled = False
            try:
                x = layer_inputs(unit, name)[:k]
            finally:
                if site is not None:
                    site.enabled = True
            target = targets[name][1][:k]
            if g2 is not None and (x.shape[:-1] != g2.shape[:-1] or target.shape != g2.shape):
                continue
            stats = self._search(qm, x, target, g2, grid, site, self.metric_for(unit, name, targets, k))
            unit.log.append({"layer": name, **stats})
            unit.changed([name])

    # --- the search ------------------------------------------------------------------------

    def factors(self) -> list[float]:
        return [self.alpha + i * (self.beta - self.alpha) / self.candidates for i in range(self.candidates)]

    def metric_for(self, unit, name: str, targets: dict, k: int):
        """``metric(out, target, g2)``: the error a candidate is scored by (lower is better)."""
        return lambda out, target, g2: float((g2 * (out - target).pow(2)).mean())

    def _search(self, qm, x, target, g2, grid, site, metric) -> dict:
        """Alternate the weight's and the input's scaling factor, ``rounds`` times."""
        weights = _WeightSearch(qm)
        bias = None if qm.bias is None else qm.bias.detach().float()
        act = _ActSearch.of(grid, site)
        xq = act.apply(x, None)
        w_f, a_f = 1.0, None
        wq = weights.apply(w_f)

        def score(wq_, xq_) -> float:
            return metric(F.linear(xq_, wq_, bias), target, g2)

        first = best = score(wq, xq)
        for _ in range(self.rounds):
            for f in self.factors():
                cand = weights.apply(f)
                err = score(cand, xq)
                if err < best:
                    best, w_f, wq = err, f, cand
            if act.searchable:
                for f in self.factors():
                    cand = act.apply(x, f)
                    err = score(wq, cand)
                    if err < best:
                        best, a_f, xq = err, f, cand
        weights.commit(w_f, self.name)
        if a_f is not None:
            act.commit(a_f)
        self.after_search(qm, act.apply(x, a_f), target)
        return {"first_metric": first, "last_metric": best, "weight_factor": w_f, "input_factor": a_f or 1.0}


    def after_search(self, qm, xq: torch.Tensor, target: torch.Tensor) -> None:
        """What a method does once a layer's factors are chosen (``xq``: its quantized input)."""


def _ranges(w: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's ``[lo, hi]`` of the weight's matrix view (``[rows, ngroups]``)."""
    m = w.reshape(w.shape[0], -1)
    if fmt.group_size is None:
        return m.min().reshape(1, 1), m.max().reshape(1, 1)
    groups = integer.to_groups(m, fmt.group_size)
    return groups.amin(-1), groups.amax(-1)


class _WeightSearch:
    """A linear's weight grid with every group's range scaled by one factor: ``apply`` gives the
    fake-quantized weight, ``commit`` stores those codes on the layer."""

    def __init__(self, qm):
        self.qm = qm
        self.w = qm.stored_weight().detach().float()
        self.fmt = qm.weight_q.fmt
        self.lo, self.hi = _ranges(self.w, self.fmt)

    def params(self, f: float) -> tuple[torch.Tensor, torch.Tensor]:
        return integer.params_from_range(f * self.lo, f * self.hi, self.fmt.bits, self.fmt.symmetric)

    def apply(self, f: float) -> torch.Tensor:
        scale, zero = self.params(f)
        return integer.fake_quantize(self.w, scale, zero, self.fmt.bits, self.fmt.group_size)

    def commit(self, f: float, method: str) -> None:
        qw = QuantizedWeight.quantize(self.w, self.fmt, *self.params(f))
        self.qm.weight_q.set_fixed(replace(qw, shape=tuple(self.qm.weight.shape)), method)


class _ActSearch:
    """The input grid a linear's output depends on: its own static uniform quantizer (range scaled by
    the factor), or the twin grid of the site that feeds it (its coarse step scaled)."""

    def __init__(self, q, kind: str):
        self.q, self.kind = q, kind
        if q is not None:
            self.scale0, self.zero0 = q.scale.detach().clone(), q.zero.detach().clone()

    @classmethod
    def of(cls, grid, site) -> _ActSearch:
        if grid is not None and grid.per_tensor_grid:
            return cls(grid, "uniform")
        if site is not None and site.fmt is not None and site.fmt.kind == "twin" and site.fmt.symmetric:
            return cls(site, "twin")
        return cls(grid, "fixed")

    @property
    def searchable(self) -> bool:
        return self.kind != "fixed"

    def _params(self, f: float | None):
        s, z = self.scale0.float(), self.zero0.float()
        if f is None:
            return s, z
        if self.kind == "twin":  # the positive (coarse) step; the negative one covers GELU's minimum
            return torch.stack([s[0], s[1] * f]), z
        lo, hi = self.q.fmt.code_range
        return tuple(t.reshape(-1) for t in params_from_range((lo - z) * s * f, (hi - z) * s * f, self.q.fmt))

    def apply(self, x: torch.Tensor, f: float | None) -> torch.Tensor:
        if self.kind == "fixed":
            return x if self.q is None else self.q(x)
        s, z = self._params(f)
        if self.kind == "twin":
            return nonuniform_fake_quantize(x, self.q.fmt, s)
        return act_codes(x.float(), s.reshape(()), z.reshape(()), self.q.fmt) * s.reshape(())

    def commit(self, f: float) -> None:
        s, z = self._params(f)
        self.q.set_static(s, z)
