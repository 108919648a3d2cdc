"""LoRC, low-rank compensation (Yao et al., "ZeroQuant-V2: Exploring Post-training Quantization in
LLMs from Comprehensive Study to Low Rank Compensation", 2023, section 5).

After a layer is quantized (here by GPTQ, as the paper's best results were), its error
``E = W - Q(W)`` is approximated by the product of two thin matrices found by SVD,
``E ~ U_r S_r V_r^T``, stored as ``U = U_r S_r^(1/2)`` and ``V = S_r^(1/2) V_r^T`` in fp16 and added
back at run time: ``y = Q(W) x + U (V x)``. The rank ``r`` (the paper's 8) costs
``16 r (out + in) / (out * in)`` bits per weight -- 0.25 on a 1024x1024 layer, 0.06 on 4096x4096.

``activation_aware`` (lowbit's default) fits the factors to the layer's *output* error rather
than its weight error: GPTQ's ``E`` is large in directions the inputs never excite (it trades
them for a smaller output error), and a plain SVD spends its rank there. With
``H = X^T X / n = L L^T`` (Cholesky), the best rank-``r`` ``F`` minimising ``||X (E - F)^T||``
(``F`` acting on inputs) is the truncated SVD of ``E L`` with the input side multiplied back by
``L^-1``. ``activation_aware=False`` is the paper's plain SVD of ``E``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.formats.lowrank import LowRank
from lowbit.methods.base import register
from lowbit.methods.gptq import GPTQ
from lowbit.quantized_weight import QuantizedWeight


def weighted_factors(error: torch.Tensor, H: torch.Tensor, rank: int, damp: float = 0.01) -> LowRank | None:
    """Rank-``rank`` factors minimising the output error ``tr((E - UV) H (E - UV)^T)`` over ``U, V``."""
    H = H.double()
    H = H + damp * torch.diag(H).mean().clamp(min=1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    rank = min(int(rank), *error.shape)
    if rank <= 0:
        return None
    u, s, vh = torch.linalg.svd(error.double().to(H.device) @ L, full_matrices=False)
    root = s[:rank].sqrt()
    # the best rank-r G_r of G = E L, and F = G_r L^-1: V = (S^1/2 V_r^T) L^-1, solved as L^T V^T = (.)^T
    v = torch.linalg.solve_triangular(L.t(), (root[:, None] * vh[:rank]).t(), upper=True).t()
    uu, vv = (u[:, :rank] * root).to(torch.float16), v.to(torch.float16)
    if not (bool(torch.isfinite(uu).all()) and bool(torch.isfinite(vv).all())):
        raise ValueError("a low-rank factor does not fit fp16 (|value| > 65504)")
    return LowRank(uu.cpu().contiguous(), vv.cpu().contiguous())


@register
@dataclass
class LoRC(GPTQ):
    """GPTQ, then its error compensated by fp16 factors of ``rank`` (LoRC). ``activation_aware``: fit
    the factors to the output error on the calibration inputs (default) or to the weight error."""

    name = "lorc"

    rank: int = 8
    activation_aware: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank ({self.rank}) must be at least 1")

    def quantize_linear(self, w: torch.Tensor, stats) -> QuantizedWeight:
        qw = super().quantize_linear(w, stats)
        error = w.float().cpu() - qw.dequantize()
        if self.activation_aware and stats is not None and stats.tokens > 0:
            fac = weighted_factors(error, stats.H.float().cpu(), self.rank, self.damp)
        else:
            fac = LowRank.of_error(error, self.rank)
        if fac is not None:
            fac.check(qw.matrix_shape, "the low-rank term")
        return replace(qw, lowrank=fac)
