"""CPT-V (Nasser et al., "CPT-V: A Contrastive Approach to Post-Training Quantization of Vision
Transformers", 2022): a quantized model's scaling factors refined block by block by an
evolutionary search that minimises a contrastive loss between quantized and float outputs.

- Start: round-to-nearest weights and observed activation ranges (any PTQ model).
- For each block (unit), every scaling factor it owns gets a multiplier: each linear's
  weight grid (one factor scaling its channels' ranges) and every static per-tensor
  activation grid it owns (linear inputs, softmax, MLP activation, residual sums).
- **Contrastive loss** on a batch of calibration images: each image's quantized block
  output should be closer (cosine) to its own float output than to the other images'
  float outputs, ``InfoNCE = -log softmax_i(cos(q_i, f_j) / tau)[i]`` (the positive pair on
  the diagonal, the batch as negatives).
- **Evolutionary search**: a (1+1) strategy: all multipliers mutated together by
  log-normal noise (``sigma``), the mutant kept when it lowers the loss, ``iterations``
  times per block.

Choices the paper leaves open (or which this implementation could not read in full),
made here: the loss is taken at each block's output on the float model's block input
(the paper's loss is global), the (1+1) strategy and its ``sigma``/``iterations``, and
``tau = 0.1``; blocks whose inputs are not one tensor (a language model's) are refused.
The mutation size matters: on the CIFAR ViT at W6A6 (1,000 test images, 256 calibration
images, round-to-nearest 72.70) ``sigma = 0.05`` gave 70.00 (mutations of every factor at
once that happen to fit the 32 search images), ``sigma = 0.02`` 73.00; ``tau = 1`` 72.00.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.methods.base import register, static_act_format
from lowbit.methods.brecq import _as_samples, _runner
from lowbit.methods.ptq4vit import _ActSearch, _WeightSearch
from lowbit.methods.rtn import RTN


def info_nce(q: torch.Tensor, f: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean InfoNCE of rows ``q`` [n, d] against their positives ``f`` [n, d], the other rows as negatives."""
    logits = F.normalize(q, dim=1) @ F.normalize(f, dim=1).t() / tau
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


@register
@dataclass
class CPTV(RTN):
    """CPT-V: block-wise evolutionary search of scaling factors against a contrastive loss."""

    name = "cpt_v"
    needs_calibration = True
    needs_float_inputs = True

    iterations: int = 60
    sigma: float = 0.02
    tau: float = 0.1
    search_images: int = 32
    seed: int = 0

    def refuses(self, family: str) -> str | None:
        if family in ("llm", "encoder"):
            return (
                "its block search compares whole images' block outputs; language-model blocks take more than one tensor"
            )
        return None

    def transform(self, unit, quantizer) -> None:
        static_act_format(quantizer, self.name, "searches static activation scales")

    def quantize(self, unit) -> None:
        super().quantize(unit)
        _, x_fp = _as_samples(unit)
        if not torch.is_tensor(x_fp) or x_fp.shape[0] < 2:
            unit.log.append({"unit": unit.name, "skipped": "needs a lone-tensor float input of at least 2 samples"})
            return
        x = x_fp[: self.search_images]
        with torch.no_grad():
            target = torch.cat(unit.float_outputs([((x,), {})])).reshape(len(x), -1)
        run = _runner(unit, x)
        knobs = self._knobs(unit)
        if not knobs:
            return
        g = torch.Generator().manual_seed(self.seed)

        def apply(factors: torch.Tensor) -> float:
            for (set_factor, _), f in zip(knobs, factors.tolist()):
                set_factor(f)
            with torch.no_grad():
                return float(info_nce(run(x).reshape(len(x), -1), target, self.tau))

        best_f = torch.ones(len(knobs))
        first = best = apply(best_f)
        for _ in range(self.iterations):
            cand = best_f * torch.exp(self.sigma * torch.randn(len(knobs), generator=g))
            loss = apply(cand)
            if loss < best:
                best, best_f = loss, cand
        apply(best_f)
        unit.log.append({"unit": unit.name, "first_contrastive": first, "last_contrastive": best,
                         "factors": [round(float(f), 4) for f in best_f]})  # fmt: skip
        unit.changed()

    def _knobs(self, unit) -> list:
        """(set_factor, name) for each scaling factor the unit owns: weight grids, then activation grids."""
        knobs = []
        for name, qm in unit.qmodules().items():
            fmt = qm.weight_q.fmt
            if fmt is None or fmt.kind != "int":
                continue
            weights = _WeightSearch(qm)
            knobs.append((lambda f, weights=weights: weights.commit(f, self.name), name + ".weight"))
        grids = [(n + ".input", m.input_q) for n, m in unit.qmodules().items()]
        grids += [(f"{n}.{i}", q) for n, s in unit.sites().items() for i, q in enumerate(s.quantizers())]
        for name, q in grids:
            if q.per_tensor_grid and q.scale is not None:
                act = _ActSearch(q, "uniform")
                knobs.append((act.commit, name))
        return knobs
