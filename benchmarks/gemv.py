"""QLinear (4-bit, 8-bit) against fp32 and bf16 nn.Linear, per kernel path.

All implementations of one shape and batch are timed in the same rounds,
interleaved, and reported as a speed ratio against fp32 ``nn.Linear`` together
with the effective weight bandwidth (bytes of weights as stored / time).
lowbit's exact fp32 kernels are timed on every instruction-set path this CPU
runs (``avx512``, ``avx2``, ``portable``), so one AVX-512 machine also
measures what an AVX2-only CPU gets.

Two regimes:

- ``stream`` (batches up to 16): one pass over a chain of distinct layers whose
  weights together are at least twice the L3 (read from sysfs), reported per
  layer: a model's decode step, where every weight comes from memory. Each
  implementation gets a chain of its own size.
- ``warm``: back-to-back calls of one layer (how a loop over a single layer
  measures; for large batches, where the GEMM's arithmetic dominates).

    python benchmarks/gemv.py [--repeats 15] [--shapes 4096x4096] [--batches 1,4,16,32,512] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lowbit.formats import WeightFormat
from lowbit.kernels import wq
from lowbit.nn import QLinear
from lowbit.timing import interleaved_times


def l3_bytes() -> int:
    """The largest CPU cache, from sysfs (32 MiB where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


class OnPath(torch.nn.Module):
    """A QLinear run on one instruction-set path of lowbit's native kernel."""

    def __init__(self, q: QLinear, isa: str):
        super().__init__()
        self.q, self.isa = q, isa

    def forward(self, x):
        y = self.q._prepare("native", x.device).matmul(x, self.isa)
        return y + self.q.bias if self.q.bias is not None else y


def make_layers(k: int, n: int) -> dict[str, torch.nn.Module]:
    fp32 = torch.nn.Linear(k, n)
    q4 = QLinear.from_linear(fp32, WeightFormat("int", 4, 128))
    q4s = QLinear.from_linear(fp32, WeightFormat("int", 4, 32, True))
    q8 = QLinear.from_linear(fp32, WeightFormat("int", 8, -1))
    layers = {"fp32 nn.Linear": fp32, "bf16 nn.Linear": torch.nn.Linear(k, n).to(torch.bfloat16)}
    for isa in reversed(wq.available_isas()):
        layers[f"int4 g128 {isa}"] = OnPath(q4, isa)
    layers["int4 g32 sym"] = q4s
    layers["int8 per-channel"] = q8
    layers["int4 g128 aten bf16"] = QLinear(q4.quantized_weight, fp32.bias, kernel="int4_cpu")
    return layers


def weight_bytes(layer: torch.nn.Module) -> int:
    layer = layer.q if isinstance(layer, OnPath) else layer
    if isinstance(layer, QLinear):
        return layer.quantized_weight.storage_bits() // 8
    return layer.weight.numel() * layer.weight.element_size()


def run(repeats: int, shapes: list[tuple[int, int]], batches: list[int]) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    cache = l3_bytes()
    for k, n in shapes:
        first = make_layers(k, n)
        names = list(first)
        chains = {name: [first[name]] for name in names}
        for name in names:  # distinct copies until the chain is twice the cache
            copies = max(2, math.ceil(2 * cache / weight_bytes(first[name])))
            while len(chains[name]) < copies:
                chains[name].append(_copy(first[name]))
        for m in batches:
            x = torch.randn(m, k)
            inputs = {name: x.to(torch.bfloat16) if name.startswith("bf16") else x for name in names}
            reps = repeats if m <= 32 else max(3, repeats // 5)
            regimes = {}
            with torch.no_grad():
                regimes["warm"] = interleaved_times(
                    {name: _call(first[name], inputs[name]) for name in names},
                    repeats=reps,
                    burst=10 if m <= 32 else 1,
                )
                if m <= 16:
                    stream = interleaved_times(
                        {name: _call_chain(chains[name], inputs[name]) for name in names},
                        repeats=reps,
                    )
                    regimes["stream"] = {name: t / len(chains[name]) for name, t in stream.items()}
            for regime, times in regimes.items():
                base = times["fp32 nn.Linear"]
                for name, t in times.items():
                    rows.append(
                        {
                            "shape": f"{k}x{n}",
                            "batch": m,
                            "regime": regime,
                            "impl": name,
                            "ms": t * 1e3,
                            "speedup_vs_fp32": base / t,
                            "weight_GBps": weight_bytes(first[name]) / t / 1e9,
                        }
                    )
    return rows


def _call(layer, x):
    return lambda: layer(x)


def _call_chain(layers, x):
    return lambda: [layer(x) for layer in layers]


def _copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A layer like ``layer`` in fresh memory (a distinct weight for the stream)."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
    if isinstance(layer, OnPath):
        return OnPath(_copy(layer.q), layer.isa)
    qw = layer.quantized_weight
    fresh = type(qw)(
        qw.packed.clone(), qw.scale.clone(), None if qw.zero is None else qw.zero.clone(), qw.fmt, qw.shape
    )
    return QLinear(fresh, layer.bias, kernel=layer.kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN (in x out), comma-separated")
    ap.add_argument("--batches", default="1,4,16,32,512")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = run(args.repeats, shapes, batches)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, L3 {l3_bytes() >> 20} MiB, "
        f"median of interleaved rounds; native paths here: {', '.join(wq.available_isas())}"
    )
    print(f"{'shape':<11}{'batch':>6} {'regime':<7} {'impl':<22}{'ms':>9}{'vs fp32':>9}{'GB/s':>8}")
    for r in rows:
        print(
            f"{r['shape']:<11}{r['batch']:>6} {r['regime']:<7} {r['impl']:<22}{r['ms']:>9.3f}"
            f"{r['speedup_vs_fp32']:>8.2f}x{r['weight_GBps']:>8.1f}"
        )


if __name__ == "__main__":
    main()
