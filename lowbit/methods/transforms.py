"""Equivalence transforms shared by the methods that migrate difficulty between layers.

A consumer ``y = W x + b`` (a ``QModule``; ``W: [out, in]``) computes the same
function on ``x~ = (x - z) / s`` with ``W' = W diag(s)`` and ``b' = b + W z``. The
change of variables must be paid for somewhere:

- ``fold_scales`` / ``fold_shift``: exactly, by the layer that produces ``x``
  (a LayerNorm/RMSNorm's elementwise weight and bias, or a linear's output rows),
  when that layer feeds nothing else;
- ``transform_input``: explicitly, by the consumer's input quantizer, which
  applies ``(x - z) / s`` before quantizing (and the frozen integer linear
  inside its activation quantization): the model never changes silently.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats import activation as act
from lowbit.formats import integer
from lowbit.nn.qmodule import QModule


def scale_columns(consumer: QModule, s: torch.Tensor) -> None:
    """``W <- W diag(s)``: the consumer's input channels multiplied by ``s``."""
    with torch.no_grad():
        shape = [1] * consumer.weight.dim()
        shape[1] = -1
        consumer.weight.mul_(s.to(consumer.weight.dtype).reshape(shape))


def absorb_shift(consumer: QModule, z: torch.Tensor) -> None:
    """``b <- b + W z`` (a bias is created if the consumer has none)."""
    with torch.no_grad():
        delta = (consumer.weight.double() @ z.double().to(consumer.weight.device)).to(consumer.weight.dtype)
        if consumer.bias is None:
            consumer.bias = nn.Parameter(delta.clone(), requires_grad=False)
        else:
            consumer.bias.add_(delta)


def fold_scales(producer: nn.Module, consumers: list[QModule], s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' inputs by it."""
    with torch.no_grad():
        if isinstance(producer, QModule):
            shape = [-1] + [1] * (producer.weight.dim() - 1)
            producer.weight.div_(s.reshape(shape))
        else:  # LayerNorm / RMSNorm: an elementwise weight (and bias)
            producer.weight.div_(s)
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s)
    for c in consumers:
        scale_columns(c, s)


def can_fold_shift(producer: nn.Module) -> bool:
    return getattr(producer, "bias", None) is not None


def fold_shift(producer: nn.Module, consumers: list[QModule], z: torch.Tensor) -> None:
    """Subtract ``z`` from the producer's output (through its bias) and add ``W z`` to each consumer's bias."""
    if not can_fold_shift(producer):
        raise ValueError(f"{type(producer).__name__} has no bias to absorb a shift")
    for c in consumers:
        absorb_shift(c, z)
    with torch.no_grad():
        producer.bias.sub_(z.to(producer.bias.dtype))


def transform_input(consumer: QModule, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
    """Make ``consumer`` read ``x~ = (x - shift) / scale`` with unchanged outputs: its weights
    absorb the change and its input quantizer applies it."""
    if shift is not None:
        absorb_shift(consumer, shift)
    if scale is not None:
        scale_columns(consumer, scale)
    consumer.input_q.add_transform(shift, scale)


def out_features(m: nn.Module) -> int | None:
    """Width of what ``m`` produces (a linear's outputs or a norm's channels), if known."""
    if isinstance(m, QModule):
        return m.out_features
    if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
        return m.weight.numel()
    return None


def foldable_pairs(unit) -> list[tuple[str, list[str]]]:
    """The unit's scale pairs whose consumers are all linear ``QModule``s of the producer's width."""
    out = []
    for producer, consumers in unit.scale_pairs():
        mods = [unit.get(c) for c in consumers]
        width = out_features(unit.get(producer))
        if width is not None and all(isinstance(m, QModule) and m.kind == "linear" and m.in_features == width
                                     for m in mods):  # fmt: skip
            out.append((producer, consumers))
    return out


def linear_groups(unit) -> list[list[str]]:
    """The unit's groups of linear ``QModule``s that read the same input tensor and quantize it
    themselves (where an input transform or per-group scales can live)."""
    return [g for g in unit.groups() if all(isinstance(unit.get(n), QModule) and unit.get(n).kind == "linear"
                                             and unit.get(n).input_q.quantizes for n in g)]  # fmt: skip


def migration_sites(unit) -> list[tuple[str | None, list[str]]]:
    """Where a migration goes: each foldable pair (its producer absorbs it), then every other
    group of linears reading one input (``None``: their input quantizer applies it) that
    quantize that input themselves (a linear reading a site's output, like a ViT's second MLP
    linear, has no quantizer of its own to carry the transform)."""
    pairs = foldable_pairs(unit)
    covered = {c for _, cs in pairs for c in cs}
    return pairs + [(None, g) for g in linear_groups(unit) if not covered.intersection(g)]


def sample_rows(rows: torch.Tensor, count: int = 1024, seed: int = 0) -> torch.Tensor:
    """At most ``count`` of ``rows``, drawn once with ``seed`` (the search sample of a migration)."""
    gen = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(rows.shape[0], generator=gen)[:count]]


def migration_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, fmt_w, fmt_a,
                    clip: float | None = None, mse_range: bool = False) -> float:  # fmt: skip
    """Squared output error of consumers ``w: [N, K]`` on inputs ``x: [rows, K]`` after migrating
    ``s`` (``x / s``, ``w * s``) and quantizing both operands as they will be.

    Static per-tensor activations use the range ``[-clip, clip]`` if given, else the
    sample's own min-max; ``mse_range``: that range shrunk (by 1 down to 0.3) to the smallest
    squared error of the activations, as the MSE observer will; dynamic ones their run-time scales.
    """
    xs, ws = x / s, w * s
    if fmt_a.dynamic:
        xq = act.fake_quantize(xs, fmt_a)
    else:
        lo, hi = (torch.tensor(-clip), torch.tensor(clip)) if clip is not None else (xs.min(), xs.max())
        best = None
        for c in torch.linspace(1.0, 0.3, 15).tolist() if mse_range else [1.0]:
            scale, zero = act.params_from_range(lo * c, hi * c, fmt_a)
            q = act.codes(xs, scale, zero, fmt_a) * scale
            err = float((q - xs).pow(2).sum())
            if best is None or err < best[0]:
                best = (err, q)
        xq = best[1]
    wscale, wzero = integer.minmax_params(ws, fmt_w.bits, fmt_w.group_size, fmt_w.symmetric)
    wq = integer.fake_quantize(ws, wscale, wzero, fmt_w.bits, fmt_w.group_size)
    return float((xq @ wq.t() - x @ w.t()).pow(2).sum())
