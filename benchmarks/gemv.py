"""QLinear (4-bit g128, 8-bit per-channel) against fp32 and bf16 nn.Linear.

Every configuration of one shape and batch is timed in the same rounds,
interleaved, and reported as a speed ratio against fp32 ``nn.Linear`` together
with the effective weight bandwidth (bytes of weights as stored / time).

Two cache regimes, because this machine's 32 MiB L3 holds a 4-bit 4096x4096
weight (8.4 MB) but not the fp32 one (64 MB):

- ``warm``: each round times a burst of back-to-back calls of one layer, so a
  small quantized weight stays in cache (how a loop over one layer measures);
- ``cold``: the caches are flushed before every timed call, as in a real model
  whose weights together far exceed the cache (the regime decoding lives in).

    python benchmarks/gemv.py [--repeats 30] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from lowbit.formats import WeightFormat
from lowbit.nn import QLinear
from lowbit.timing import cache_flusher, interleaved_times

SHAPES = [(4096, 4096), (4096, 11008)]  # (in, out)
BATCHES = [1, 8, 32]


def run(repeats: int, regimes: tuple[str, ...] = ("warm", "cold")) -> list[dict]:
    torch.manual_seed(0)
    flush = cache_flusher()
    rows = []
    for k, n in SHAPES:
        fp32 = torch.nn.Linear(k, n)
        bf16 = torch.nn.Linear(k, n).to(torch.bfloat16)
        q4 = QLinear.from_linear(fp32, WeightFormat("int", 4, 128))
        q8 = QLinear.from_linear(fp32, WeightFormat("int", 8, -1))
        weight_bytes = {
            "fp32 nn.Linear": k * n * 4,
            "bf16 nn.Linear": k * n * 2,
            "QLinear int4 g128": q4.quantized_weight.storage_bits() // 8,
            "QLinear int8 per-channel": q8.quantized_weight.storage_bits() // 8,
        }
        cpu = torch.device("cpu")
        kernels = {
            "QLinear int4 g128": q4.select_kernel(cpu),
            "QLinear int8 per-channel": q8.select_kernel(cpu),
        }
        for m in BATCHES:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)
            fns = {
                "fp32 nn.Linear": lambda: fp32(x),
                "bf16 nn.Linear": lambda: bf16(xb),
                "QLinear int4 g128": lambda: q4(x),
                "QLinear int8 per-channel": lambda: q8(x),
            }
            for regime in regimes:
                with torch.no_grad():
                    if regime == "warm":
                        times = interleaved_times(fns, repeats=repeats, burst=5)
                    else:
                        times = interleaved_times(fns, repeats=repeats, before_each=flush)
                rows += _rows(times, k, n, m, regime, weight_bytes, kernels)
    return rows


def _rows(times, k, n, m, regime, weight_bytes, kernels) -> list[dict]:
    base = times["fp32 nn.Linear"]
    return [
        {
            "shape": f"{k}x{n}",
            "batch": m,
            "cache": regime,
            "impl": name,
            "ms": t * 1e3,
            "speedup_vs_fp32": base / t,
            "weight_GBps": weight_bytes[name] / t / 1e9,
            "kernel": kernels.get(name, "aten"),
        }
        for name, t in times.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.repeats)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(f"{'shape':<11}{'batch':>6} {'cache':<6} {'impl':<26}{'kernel':<10}{'ms':>9}{'vs fp32':>9}{'GB/s':>8}")
    for r in rows:
        print(
            f"{r['shape']:<11}{r['batch']:>6} {r['cache']:<6} {r['impl']:<26}{r['kernel']:<10}{r['ms']:>9.3f}"
            f"{r['speedup_vs_fp32']:>8.2f}x{r['weight_GBps']:>8.1f}"
        )


if __name__ == "__main__":
    main()
