"""QLinear (4-bit g128, 8-bit per-channel) against fp32 and bf16 nn.Linear.

All implementations of one shape and batch are timed in the same rounds,
interleaved, and reported as a speed ratio against fp32 ``nn.Linear`` together
with the effective weight bandwidth (bytes of weights as stored / time).

Two regimes, because this machine's 32 MiB L3 holds a 4-bit 4096x4096 weight
(8.4 MB) but not the fp32 one (64 MB):

- ``warm``: back-to-back calls of one layer, so a small quantized weight stays
  in cache (how a loop over a single layer measures);
- ``stream``: one pass over a chain of distinct layers whose weights together
  exceed the cache, called back-to-back, reported per layer: a model's decode
  step, where every weight comes from memory.

    python benchmarks/gemv.py [--repeats 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from lowbit.formats import WeightFormat
from lowbit.nn import QLinear
from lowbit.timing import interleaved_times

SHAPES = [(4096, 4096), (4096, 11008)]  # (in, out)
BATCHES = [1, 8, 32]
CACHE_BYTES = 32 * 2**20
IMPLS = ("fp32 nn.Linear", "bf16 nn.Linear", "QLinear int4 g128", "QLinear int4 g128, aten", "QLinear int8 per-channel")


def make_layers(k: int, n: int) -> dict[str, torch.nn.Module]:
    fp32 = torch.nn.Linear(k, n)
    q4 = QLinear.from_linear(fp32, WeightFormat("int", 4, 128))
    return {
        "fp32 nn.Linear": fp32,
        "bf16 nn.Linear": torch.nn.Linear(k, n).to(torch.bfloat16),
        "QLinear int4 g128": q4,
        "QLinear int4 g128, aten": QLinear(q4.quantized_weight, fp32.bias, kernel="int4_cpu"),
        "QLinear int8 per-channel": QLinear.from_linear(fp32, WeightFormat("int", 8, -1)),
    }


def weight_bytes(layer: torch.nn.Module) -> int:
    if isinstance(layer, QLinear):
        return layer.quantized_weight.storage_bits() // 8
    return layer.weight.numel() * layer.weight.element_size()


def kernel_name(layer: torch.nn.Module, rows: int) -> str:
    return layer.select_kernel(torch.device("cpu"), rows) if isinstance(layer, QLinear) else "aten"


def run(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        int4_bytes = k * n // 2
        copies = max(2, math.ceil(2 * CACHE_BYTES / int4_bytes))  # 4-bit chain twice the L3
        chains = [make_layers(k, n) for _ in range(copies)]
        first = chains[0]
        for m in BATCHES:
            x = torch.randn(m, k)
            inputs = {name: x.to(torch.bfloat16) if name.startswith("bf16") else x for name in IMPLS}

            def one(name):
                return lambda: first[name](inputs[name])

            def chain(name):
                return lambda: [layers[name](inputs[name]) for layers in chains]

            with torch.no_grad():
                warm = interleaved_times({name: one(name) for name in IMPLS}, repeats=repeats, burst=10)
                stream = interleaved_times({name: chain(name) for name in IMPLS}, repeats=repeats)
            stream = {name: t / copies for name, t in stream.items()}
            for regime, times in (("warm", warm), ("stream", stream)):
                base = times["fp32 nn.Linear"]
                for name, t in times.items():
                    rows.append(
                        {
                            "shape": f"{k}x{n}",
                            "batch": m,
                            "regime": regime,
                            "impl": name,
                            "kernel": kernel_name(first[name], m),
                            "ms": t * 1e3,
                            "speedup_vs_fp32": base / t,
                            "weight_GBps": weight_bytes(first[name]) / t / 1e9,
                        }
                    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.repeats)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(f"{'shape':<11}{'batch':>6} {'regime':<7} {'impl':<26}{'kernel':<12}{'ms':>9}{'vs fp32':>9}{'GB/s':>8}")
    for r in rows:
        print(
            f"{r['shape']:<11}{r['batch']:>6} {r['regime']:<7} {r['impl']:<26}{r['kernel']:<12}{r['ms']:>9.3f}"
            f"{r['speedup_vs_fp32']:>8.2f}x{r['weight_GBps']:>8.1f}"
        )


if __name__ == "__main__":
    main()
