"""Equivalence transforms shared by the methods that migrate difficulty between layers.

A consumer linear ``y = W x + b`` computes the same function on ``x~ = (x - z) / s``
with ``W' = W diag(s)`` and ``b' = b + W z``. The change of variables must be paid
for somewhere:

- ``fold_scales`` / ``fold_shift``: exactly, by the layer that produces ``x``
  (a LayerNorm/RMSNorm's elementwise weight and bias, or a linear's output rows),
  when that layer feeds nothing else;
- ``transform_input``: explicitly, by the consumer itself. Until the quantizer
  replaces the linear, a forward pre-hook applies ``(x - z) / s``; the quantized
  linear then applies it inside its activation quantization (``W8A8Linear``'s
  ``input_shift`` and ``input_scale``), never silently changing the model.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.engine.sequential import execution_groups
from lowbit.formats import activation as act
from lowbit.formats import integer


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"


def scale_columns(linear: nn.Module, s: torch.Tensor) -> None:
    """``W <- W diag(s)``: the consumer's input channels multiplied by ``s``."""
    with torch.no_grad():
        if _is_conv1d(linear):
            linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(1))
        else:
            linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))


def absorb_shift(linear: nn.Module, z: torch.Tensor) -> None:
    """``b <- b + W z`` (a bias is created if the linear has none)."""
    with torch.no_grad():
        w = linear.weight.t() if _is_conv1d(linear) else linear.weight  # [out, in]
        delta = (w.double() @ z.double()).to(w.dtype)
        if linear.bias is None:
            linear.bias = nn.Parameter(delta.clone())
        else:
            linear.bias.add_(delta)


def fold_scales(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' inputs by it."""
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.unsqueeze(1))
        elif _is_conv1d(producer):
            producer.weight.div_(s.unsqueeze(0))
        else:  # LayerNorm / RMSNorm: an elementwise weight (and bias)
            producer.weight.div_(s)
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s)
    for c in consumers:
        scale_columns(c, s)


def can_fold_shift(producer: nn.Module) -> bool:
    return getattr(producer, "bias", None) is not None


def fold_shift(producer: nn.Module, consumers: list[nn.Module], z: torch.Tensor) -> None:
    """Subtract ``z`` from the producer's output (through its bias) and add ``W z`` to each consumer's bias."""
    if not can_fold_shift(producer):
        raise ValueError(f"{type(producer).__name__} has no bias to absorb a shift")
    for c in consumers:
        absorb_shift(c, z)
    with torch.no_grad():
        producer.bias.sub_(z.to(producer.bias.dtype))


def transform_input(linear: nn.Module, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
    """Make ``linear`` read ``x~ = (x - shift) / scale`` with unchanged outputs, applying the
    transform itself (composed with any transform already there)."""
    if shift is not None:
        absorb_shift(linear, shift)
    if scale is not None:
        scale_columns(linear, scale)
    old_shift = getattr(linear, "lowbit_input_shift", None)
    old_inv = getattr(linear, "lowbit_input_scale", None)
    k = linear.weight.shape[0] if _is_conv1d(linear) else linear.weight.shape[1]
    inv_before = old_inv if old_inv is not None else torch.ones(k)
    # (((x - z1) * i1) - z2) * i2 = (x - (z1 + z2 / i1)) * (i1 * i2)
    new_shift = old_shift
    if shift is not None:
        add = shift.float() / inv_before
        new_shift = add if old_shift is None else old_shift + add
    new_inv = old_inv
    if scale is not None:
        new_inv = inv_before / scale.float()
    linear.lowbit_input_shift = new_shift
    linear.lowbit_input_scale = new_inv
    if not getattr(linear, "lowbit_transform_hooked", False):
        linear.register_forward_pre_hook(_apply_input_transform)
        linear.lowbit_transform_hooked = True


def _apply_input_transform(module: nn.Module, args: tuple):
    x = args[0]
    if module.lowbit_input_shift is not None:
        x = x - module.lowbit_input_shift.to(x.device, x.dtype)
    if module.lowbit_input_scale is not None:
        x = x * module.lowbit_input_scale.to(x.device, x.dtype)
    return (x, *args[1:])


def input_transform(linear: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``(shift, inverse scale)`` a linear applies to its input, if any."""
    return getattr(linear, "lowbit_input_shift", None), getattr(linear, "lowbit_input_scale", None)


def out_features(m: nn.Module) -> int | None:
    """Width of what ``m`` produces (a linear's outputs or a norm's channels), if known."""
    if hasattr(m, "out_features"):
        return m.out_features
    if _is_conv1d(m):
        return m.weight.shape[1]
    if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
        return m.weight.numel()
    return None


def set_act_groups(linear: nn.Module, perm: torch.Tensor, bounds: torch.Tensor) -> None:
    """Quantize ``linear``'s input per group of channels ``perm[bounds[g]:bounds[g+1]]`` (static scales)."""
    linear.lowbit_act_groups = (perm.long().cpu(), bounds.long().cpu())


def input_sites(block: nn.Module, inputs, linears: dict) -> list[list[str]]:
    """The groups of ``linears`` (names relative to ``block``) that read the same input tensor."""
    return execution_groups(block, inputs, list(linears))


def sample_rows(rows: torch.Tensor, count: int = 1024, seed: int = 0) -> torch.Tensor:
    """At most ``count`` of ``rows``, drawn once with ``seed`` (the search sample of a migration)."""
    gen = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(rows.shape[0], generator=gen)[:count]]


def migration_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, fmt_w, fmt_a,
                    clip: float | None = None) -> float:  # fmt: skip
    """Squared output error of consumers ``w: [N, K]`` on inputs ``x: [rows, K]`` after migrating
    ``s`` (``x / s``, ``w * s``) and quantizing both operands as they will be.

    Static per-tensor activations use the range ``[-clip, clip]`` if given, else the
    sample's own min-max; dynamic ones their run-time scales.
    """
    xs, ws = x / s, w * s
    if fmt_a.dynamic:
        xq = act.fake_quantize(xs, fmt_a)
    else:
        lo, hi = (torch.tensor(-clip), torch.tensor(clip)) if clip is not None else (xs.min(), xs.max())
        scale, zero = act.params_from_range(lo, hi, fmt_a)
        xq = act.codes(xs, scale, zero, fmt_a) * scale
    wscale, wzero = integer.minmax_params(ws, fmt_w.bits, fmt_w.group_size, fmt_w.symmetric)
    wq = integer.fake_quantize(ws, wscale, wzero, fmt_w.bits, fmt_w.group_size)
    return float((xq @ wq.t() - x @ w.t()).pow(2).sum())
