"""PyTorch's built-in packed CPU kernels for weight-only linears.

- 4-bit grouped: ``aten._weight_int4pack_mm_for_cpu`` (the tinygemm layout). It
  computes ``w = (q - 8) * s + b`` per group, so lowbit's ``(q - z) * s`` maps to
  ``b = (8 - z) * s``. It needs ``N % 16 == 0``, a group of 32, 64, 128 or 256
  that divides ``K``, and runs fast only on bf16 activations: inputs are cast to
  bf16 and the output back.
- 8-bit per-channel: ``aten._weight_int8pack_mm`` multiplies by signed int8
  weights and a per-row scale, fast on bf16 activations (fp32 runs an order of
  magnitude slower), so inputs are cast to bf16 here too; lowbit's unsigned codes with zero point ``z`` are
  ``(q - 128) * s + (128 - z) * s``, the second term a rank-one correction
  ``sum(x) * c`` that vanishes for symmetric weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quantized_weight import QuantizedWeight

INT4_GROUPS = (256, 128, 64, 32)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def int4_group(qw: QuantizedWeight) -> int | None:
    """The kernel group size that expresses ``qw`` exactly, or ``None``."""
    fmt = qw.fmt
    n, k = qw.shape
    if fmt.kind != "int" or fmt.bits != 4 or n % 16 or k % 32:
        return None
    if not (_has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")):
        return None
    ngroups = qw.scale.shape[1]
    if ngroups == 1:  # per-channel or per-tensor: repeat the scale over kernel groups
        return next(g for g in INT4_GROUPS if k % g == 0)
    g = fmt.group_size
    return g if g in INT4_GROUPS and k % g == 0 else None


def int8_supported(qw: QuantizedWeight) -> bool:
    # The kernel reads K in blocks of 16: other K give garbage or crash (torch 2.13).
    return (
        qw.shape[1] % 16 == 0
        and qw.fmt.kind == "int"
        and qw.fmt.bits == 8
        and qw.scale.shape[1] == 1
        and _has_op("_weight_int8pack_mm")
    )


@dataclass
class Int4Packed:
    weight: torch.Tensor  # uint8 [N, K/2], the kernel's layout
    scales_and_zeros: torch.Tensor  # bf16 [K/g, N, 2]
    group: int


def pack_int4(qw: QuantizedWeight, device: torch.device) -> Int4Packed:
    group = int4_group(qw)
    if group is None:
        raise ValueError(f"{qw.fmt.describe()} with shape {qw.shape} has no int4 kernel layout")
    n, k = qw.shape
    reps = k // group if qw.scale.shape[1] == 1 else 1
    scale = qw.scale.float().repeat_interleave(reps, dim=1)
    zero = qw.zero_or_default().float().repeat_interleave(reps, dim=1)
    offset = (8 - zero) * scale
    sz = torch.stack([scale.t(), offset.t()], dim=-1).contiguous().to(torch.bfloat16)
    codes = qw.codes().to(torch.int32).to(device)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return Int4Packed(weight, sz.to(device), group)


def int4_mm(x: torch.Tensor, p: Int4Packed) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, p.weight, p.group, p.scales_and_zeros)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


@dataclass
class Int8Packed:
    weight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # bf16 [N]
    correction: torch.Tensor | None  # fp32 [N]: (128 - z) * s, None when symmetric


def pack_int8(qw: QuantizedWeight, device: torch.device) -> Int8Packed:
    weight = (qw.codes().to(torch.int16) - 128).to(torch.int8)
    scale = qw.scale.float().reshape(-1)
    correction = None
    if qw.zero is not None:
        correction = (128 - qw.zero.float().reshape(-1)) * scale
        if not bool(correction.any()):
            correction = None
    return Int8Packed(
        weight.to(device),
        scale.to(device, torch.bfloat16),
        None if correction is None else correction.to(device),
    )


def int8_mm(x: torch.Tensor, p: Int8Packed) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), p.weight, p.scale).float()
    if p.correction is not None:
        y += flat.float().sum(-1, keepdim=True) * p.correction
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
