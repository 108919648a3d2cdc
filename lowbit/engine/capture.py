"""Running a model on calibration data: the inputs a module receives, and replaying a
block's unchanged children instead of recomputing them."""

from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what was wanted has been seen."""


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


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


def _accepts_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


Inputs = list[tuple[tuple, dict]]  # per calibration batch: positional and keyword args


def capture_inputs(model: nn.Module, module: nn.Module, batches: list, device, require_all: bool = True) -> Inputs:
    """Run ``model`` on each batch until ``module`` and keep what it receives (``require_all=False``:
    whatever batches reach it, possibly none: a layer the model never calls on this data)."""
    captured: Inputs = []

    def hook(_module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((to_device(args, device), to_device(kwargs, device)))
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except StopForward:
                pass
    finally:
        handle.remove()
    if require_all and len(captured) != len(batches):
        raise RuntimeError(f"{type(module).__name__} was not reached by {len(batches) - len(captured)} calibration batches")
    return captured


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class ChildReplay:
    """Reuses the outputs of a block's direct children from one calibration pass to the next
    while neither the child nor anything that runs before it has changed.

    True-sequential quantization runs a block once per group of layers; without
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
        """Modules ``names`` (relative to the block; ``None``: anything) were modified."""
        if names is None or not self.order:
            self.cache.clear()
            return
        heads = [n.split(".")[0] for n in names]
        if any(h not in self.order for h in heads):
            self.cache.clear()  # something outside the replayed children: nothing downstream is safe
            return
        first = min(self.order.index(h) for h in heads)
        for name in self.order[first:]:
            self.cache.pop(name, None)

    def run(self, block: nn.Module, inputs: Inputs, on_batch_output=None) -> None:
        """One pass over all batches; ``StopForward`` from a hook ends a batch early."""
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
                for index, (args, kwargs) in enumerate(inputs):
                    state["batch"] = index
                    calls.clear()
                    try:
                        out = first_output(block(*args, **kwargs))
                        if on_batch_output is not None:
                            on_batch_output(out)
                    except StopForward:
                        pass
                    if index == 0 and not self.order and len(calls) == len(set(calls)) == len(self.children):
                        self.order = list(calls)
        finally:
            for h in handles:
                h.remove()
            for name in self.children:
                self.children[name].__dict__.pop("forward", None)
        self._keep(fresh, len(inputs))

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
