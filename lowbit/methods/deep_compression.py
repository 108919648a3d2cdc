"""Deep Compression (Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding", ICLR 2016) -- its three stages, without the
retraining between them (lowbit quantizes after training):

1. Pruning: the ``sparsity`` fraction of each layer's weights with the smallest magnitude is set to 0.
2. Weight sharing: the surviving weights of a layer share ``2^bits - 1`` centroids found by k-means
   from the paper's *linear* initialisation (evenly spaced over ``[min, max]`` of the weights, which
   keeps centroids on the rare large weights that density-based starts lose); one more codebook
   entry is reserved and fixed at exactly 0 for the pruned weights, so the codes alone say which
   weights were pruned (no separate sparse index).
3. Huffman coding of the code indices, per layer (``formats.huffman``): the pruned weights' code is
   by far the most frequent, which is where Huffman coding gains most.

Storage: the checkpoint keeps the plain packed ``lut`` codes (``bits`` per weight) and the per-layer
fp16 codebook (``group_size=None``), which any lowbit runtime reads; the Huffman stage is a
measurement, ``compressed_bits(qw)``: the coded indices, the code-length table (one byte per
codebook entry) and everything else the checkpoint stores (the codebook). ``huffman_summary(model)``
sums it over a quantized model.

Without the paper's retraining, pruning is the costly stage: on stories260K (3 bits, per-layer
codebooks) 50% sparsity gives perplexity ~79 against ~19 unpruned and ~11 for per-channel RTN; the
k-means codebook itself beats the per-layer uniform grid it replaces by far (RTN per tensor: ~690).
``linear_vs_kmeans`` compares a uniform grid against k-means
codebooks on a weight (the EfficientML course's comparison; ``benchmarks/deep_compression.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import codebook, huffman, integer
from lowbit.formats.integer import num_groups, to_groups
from lowbit.methods.base import MethodConfig, register
from lowbit.quantized_weight import QuantizedWeight, check_finite


def prune_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``True`` at the ``round(sparsity * numel)`` weights of smallest magnitude (magnitude pruning)."""
    n = round(sparsity * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if n:
        mask[torch.topk(w.abs().reshape(-1), n, largest=False).indices] = True
    return mask.reshape(w.shape)


def kmeans_linear_init(x: torch.Tensor, valid: torch.Tensor, k: int, iters: int = 100) -> torch.Tensor:
    """``[rows, k]`` ascending centroids of each row of ``x: [rows, n]`` over its entries where ``valid``:
    Lloyd's k-means from ``k`` centroids evenly spaced over the row's ``[min, max]``."""
    m = valid.float()
    lo = torch.where(valid, x, float("inf")).amin(-1, keepdim=True)
    hi = torch.where(valid, x, float("-inf")).amax(-1, keepdim=True)
    empty = ~valid.any(-1, keepdim=True)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    c = lo + (hi - lo) * torch.linspace(0, 1, k, device=x.device)
    code = None
    for _ in range(iters):
        new_code = codebook.assign(x, c)
        if code is not None and torch.equal(new_code, code):
            break  # no weight changed cluster: the centroids are the fixed point
        code = new_code
        num = torch.zeros_like(c).scatter_add_(-1, code, x * m)
        den = torch.zeros_like(c).scatter_add_(-1, code, m)
        c = torch.where(den > 0, num / den.clamp(min=1), c).sort(-1).values  # an empty cluster stays put
    return c


def shared_codes(x: torch.Tensor, valid: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Codes of ``x: [rows, n]`` against ``book: [rows, k]`` (ascending, holding 0): the nearest entry other
    than the reserved 0 where ``valid`` (a surviving weight), the 0 entry elsewhere (a pruned one)."""
    zero_at = (book == 0).float().argmax(-1, keepdim=True)  # [rows, 1]
    keep = torch.arange(book.shape[1], device=book.device)[None] != zero_at
    rest = book[keep].reshape(book.shape[0], -1)  # the k - 1 shared values
    idx = codebook.assign(x, rest)
    idx = idx + (idx >= zero_at).long()  # back to the full codebook's index
    return torch.where(valid, idx, zero_at.expand_as(idx))


def compressed_bits(qw: QuantizedWeight) -> int:
    """Bits of ``qw`` after Deep Compression's Huffman stage: its codes Huffman-coded over the whole layer,
    one byte per codebook entry for the code lengths, and everything else ``qw`` stores beside its packed
    codes (codebook or scales, zero points, outliers)."""
    counts = torch.bincount(qw.codes().reshape(-1).long(), minlength=1 << qw.fmt.bits).tolist()
    return huffman.coded_bits(counts) + 8 * len(counts) + qw.storage_bits() - qw.packed.numel() * 8


def huffman_summary(model) -> dict:
    """``{"layers": {name: bits per weight after Huffman coding}, "bits_per_weight": the weighted mean,
    "stored_bits_per_weight": the checkpoint's own}`` over a quantized model's packed layers."""
    layers, total, stored, numel = {}, 0, 0, 0
    for name, m in model.named_modules():
        qw = getattr(m, "quantized_weight", None)  # the packed modules' property
        if isinstance(qw, QuantizedWeight):
            bits = compressed_bits(qw)
            layers[name] = bits / qw.numel
            total, stored, numel = total + bits, stored + qw.storage_bits(), numel + qw.numel
    if not numel:
        raise ValueError("the model holds no quantized layer; quantize it first")
    return {"layers": layers, "bits_per_weight": total / numel, "stored_bits_per_weight": stored / numel}


def linear_vs_kmeans(w: torch.Tensor, bits: int, group_size: int | None = None) -> dict[str, float]:
    """Mean squared reconstruction error of ``w: [rows, K]`` on a uniform (linear, min-max) grid against a
    k-means codebook (linear initialisation) of the same ``2^bits`` levels, per tensor or per row."""
    w = w.detach().float().reshape(w.shape[0], -1)
    scale, zero = integer.minmax_params(w, bits, group_size, False)
    linear = integer.fake_quantize(w, scale, zero, bits, group_size)
    x = w.reshape(1, -1) if group_size is None else w
    c = kmeans_linear_init(x, torch.ones_like(x, dtype=torch.bool), 1 << bits)
    kmeans = c.gather(-1, codebook.assign(x, c)).reshape(w.shape)
    return {"linear": float(((linear - w) ** 2).mean()), "kmeans": float(((kmeans - w) ** 2).mean())}


@register
@dataclass
class DeepCompression(MethodConfig):
    """Deep Compression: magnitude pruning to ``sparsity``, ``2^bits - 1`` shared weights per layer by
    k-means from a linear start (``kmeans_iters`` Lloyd iterations) plus an entry fixed at 0 for the pruned
    weights (``format="lut"``); ``compressed_bits`` measures its Huffman-coded size."""

    name = "deep_compression"

    format: str = "lut"
    group_size: int | None = None
    sparsity: float = 0.5
    kmeans_iters: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.format != "lut":
            raise ValueError(f"deep_compression shares weights through a codebook (format lut), not {self.format!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity ({self.sparsity}) must lie in [0, 1)")

    def quantize_weight(self, w: torch.Tensor) -> QuantizedWeight:
        check_finite(w)
        fmt = self.weight_format
        w = w.float()
        rows, n = w.shape
        keep = ~prune_mask(w, self.sparsity)  # per layer, as the paper prunes
        if fmt.group_size is None:
            x, valid = w.reshape(1, -1), keep.reshape(1, -1)
        else:
            x = to_groups(w, fmt.group_size).reshape(rows * num_groups(n, fmt.group_size), -1)
            valid = to_groups(keep.float(), fmt.group_size).reshape(x.shape) > 0
        shared = kmeans_linear_init(x, valid, codebook.levels(fmt.bits) - 1, self.kmeans_iters)
        book = torch.cat([shared.to(torch.float16), torch.zeros(shared.shape[0], 1, dtype=torch.float16)], -1)
        book = book.sort(-1).values
        codes = shared_codes(x, valid, book.float())  # [rows * ngroups, g] or [1, rows * K]
        codes = codes.reshape(rows, -1)[:, :n]
        return QuantizedWeight.from_codes(codes.to(torch.uint8), book.reshape(1 if fmt.group_size is None else rows, -1),
                                          None, fmt)  # fmt: skip
