"""Linear (uniform min-max) quantization against k-means codebooks (Deep Compression's weight sharing,
linear initialisation) on real weights: the comparison of the EfficientML course's first lab.

For each model's block linears, at 2, 3 and 4 bits, the mean squared reconstruction error of the
weights on a ``2^bits``-level uniform grid and on a ``2^bits``-entry k-means codebook, one grid or
codebook per layer (Deep Compression's granularity) and one per output channel. Beside the codes,
per layer, both store a negligible few values; per channel, the grid stores an fp16 scale and a
``bits``-bit zero per row and the codebook ``2^bits`` fp16 entries per row: ``codebook bpw`` is the
codebook's extra bits per weight over the grid's.
Then Deep Compression itself (50% pruned, 4 and 3 bits): stored and Huffman-coded bits per weight.

    python benchmarks/deep_compression.py [--model stories,minilm]
"""

from __future__ import annotations

import argparse
import copy

import torch

import lowbit
from lowbit.methods.deep_compression import huffman_summary, linear_vs_kmeans


def block_linears(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, m.weight.detach().float()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".layers." in n or ".layer." in n)]  # fmt: skip


def load(name: str):
    from lowbit.models import load_pretrained

    if name == "stories":
        from lowbit.assets import asset

        return load_pretrained(str(asset("stories260K")))[0]
    return load_pretrained("minilm")[0]


def compare(weights: list[tuple[str, torch.Tensor]], bits: int, group_size: int | None) -> tuple[float, float]:
    lin = km = numel = 0.0
    for _, w in weights:
        r = linear_vs_kmeans(w, bits, group_size)
        lin, km, numel = lin + r["linear"] * w.numel(), km + r["kmeans"] * w.numel(), numel + w.numel()
    return lin / numel, km / numel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories,minilm", help="stories, minilm (comma-separated)")
    args = ap.parse_args()
    for name in args.model.split(","):
        model = load(name)
        weights = block_linears(model)
        rows = sum(w.shape[0] for _, w in weights)
        numel = sum(w.numel() for _, w in weights)
        print(f"\n{name}: {len(weights)} block linears, {numel} weights")
        print(f"{'bits':>4} {'granularity':>12} {'linear MSE':>12} {'k-means MSE':>12} {'k-means/linear':>15} "
              f"{'codebook bpw':>13}")  # fmt: skip
        for bits in (2, 3, 4):
            for gran, group in (("per layer", None), ("per channel", -1)):
                lin, km = compare(weights, bits, group)
                extra = 0.0 if group is None else rows * ((1 << bits) * 16 - 16 - bits) / numel
                print(f"{bits:>4} {gran:>12} {lin:>12.3e} {km:>12.3e} {km / lin:>15.3f} {extra:>+13.3f}")
        for bits in (4, 3):
            q = lowbit.quantize(copy.deepcopy(model), "deep_compression", bits=bits, sparsity=0.5, progress=False)
            s = huffman_summary(q)
            print(
                f"deep_compression w{bits} 50% pruned: stored {s['stored_bits_per_weight']:.3f} bpw, "
                f"Huffman-coded {s['bits_per_weight']:.3f} bpw"
            )


if __name__ == "__main__":
    main()
