"""OWQ (Lee et al., "OWQ: Outlier-Aware Weight Quantization for Efficient Fine-Tuning and
Inference of Large Language Models", AAAI 2024).

A few input channels make most of a layer's quantization error: those whose inputs are
large (activation outliers) multiply their weights' rounding error by a large Hessian
diagonal. OWQ ranks the columns by sensitivity ``H_jj * ||W_:,j - Q(W)_:,j||^2`` (the
squared-error increase of quantizing column ``j`` alone, with ``H = 2/n X^T X``), keeps
the top ones in fp16 and quantizes the rest with GPTQ, the weak columns placed last so
that they absorb the error feedback of every quantized column.

lowbit stores the kept columns as sparse outliers beside the codes (``formats.sparse``,
CSR: 16-bit value + 16-bit column per kept weight, a 32-bit row pointer per output row)
and counts them in the bits per weight; ``extra_bits`` is the budget they may spend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.sparse import Outliers
from lowbit.methods.base import register
from lowbit.methods.gptq import GPTQ
from lowbit.quantized_weight import QuantizedWeight, check_finite


def column_sensitivity(w: torch.Tensor, H: torch.Tensor, fmt) -> torch.Tensor:
    """OWQ's ``H_jj * ||W_:,j - Q(W)_:,j||^2`` per input column, ``Q`` the format's min-max grid."""
    deq = QuantizedWeight.quantize(w, fmt).dequantize()
    return torch.diag(H).float() * (w - deq).pow(2).sum(0)


def weak_columns(in_features: int, out_features: int, extra_bits: float, columns: int | None) -> int:
    """How many columns fit ``extra_bits`` per weight: each costs ``out * 32`` bits, the row pointers
    ``(out + 1) * 32`` once."""
    if columns is not None:
        return min(columns, in_features)
    budget = extra_bits * in_features * out_features - (out_features + 1) * 32
    return max(0, min(in_features, int(budget // (out_features * 32))))


@register
@dataclass
class OWQ(GPTQ):
    """OWQ: GPTQ with the most sensitive input columns kept in fp16. ``extra_bits``: bits per weight
    the kept columns may cost (counted as stored); ``columns``: a fixed count per layer instead."""

    name = "owq"

    extra_bits: float = 0.15
    columns: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.extra_bits < 0:
            raise ValueError(f"extra_bits ({self.extra_bits}) must be at least 0")
        if self.columns is not None and self.columns < 0:
            raise ValueError(f"columns ({self.columns}) must be at least 0")

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        out, cols = w.shape
        k = weak_columns(cols, out, self.extra_bits, self.columns)
        if stats is None or stats.tokens == 0 or k == 0:
            return super().quantize_linear(w, stats)  # plain GPTQ (or RTN without observations)
        check_finite(w)
        fmt = self.weight_format
        keep = torch.zeros(cols, dtype=torch.bool)
        keep[torch.topk(column_sensitivity(w, stats.H, fmt), k).indices] = True
        codes, scale, zero, kept, scale_q = self.solve(w, stats.H, keep)
        outliers = Outliers.from_dense(kept.cpu(), keep[None].expand(out, cols) & (kept.cpu() != 0))
        return QuantizedWeight.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), fmt, outliers=outliers,
                                          scale_q=scale_q)  # fmt: skip
