"""The block-by-block calibration loop, the one place lowbit walks a model with data.

1. Run the calibration batches until the first block and keep its inputs
   (hidden states plus whatever the block needs: attention mask, position ids,
   rotary embeddings).
2. For each block, on the compute device:
   - transforms (AWQ scales, ...) observe the block and rewrite it exactly;
   - the linears are quantized group by group in execution order (true
     sequential: each group is observed with the groups before it already
     quantized);
   - the block's outputs are recomputed through the quantized block, so the
     next block calibrates on what it will really see;
   - the block goes back to the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.models.adapters import is_linear
from lowbit.observers import ChannelStats


class _StopForward(Exception):
    pass


@dataclass
class LinearStats:
    """What a quantizer may want to know of a linear's inputs ``x: [tokens, in]``.

    ``H = 2/n X^T X`` (GPTQ's Hessian of the layer's squared output error; only
    when asked for: it costs a ``K x K`` product per batch),
    ``abs_mean`` per input channel (AWQ's activation salience), ``abs_max``
    (SmoothQuant's activation range), per-channel ``lo``/``hi`` and per-batch
    ranges, and a fixed sample of whole input rows (activation observers).
    """

    H: torch.Tensor | None
    abs_mean: torch.Tensor
    abs_max: torch.Tensor
    tokens: int = 0
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    batch_lo: list = field(default_factory=list)
    batch_hi: list = field(default_factory=list)
    rows: list = field(default_factory=list)

    SAMPLE_VALUES_PER_BATCH: ClassVar[int] = 65536  # rows sampled per batch: this many values' worth

    @classmethod
    def empty(cls, in_features: int, device, hessian: bool = True) -> LinearStats:
        zeros = torch.zeros(in_features, device=device)
        H = torch.zeros(in_features, in_features, device=device) if hessian else None
        return cls(H, zeros, zeros.clone(), 0,
                   torch.full((in_features,), float("inf"), device=device),
                   torch.full((in_features,), float("-inf"), device=device))  # fmt: skip

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        total = self.tokens + n
        if self.H is not None:
            self.H.mul_(self.tokens / total).addmm_(x.t(), x, alpha=2 / total)
        self.abs_mean.mul_(self.tokens / total).add_(x.abs().sum(0) / total)
        torch.maximum(self.abs_max, x.abs().amax(0), out=self.abs_max)
        blo, bhi = x.amin(0), x.amax(0)
        torch.minimum(self.lo, blo, out=self.lo)
        torch.maximum(self.hi, bhi, out=self.hi)
        self.batch_lo.append(blo.cpu())
        self.batch_hi.append(bhi.cpu())
        gen = torch.Generator().manual_seed(len(self.rows))  # fixed per batch: same data, same sample
        take = min(n, max(1, self.SAMPLE_VALUES_PER_BATCH // x.shape[1]))
        pick = torch.randperm(n, generator=gen)[:take]
        self.rows.append(x[pick.to(x.device)].cpu())
        self.tokens = total

    def channel_stats(self) -> ChannelStats:
        """What the activation observers read (on the CPU)."""
        if not self.tokens:
            raise ValueError("this layer saw no calibration data; static activation scales need some")
        return ChannelStats(self.lo.cpu(), self.hi.cpu(), torch.stack(self.batch_lo), torch.stack(self.batch_hi),
                            torch.cat(self.rows))  # fmt: skip

    def permuted(self, perm: torch.Tensor) -> LinearStats:
        """The statistics of ``x[:, perm]``."""
        p = perm.to(self.abs_mean.device)
        H = self.H[p][:, p] if self.H is not None else None
        return LinearStats(H, self.abs_mean[p], self.abs_max[p], self.tokens, self.lo[p], self.hi[p],
                           [b[perm] for b in self.batch_lo], [b[perm] for b in self.batch_hi],
                           [r[:, perm] for r in self.rows])  # fmt: skip


@dataclass
class BlockInputs:
    """Per calibration batch: the block's positional args and keyword args."""

    batches: list[tuple[tuple, dict]] = field(default_factory=list)


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list, device) -> BlockInputs:
    """Run ``model`` on each batch until ``first_block`` and keep what it receives."""
    captured = BlockInputs()

    def hook(_module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.batches.append((_to(args, device), _to(kwargs, device)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured.batches) != len(batches):
        raise RuntimeError("the first block was not reached by the calibration forward pass")
    return captured


def call_model(model: nn.Module, batch) -> None:
    """One forward pass on a calibration batch: token ids, a tokenizer's dict, or any input."""
    with torch.no_grad():
        if isinstance(batch, dict):  # tokenizer output: input_ids, attention_mask, ...
            model(**batch)
        elif not (torch.is_tensor(batch) and batch.dtype == torch.long):
            model(batch)
        elif _accepts_use_cache(model):
            model(input_ids=batch, use_cache=False)
        else:
            model(input_ids=batch)


def collect_model_stats(
    model: nn.Module, batches: list, modules: dict[str, nn.Module], hessian: bool = False
) -> dict[str, LinearStats]:
    """Input statistics of ``modules`` over whole-model forward passes (for layers outside the blocks,
    observed after the blocks are quantized)."""
    device = next(model.parameters()).device
    stats = {name: LinearStats.empty(_in_features(m), device, hessian) for name, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, inp, name=name: stats[name].add(inp[0].detach()))
        for name, m in modules.items()
    ]
    try:
        for batch in batches:
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _accepts_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


class ChildReplay:
    """Reuses the outputs of a block's direct children from one calibration pass to the next
    while neither the child nor anything that runs before it has changed.

    True-sequential quantization runs a block once per group of linears; without
    this, the attention of a decoder block is recomputed for every MLP group.
    A child called more than once per forward is never replayed, and nothing is
    kept beyond ``budget_bytes``.
    """

    def __init__(self, block: nn.Module, budget_bytes: int = 2 << 30):
        self.children = {n: c for n, c in block.named_children() if any(True for _ in c.parameters())}
        self.order: list[str] = []
        self.cache: dict[str, list] = {}
        self.budget = budget_bytes

    def changed(self, names: list[str] | None = None) -> None:
        """Linears ``names`` (relative to the block; ``None``: anything) were modified."""
        if names is None or not self.order:
            self.cache.clear()
            return
        hit = [self.order.index(n.split(".")[0]) for n in names if n.split(".")[0] in self.order]
        first = min(hit) if hit else 0
        for name in self.order[first:]:
            self.cache.pop(name, None)

    def run(self, block: nn.Module, inputs: BlockInputs, on_batch_output=None) -> None:
        """One pass over all batches; ``_StopForward`` from a hook ends a batch early."""
        fresh: dict[str, list] = {n: [] for n in self.children if n not in self.cache}
        calls: list[str] = []
        state = {"batch": 0}
        handles = []
        for name, child in self.children.items():
            if name in self.cache:
                child.forward = lambda *a, _outs=self.cache[name], **k: _outs[state["batch"]]
            else:
                handles.append(child.register_forward_hook(lambda m, i, o, name=name: fresh[name].append(o)))
            handles.append(child.register_forward_pre_hook(lambda m, i, name=name: calls.append(name)))
        try:
            with torch.no_grad():
                for index, (args, kwargs) in enumerate(inputs.batches):
                    state["batch"] = index
                    calls.clear()
                    try:
                        out = block_output(block, args, kwargs)
                        if on_batch_output is not None:
                            on_batch_output(out)
                    except _StopForward:
                        pass
                    if index == 0 and not self.order and len(calls) == len(set(calls)) == len(self.children):
                        self.order = list(calls)
        finally:
            for h in handles:
                h.remove()
            for name in self.children:
                self.children[name].__dict__.pop("forward", None)
        self._keep(fresh, len(inputs.batches))

    def _keep(self, fresh: dict[str, list], nbatches: int) -> None:
        if not self.order:
            return
        used = sum(_nbytes(v) for v in self.cache.values())
        for name in self.order:  # a prefix of the execution order, so replays stay consistent
            if name in self.cache:
                continue
            outs = fresh.get(name, [])
            size = _nbytes(outs)
            if len(outs) != nbatches or used + size > self.budget:
                break
            self.cache[name] = outs
            used += size


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


def block_output(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: BlockInputs) -> None:
    with torch.no_grad():
        for args, kwargs in inputs.batches:
            block_output(block, args, kwargs)


def collect_stats(
    block: nn.Module,
    inputs: BlockInputs,
    modules: dict[str, nn.Module],
    replay: ChildReplay | None = None,
    hessian: bool = False,
) -> dict[str, LinearStats]:
    """Input statistics of ``modules`` (names relative to ``block``) over all batches.

    Each batch's forward pass stops as soon as every module has seen its input,
    so observing the first linears of a block never pays for its attention.
    """
    device = next(block.parameters()).device
    stats = {name: LinearStats.empty(_in_features(m), device, hessian) for name, m in modules.items()}
    seen: set[str] = set()

    def hook(_m, inp, name):
        stats[name].add(inp[0].detach())
        seen.add(name)
        if len(seen) == len(stats):
            seen.clear()
            raise _StopForward

    handles = [m.register_forward_pre_hook(lambda m, inp, name=name: hook(m, inp, name)) for name, m in modules.items()]
    try:
        (replay or ChildReplay(block)).run(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return module.in_features
    return module.weight.shape[0]  # transformers Conv1D: weight [in, out]


def execution_groups(block: nn.Module, inputs: BlockInputs, names: list[str]) -> list[list[str]]:
    """Linears of ``block`` in the order they run, grouped when they read the same input."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their identities unique
    wanted = {n: block.get_submodule(n) for n in names}
    handles = [
        m.register_forward_pre_hook(lambda _m, inp, name=name: order.append((name, inp[0])))
        for name, m in wanted.items()
    ]
    first = BlockInputs(inputs.batches[:1])
    try:
        run_block(block, first)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen = set()
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    missing = [n for n in names if n not in seen]
    if missing:
        groups.append(missing)  # never called on calibration data: quantized last, with empty stats
    return groups


def advance(block: nn.Module, inputs: BlockInputs, replay: ChildReplay | None = None) -> BlockInputs:
    """The next block's inputs: this block's outputs with the same keyword args."""
    outs: list[torch.Tensor] = []
    (replay or ChildReplay(block)).run(block, inputs, outs.append)
    return BlockInputs([((hidden, *args[1:]), kwargs) for hidden, (args, kwargs) in zip(outs, inputs.batches)])


def sequential(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    batches: list,
    device: torch.device,
    process_block: Callable[[str, nn.Module, BlockInputs, ChildReplay], None],
    progress: bool = True,
) -> None:
    """Drive ``process_block(name, block, inputs, replay)`` over ``blocks`` with calibrated inputs.

    Only the block being processed sits on ``device``; the embeddings and
    everything before the first block run where the model is.
    """
    inputs = capture_block_inputs(model, blocks[0][1], batches, device)
    for name, block in tqdm(blocks, desc="blocks", disable=not progress, unit="block"):
        home = next(block.parameters()).device
        block.to(device)
        replay = ChildReplay(block)
        process_block(name, block, inputs, replay)
        inputs = advance(block, inputs, replay)
        block.to(home)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}
