"""SqueezeLLM (Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization", ICML 2024).

Non-uniform weights: each output channel gets its own ``2^bits`` values, found by
k-means of the channel's weights, each weight counted with its sensitivity -- the
diagonal Fisher information ``E[(dL/dW)^2]`` of the loss on calibration data (the
second-order error of perturbing a weight, with the Hessian approximated by the
Fisher). Dense-and-sparse: the few weights of largest magnitude (the paper's 0.45%)
leave the k-means and are kept in fp16 beside the codes (``formats.sparse``), so they
neither stretch the codebook nor lose precision.

lowbit's Fisher: one forward and backward pass of the float model per calibration
example (the loss: cross-entropy against the model's own predictions, as BRECQ's), the
squared gradient of every quantized weight summed. A model without logits (an encoder's
hidden states) has no such loss; its weights are counted by their input's energy
``diag(H)`` instead, which the coverage says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import codebook
from lowbit.formats.sparse import Outliers
from lowbit.methods.base import MethodConfig, register
from lowbit.methods.brecq import _forward, task_loss
from lowbit.quantized_weight import QuantizedWeight, check_finite


def weight_fisher(model, names: list[str], batches, limit: int | None = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{name: sum over examples of (dL/dW)^2}`` for the linears ``names`` (their ``[out, in]`` weight),
    one example at a time (a bar per example with ``progress``); ``{}`` when the model has no logits."""
    from tqdm.auto import tqdm

    mods = {n: model.get_submodule(n) for n in names}
    params = {n: m.weight for n, m in mods.items() if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    flags = {n: p.requires_grad for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen = 0
    total = sum(b.shape[0] if torch.is_tensor(b) else 1 for b in batches)
    bar = tqdm(total=total if limit is None else min(limit, total), desc="squeezellm Fisher", unit="example",
               disable=not progress)  # fmt: skip
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            examples = batch.split(1) if torch.is_tensor(batch) else [batch]
            for ex in examples:
                if limit is not None and seen >= limit:
                    return fisher
                with torch.enable_grad():
                    loss = task_loss(_forward(model, ex))
                    if loss is None:
                        return {}
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        fisher[n] += g.detach().float().pow(2)
                seen += 1
                bar.update(1)
    finally:
        bar.close()
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return fisher


@register
@dataclass
class SqueezeLLM(MethodConfig):
    """SqueezeLLM: Fisher-weighted k-means codebooks per output channel (``format="lut"``,
    ``group_size=-1``), the largest ``outlier_fraction`` of weights kept in fp16.
    ``kmeans_iters``: Lloyd iterations; ``fisher_examples``: calibration examples the Fisher
    is summed over (all when ``None``)."""

    name = "squeezellm"
    needs_calibration = True
    uses_hessian = True

    format: str = "lut"
    group_size: int = -1
    outlier_fraction: float = 0.0045
    kmeans_iters: int = 50
    fisher_examples: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.format != "lut":
            raise ValueError(f"squeezellm fits codebooks (format lut), not {self.format!r}")
        if not 0 <= self.outlier_fraction < 0.5:
            raise ValueError(f"outlier_fraction ({self.outlier_fraction}) must lie in [0, 0.5)")

    def prepare(self, model, adapter, batches) -> None:
        kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
        names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        self._fisher = weight_fisher(
            model, names, batches or [], self.fisher_examples, getattr(self, "progress", False)
        )
        self._names: dict[int, str] = {}

    def with_format(self, fmt):
        m = super().with_format(fmt)
        if m is not self:  # the first / last layers' own format: the same Fisher
            m.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_")})
        return m

    def quantize(self, unit) -> None:
        self._names = {id(m): n for n, m in unit.qmodules().items()}  # which Fisher belongs to which module
        super().quantize(unit)

    def quantize_module(self, qm, stats) -> None:
        fisher = getattr(self, "_fisher", {}).get(self._names.get(id(qm), ""))
        if fisher is not None:
            fisher = fisher.reshape(fisher.shape[0], -1)  # a conv's matrix view, as its weight's
            if fisher.shape != qm.weight.reshape(qm.weight.shape[0], -1).shape:
                fisher = None  # (transformers' Conv1D stores the weight transposed)
            elif qm.perm is not None:
                fisher = fisher[:, qm.perm.to(fisher.device)]
        self._sensitivity = fisher
        try:
            super().quantize_module(qm, stats)
        finally:
            self._sensitivity = None
        if fisher is None and qm.weight_q.method == self.name:
            why = "no logits for a Fisher" if not getattr(self, "_fisher", {}) else "no Fisher for this layer"
            qm.weight_q.method = f"{self.name} (weighted by input energy: {why})"

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        sens = getattr(self, "_sensitivity", None)
        if sens is None or sens.shape != w.shape:
            sens = torch.diag(stats.H).float()[None].expand_as(w) if stats is not None else torch.ones_like(w)
        n_out = int(self.outlier_fraction * w.numel())
        mask = torch.zeros_like(w, dtype=torch.bool)
        if n_out:
            mask.view(-1)[torch.topk(w.abs().reshape(-1), n_out).indices] = True
        book = codebook.fit(w.masked_fill(mask, 0.0), fmt.bits, fmt.group_size,
                            sens.masked_fill(mask, 0.0), self.kmeans_iters)  # fmt: skip
        codes = codebook.quantize(w, book, fmt.bits, fmt.group_size)
        outliers = None
        if n_out:
            dense = codebook.dequantize(codes, book, fmt.bits, fmt.group_size)
            outliers = Outliers.from_dense(w - dense, mask)
        return QuantizedWeight.from_codes(codes, book, None, fmt, outliers=outliers)
