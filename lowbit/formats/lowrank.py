"""Low-rank correction terms: ``U @ V`` (``U: [out, r]``, ``V: [r, K]``, fp16) added to a quantized
weight's matrix view -- ZeroQuant-V2's LoRC (Yao et al. 2023, section 5), which approximates the
quantization error ``W - Q(W)`` by its best rank-``r`` factors. A kernel computes
``dense(x) + (x @ V^T) @ U^T``: ``r * (out + K)`` multiply-adds, a few percent of the dense
layer's at the ranks that pay off. Storage, counted exactly: ``16 * r * (out + K)`` bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    u: torch.Tensor  # fp16 [out, r]
    v: torch.Tensor  # fp16 [r, K]

    @classmethod
    def of_error(cls, error: torch.Tensor, rank: int) -> LowRank | None:
        """The best rank-``rank`` factors of ``error: [out, K]`` (truncated SVD, the singular values
        split evenly between the factors as LoRC does), in fp16; ``None`` for rank 0."""
        rank = min(int(rank), *error.shape)
        if rank <= 0:
            return None
        u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
        root = s[:rank].sqrt()
        uu, vv = (u[:, :rank] * root).to(torch.float16), (root[:, None] * vh[:rank]).to(torch.float16)
        if not (bool(torch.isfinite(uu).all()) and bool(torch.isfinite(vv).all())):
            raise ValueError("a low-rank factor does not fit fp16 (|value| > 65504)")
        return cls(uu.contiguous(), vv.contiguous())

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def to_dense(self) -> torch.Tensor:
        return self.u.float() @ self.v.float()

    def storage_bits(self) -> int:
        return (self.u.numel() * self.u.element_size() + self.v.numel() * self.v.element_size()) * 8

    def check(self, shape: tuple[int, int], what: str) -> None:
        rows, k = shape
        ok = (self.u.dim() == 2 and self.v.dim() == 2 and self.u.shape[0] == rows and self.v.shape[1] == k
              and self.u.shape[1] == self.v.shape[0] and self.u.dtype == self.v.dtype == torch.float16)  # fmt: skip
        if not ok:
            raise ValueError(f"{what}: low-rank factors {list(self.u.shape)} {self.u.dtype} and {list(self.v.shape)} "
                             f"{self.v.dtype} are not fp16 [{rows}, r] and [r, {k}]")  # fmt: skip
