"""Greedy decode tokens/s of finished lowbit checkpoints against their fp32 base model: each
format on the kernel ``QLinear(kernel="auto")`` picks (the integer kernels, the table kernel
for lut / bcq / nf4 / grids, the vq kernel, plus the outlier, low-rank and residual adds).

Each checkpoint (a directory ``lowbit quantize`` wrote, e.g. the ones ``benchmarks/reload_check.py
--workdir DIR`` keeps) is loaded with ``lowbit.load`` and decodes ``--tokens`` new tokens after a
16-token prompt with ``lowbit.generate.greedy_decode`` (lowbit's fused decoder step where the
architecture has one); fp32 runs the same way; rounds interleave every variant; medians and
ratios to fp32 are measured in the same run, at each thread count.

    python benchmarks/decode_formats.py DIR [DIR ...] --base MODEL [--threads 1,2] [--tokens 32] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import lowbit
from lowbit.generate import greedy_decode
from lowbit.models import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--base", required=True, help="the fp32 model the checkpoints were quantized from")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    models = {d.name: lowbit.load(d) for d in args.dirs}
    fp32, _ = load_pretrained(args.base)
    variants = {"fp32": fp32, **models}
    ids = (torch.arange(16)[None] * 7 + 3) % fp32.config.vocab_size
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        times = {name: [] for name in variants}
        with torch.no_grad():
            for m in variants.values():
                greedy_decode(m, ids, 4)  # warm-up: packed layouts built, kernels loaded
            for _ in range(args.rounds):
                for name, m in variants.items():
                    times[name].append(greedy_decode(m, ids, args.tokens).tokens_per_s)
        ref = statistics.median(times["fp32"])
        for name, t in times.items():
            q = variants[name]
            bpw = getattr(getattr(q, "lowbit_coverage", None), "mean_bits_per_weight", lambda: None)()
            row = {"checkpoint": name, "threads": threads, "tok_s": statistics.median(t),
                   "x_fp32": statistics.median(t) / ref, "bits_per_weight": bpw}  # fmt: skip
            rows.append(row)
            print(f"{threads} thread(s)  {name:<28} {row['tok_s']:7.1f} tok/s  {row['x_fp32']:.2f}x fp32", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
