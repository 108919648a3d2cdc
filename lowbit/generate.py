"""Greedy decoding with a lean loop, and where a decode step spends its time.

``transformers``' ``generate()`` runs logits processors, stopping criteria and
cache bookkeeping around every step; for a small model on a CPU that overhead
is a large part of a token. ``greedy_decode`` calls the model itself once per
token with its key/value cache and takes the arg-max, which is all greedy
decoding needs (the tokens equal ``generate(do_sample=False)``'s).

``step_profile`` splits a decode step's time into lowbit's weight-only kernels
and everything else (attention, norms, the embedding and head, Python and
framework overhead per module).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

import lowbit.fused_decode as fused_decode


def _cache_name(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its key/value cache by (``cache`` in transformers 5.x,
    ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _step(model: nn.Module, ids: torch.Tensor, past, name: str):
    out = model(input_ids=ids, use_cache=True, **({name: past} if past is not None else {}))
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [batch, prompt + new] token ids
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    step_s: list[float] = field(default_factory=list)
    path: str = "transformers"  # "fused": lowbit's fused decoder step ran the model

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens after the first, per second (prefill excluded)."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def _stepper(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, fused: bool | None):
    """``(step(ids) -> next token ids, path name)``: the fused decoder step where it runs the model
    (``fused=None``: wherever it can; ``True``: or an error saying why not), else transformers'."""
    reason = fused_decode.unsupported_reason(model)
    if fused and reason is not None:
        raise ValueError(f"fused decoding cannot run this model: {reason}")
    if fused is not False and reason is None:
        state = fused_decode.FusedLlama(model, input_ids.shape[1] + max_new_tokens, batch=input_ids.shape[0])
        return state.next_token, "fused"
    name = _cache_name(model)
    past = None

    def step(ids):
        nonlocal past
        past, nxt = _step(model, ids, past, name)
        return nxt

    return step, "transformers"


@torch.no_grad()
def greedy_decode(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, fused: bool | None = None
) -> DecodeResult:
    """Greedy tokens after ``input_ids: [batch, T]``; stops early when every row produced ``eos``.

    Llama-family models run lowbit's fused decoder step (``fused_decode.FusedLlama``) unless
    ``fused=False``; others, and ``fused=False``, run transformers' forward with its cache.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be [batch, tokens] with at least one token")
    step, path = _stepper(model, input_ids, max_new_tokens, fused)
    t0 = time.perf_counter()
    nxt = step(input_ids)
    prefill = time.perf_counter() - t0
    ids = [input_ids, nxt]
    steps = []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id).reshape(-1)
    t1 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if eos is not None:
            done |= torch.isin(nxt.reshape(-1), eos)
            if bool(done.all()):
                break
        s = time.perf_counter()
        nxt = step(nxt)
        steps.append(time.perf_counter() - s)
        ids.append(nxt)
    decode = time.perf_counter() - t1
    tokens = torch.cat(ids, dim=1)
    return DecodeResult(tokens, input_ids.shape[1], tokens.shape[1] - input_ids.shape[1], prefill, decode, steps, path)


def generate(
    model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, fused: bool | None = None
) -> tuple[str, DecodeResult]:
    """``(prompt + continuation as text, timings)`` by greedy decoding (``fused``: see ``greedy_decode``)."""
    enc = tokenizer(prompt, return_tensors="pt")
    if enc.input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization; pass some text with --prompt")
    result = greedy_decode(model, enc.input_ids, max_new_tokens, getattr(tokenizer, "eos_token_id", None), fused)
    return tokenizer.decode(result.tokens[0], skip_special_tokens=True), result


@contextmanager
def _kernel_timer(totals: dict):
    """Accumulate the seconds spent inside lowbit's weight-only kernels (``totals['kernel']``):
    ``Packed._forward`` (QLinear) and ``Packed.gemv`` (the fused step), the outermost call only."""
    from lowbit.kernels import wq

    originals = {name: getattr(wq.Packed, name) for name in ("_forward", "gemv")}
    depth = [0]

    def timed(original):
        def call(self, *args):
            depth[0] += 1
            s = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    totals["kernel"] += time.perf_counter() - s
                    totals["calls"] += 1

        return call

    for name, original in originals.items():
        setattr(wq.Packed, name, timed(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(wq.Packed, name, original)


@torch.no_grad()
def step_profile(model: nn.Module, input_ids: torch.Tensor, steps: int = 16, fused: bool | None = None) -> dict:
    """Per decode step (after the prefill): total milliseconds, milliseconds inside lowbit's
    kernels (their Python call included), the rest, and kernel calls per step; ``path`` says
    which decoder step ran (``fused``: see ``greedy_decode``)."""
    totals = {"kernel": 0.0, "calls": 0}
    step_fn, path = _stepper(model, input_ids, steps + 2, fused)
    nxt = step_fn(input_ids)
    elapsed = 0.0
    with _kernel_timer(totals):
        for i in range(steps + 1):
            if i == 1:  # the first step warms up; count from the second
                totals["kernel"], totals["calls"], elapsed = 0.0, 0, 0.0
            s = time.perf_counter()
            nxt = step_fn(nxt)
            elapsed += time.perf_counter() - s
    step = elapsed / steps
    kernel = totals["kernel"] / steps
    return {
        "step_ms": step * 1e3,
        "kernel_ms": kernel * 1e3,
        "other_ms": (step - kernel) * 1e3,
        "kernel_share": kernel / step if step else float("nan"),
        "kernel_calls_per_step": totals["calls"] / steps,
        "modules": sum(1 for _ in model.modules()),
        "path": path,
    }
