"""Parameter-free op modules, so that hooks and quantizers can attach to points that hold no weight.

A functional ``torch.matmul(q, k)`` or ``x + y`` is invisible to ``named_modules``;
wrapped in a module it gets a name, forward hooks, and a place where the
quantization engine can put an activation quantizer on each input or output.
"""

from __future__ import annotations

import torch
from torch import nn


class MatMul(nn.Module):
    """``torch.matmul(a, b)``: the activation-by-activation products of attention (``q @ kᵀ``, ``attn @ v``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a: [..., m, k], b: [..., k, n]
        return torch.matmul(a, b)


class Add(nn.Module):
    """``a + b``: a residual add, where two differently scaled streams meet."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b
