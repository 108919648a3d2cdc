"""Sparse outliers: weights kept in fp16 beside a quantized dense part (OWQ's weak columns,
SpQR's and SqueezeLLM's outliers), in compressed sparse row form over the matrix view.

The outliers are *added* to the dequantized dense part, so a method that keeps a weight
sets its dense code to the zero point (it dequantizes to 0) and stores the weight here;
a kernel computes ``dense(x) + x @ S^T``. Storage, counted exactly: ``val`` fp16, ``col``
int16 (int32 for rows wider than 32767), ``crow`` int32 ``[rows + 1]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class Outliers:
    crow: torch.Tensor  # int32 [rows + 1]
    col: torch.Tensor  # int16 / int32 [nnz], column in the matrix view
    val: torch.Tensor  # fp16 [nnz]

    @classmethod
    def from_dense(cls, values: torch.Tensor, mask: torch.Tensor) -> Outliers:
        """The entries of ``values: [rows, K]`` where ``mask`` is set (values rounded to fp16)."""
        if values.shape != mask.shape or values.dim() != 2:
            raise ValueError(f"outlier values {tuple(values.shape)} and mask {tuple(mask.shape)} must be one 2-D shape")
        rows, k = values.shape
        idx = mask.nonzero()  # row-major order: CSR's order
        counts = torch.bincount(idx[:, 0], minlength=rows) if idx.numel() else torch.zeros(rows, dtype=torch.long)
        crow = torch.zeros(rows + 1, dtype=torch.int32)
        crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
        col_dtype = torch.int16 if k <= 32767 else torch.int32
        val = values[idx[:, 0], idx[:, 1]].to(torch.float16)
        if not bool(torch.isfinite(val).all()):
            raise ValueError("an outlier does not fit fp16 (|value| > 65504); it cannot be kept")
        return cls(crow=crow, col=idx[:, 1].to(col_dtype).contiguous(), val=val.contiguous())

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    @property
    def rows(self) -> int:
        return int(self.crow.numel()) - 1

    def row_index(self) -> torch.Tensor:
        """The row of every stored value, ``long [nnz]``."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.rows), counts)

    def to_dense(self, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype)
        out[self.row_index(), self.col.long()] = self.val.to(dtype)
        return out

    def to_sparse(self, k: int, device, dtype=torch.float32) -> torch.Tensor:
        """A torch CSR tensor ``[rows, k]`` for the sparse kernel."""
        with warnings.catch_warnings():  # PyTorch marks its CSR layout beta; its CPU matmul is what runs here
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow.long(), self.col.long(), self.val.to(dtype), (self.rows, k),
                                           device=device)  # fmt: skip

    def storage_bits(self) -> int:
        return (self.val.numel() * self.val.element_size() + self.col.numel() * self.col.element_size()
                + self.crow.numel() * self.crow.element_size()) * 8  # fmt: skip

    def check(self, shape: tuple[int, int], what: str) -> None:
        """One clear error for CSR arrays that do not describe a ``shape`` matrix (a corrupted file)."""
        rows, k = shape
        c = self.crow.long()
        ok = (
            self.crow.dim() == 1 and c.numel() == rows + 1 and int(c[0]) == 0 and bool((c[1:] >= c[:-1]).all())
            and int(c[-1]) == self.val.numel() == self.col.numel() and self.val.dtype == torch.float16
            and (self.col.numel() == 0 or (int(self.col.min()) >= 0 and int(self.col.max()) < k))
        )  # fmt: skip
        if not ok:
            raise ValueError(f"{what}: the outlier arrays (crow {list(self.crow.shape)}, col {list(self.col.shape)}, "
                             f"val {list(self.val.shape)} {self.val.dtype}) do not describe a {rows}x{k} matrix")  # fmt: skip

    @staticmethod
    def cat(parts: list[Outliers | None], shapes: list[tuple[int, int]]) -> Outliers | None:
        """The outliers of row blocks stacked (a grouped conv's groups)."""
        if all(p is None for p in parts):
            return None
        dense = torch.cat([torch.zeros(s) if p is None else p.to_dense(s) for p, s in zip(parts, shapes)])
        mask = torch.cat([torch.zeros(s, dtype=torch.bool) if p is None else p.to_dense(s) != 0
                          for p, s in zip(parts, shapes)])  # fmt: skip
        return Outliers.from_dense(dense, mask)
