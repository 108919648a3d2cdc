"""APQ-ViT (Ding et al., "Towards Accurate Post-Training Quantization for Vision Transformer",
ACM MM 2022).

- **Blockwise Bottom-elimination Calibration (BBC)**: PTQ4ViT's scaling-factor
  search, but each candidate scored at the output of the whole block (the unit)
  rather than of the one layer, so that a layer's error is judged by what it does
  to the block's output after the layers that follow it: ``sum g^2 (O - O^)^2``
  with ``g`` the gradient of the task loss at the block output (the diagonal
  Gauss-Newton weight of PTQ4ViT and BRECQ). The block reads the *float* model's
  input on the calibration images: the quantization error of the blocks below is
  eliminated from the calibration target, so each block is calibrated against its
  own error only.
- **Matthew-effect Preserving Quantization (MPQ)** of the softmax output: the
  attention map follows a power law, a few probabilities near the top carry most
  of the attention ("the rich get richer"), the rest decay to 0. A log2 grid keeps
  the power law (geometric levels), and its top level is searched so that the
  largest probabilities land close to a level: the scale minimising the
  probability-weighted squared error ``sum p (p - p^)^2`` over candidates in
  ``[max/2, max]`` (and 1, FQ-ViT's fixed top).

The paper's full text was not available to this implementation; what is above
follows its abstract and the PTQ4ViT framework it builds on. Choices made here:
the exact form of MPQ (log2 grid with a searched top level, probability-weighted
error), the block-output metric weighted by the block's own Fisher (as BRECQ),
the search ranges and counts (``candidates``/``rounds``, smaller than PTQ4ViT's
because each candidate costs a block forward), and twin-uniform MLP activations
inherited from PTQ4ViT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.activation import ActFormat, fake_quantize
from lowbit.methods.base import register
from lowbit.methods.brecq import _as_samples, _runner, unit_output_fisher
from lowbit.methods.ptq4vit import PTQ4ViT, _ActSearch, _WeightSearch
from lowbit.methods.rtn import RTN


@register
@dataclass
class APQViT(PTQ4ViT):
    """APQ-ViT: block-output (bottom-eliminated) Hessian-guided scale search and a Matthew-effect-preserving
    log2 softmax quantizer."""

    name = "apq_vit"

    mpq: bool = True
    mpq_candidates: int = 32
    candidates: int = 24
    rounds: int = 2
    search_images: int = 32

    def prepare(self, model, adapter, batches) -> None:
        self._fisher = unit_output_fisher(model, adapter, batches, limit=self.search_images) if self.search else {}

    def transform(self, unit, quantizer) -> None:
        super().transform(unit, quantizer)
        if not self.mpq:
            return
        for site in unit.sites().values():
            q = site.output_q
            if q is not None and q.fmt is not None and site.role == "softmax":
                q.fmt = ActFormat(q.fmt.bits, "tensor", dynamic=False, symmetric=False, kind="log2")
        unit.changed()

    def quantize(self, unit) -> None:
        RTN.quantize(self, unit)  # round-to-nearest weights and observed ranges: the search's start
        if self.mpq:
            self._mpq(unit)
        weight = getattr(self, "_fisher", {}).get(unit.name)
        x_q, x_fp = _as_samples(unit)
        if not self.search or weight is None or not torch.is_tensor(x_fp):
            return
        k = min(self.search_images, x_fp.shape[0], weight.shape[0])
        x = x_fp[:k]  # bottom elimination: the float input, not the one the quantized blocks below give
        with torch.no_grad():
            target = torch.cat(unit.float_outputs([((x,), {})]))
        g2 = weight[:k]
        if g2.shape != target.shape:
            unit.log.append(
                {"unit": unit.name, "skipped": f"Fisher shape {tuple(g2.shape)} != output {tuple(target.shape)}"}
            )
            return
        run = _runner(unit, x)
        sites = unit.adapter.input_sites(unit.model)

        def score() -> float:
            with torch.no_grad():
                return float((g2 * (run(x) - target).pow(2)).mean())

        first = best = score()
        for name in [n for n, m in unit.qmodules().items() if m.kind == "linear"]:
            qm = unit.get(name)
            grid = qm.input_q if qm.input_q.quantizes else None
            site = unit.get(sites[name]).output_q if grid is None and name in sites else None
            act = _ActSearch.of(grid, site)
            weights = _WeightSearch(qm)

            def set_weight(f: float) -> None:
                weights.commit(f, self.name)

            w_f, a_f = 1.0, 1.0
            set_weight(w_f)
            best = score()
            for _ in range(self.rounds):
                for f in self.factors():
                    set_weight(f)
                    err = score()
                    if err < best:
                        best, w_f = err, f
                set_weight(w_f)
                if act.searchable:
                    for f in self.factors():
                        act.commit(f)
                        err = score()
                        if err < best:
                            best, a_f = err, f
                    act.commit(a_f)
            unit.log.append({"layer": name, "block_metric": best, "weight_factor": w_f, "input_factor": a_f})
        unit.log.append({"unit": unit.name, "first_block_metric": first, "last_block_metric": best})
        unit.changed()

    def factors(self) -> list[float]:
        """Factors around 1 (the round-to-nearest start): ``alpha .. beta`` in ``candidates`` steps, and 1."""
        step = (self.beta - self.alpha) / self.candidates
        return sorted({1.0, *(self.alpha + i * step for i in range(1, self.candidates + 1))})

    def _mpq(self, unit) -> None:
        """Each softmax site's log2 top level, by the probability-weighted squared error on its inputs."""
        for name, site in unit.sites().items():
            q = site.output_q
            if site.role != "softmax" or q is None or q.fmt is None or q.fmt.kind != "log2":
                continue
            seen = []
            h = q.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1)))
            try:
                unit.outputs()
            finally:
                h.remove()
            p = torch.cat(seen)
            if p.numel() > 1 << 21:
                p = p[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 21]]
            top = float(p.max())
            zero = torch.zeros(1)
            best, best_s = None, None
            for s in [1.0, *(top * (0.5 + 0.5 * i / self.mpq_candidates) for i in range(1, self.mpq_candidates + 1))]:
                s_t = torch.tensor([s])
                err = float((p * (p - fake_quantize(p[:, None], q.fmt, s_t, zero).reshape(-1)).pow(2)).sum())
                if best is None or err < best:
                    best, best_s = err, s
            q.set_static(torch.tensor([best_s]), zero)
            q.locked = True
            unit.log.append({"site": name, "mpq_top": best_s, "max_probability": top})
            unit.changed([name])
