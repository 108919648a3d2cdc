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

    python benchmarks/gemv.py [--repeats 15] [--shapes 4096x4096] [--batches 1,4,16,32,512] [--json [PATH]]

The ``avx2`` rows run lowbit's AVX2 code, but fp32 ``nn.Linear`` still runs the BLAS's
AVX-512 code on an AVX-512 machine. For the baseline an AVX2-only CPU would have, hold the
BLAS to AVX2 as well:

    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/gemv.py

``--cuda`` measures lowbit's Triton W4A16 kernel (``kernels/triton_w4a16.py``,
int4 g128 asymmetric, autotuned during warm-up) against fp16 ``x @ W.T`` on the
GPU instead: CUDA events around single calls, the two interleaved round by
round, each call after a write of 512 MiB that evicts the L2 (a decode step
reads its weights from HBM), medians. Those are GPU times: the Python launch
cost hides behind the eviction and is not in them. Each row checks the kernel
against dequantize-then-matmul first, and states the bandwidth achieved (bytes
the call reads: packed codes, scales, zeros and activations, per time) against
a device-to-device copy measured in the same run and the H200's 4.8 TB/s
datasheet figure:

    python benchmarks/gemv.py --cuda [--shapes 4096x4096,4096x14336,14336x4096] [--batches 1,16,128] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.formats import WeightFormat
from lowbit.kernels import triton_w4a16, wq
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight
from lowbit.timing import interleaved_times

DATASHEET_GBPS = 4800.0  # H200 HBM3e
FLUSH_BYTES = 512 * 2**20  # over the L2 of any current GPU, and long enough to write that the next launches queue


def l3_bytes() -> int:
    """The largest CPU cache, from sysfs (32 MiB where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


class OnPath(torch.nn.Module):
    """A QLinear run on one instruction-set path of lowbit's native kernel (``digits=False``: with
    fp32 products instead of the integer-digit GEMV; ``avx_vnni=False``: the AVX2 path's
    vpmaddubsw kernel even where the CPU has AVX-VNNI, as AVX2 CPUs without it run; ``amx=False``:
    the AVX-512 path without the AMX digit GEMM, as CPUs without AMX run it)."""

    def __init__(self, q: QLinear, isa: str, digits: bool = True, avx_vnni: bool = True, amx: bool = True):
        super().__init__()
        self.q, self.isa, self.digits, self.avx_vnni, self.amx = q, isa, digits, avx_vnni, amx

    def forward(self, x):
        packed = self.q._prepare("native", x.device)
        packed.digits = self.digits
        packed.amx = -1 if self.amx else 0
        before = packed.ext.allow_avx_vnni(self.avx_vnni)
        try:
            y = packed.matmul(x, self.isa)
        finally:
            packed.ext.allow_avx_vnni(before)
        return y + self.q.bias if self.q.bias is not None else y


def make_layers(k: int, n: int) -> dict[str, torch.nn.Module]:
    fp32 = torch.nn.Linear(k, n)
    q4 = QLinear.from_linear(fp32, WeightFormat("int", 4, 128))
    q4s = QLinear.from_linear(fp32, WeightFormat("int", 4, 32, True))
    q8 = QLinear.from_linear(fp32, WeightFormat("int", 8, -1))
    layers = {"fp32 nn.Linear": fp32, "bf16 nn.Linear": torch.nn.Linear(k, n).to(torch.bfloat16)}
    isas = list(reversed(wq.available_isas()))
    for isa in isas:
        layers[f"int4 g128 {isa}"] = OnPath(q4, isa)
    if isas:
        layers[f"int4 g128 {isas[0]} fp32 products"] = OnPath(q4, isas[0], digits=False)
    if "avx512" in isas and wq.extension().amx_usable():
        layers["int4 g128 avx512 no AMX"] = OnPath(q4, "avx512", amx=False)
    if "avx2" in isas and wq.extension().has_avx_vnni():
        layers["int4 g128 avx2 vpmaddubsw"] = OnPath(q4, "avx2", avx_vnni=False)
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
        return OnPath(_copy(layer.q), layer.isa, layer.digits, layer.avx_vnni, layer.amx)
    qw = layer.quantized_weight
    fresh = type(qw)(
        qw.packed.clone(), qw.scale.clone(), None if qw.zero is None else qw.zero.clone(), qw.fmt, qw.shape
    )
    return QLinear(fresh, layer.bias, kernel=layer.kernel)


def gpu_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median GPU microseconds of one call of each function, interleaved, each after an L2 eviction."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for fn in fns.values():  # compiles and autotunes
        fn()
    torch.cuda.synchronize()
    events: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3 for name, pairs in events.items()}


def copy_gbps(nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second: what the GPU's memory really gives."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = gpu_times({"copy": lambda: dst.copy_(src)}, repeats)["copy"]
    return 2 * nbytes / us / 1e3


def run_cuda(repeats: int, shapes: list[tuple[int, int]], batches: list[int]) -> dict:
    """The Triton W4A16 kernel against fp16 ``x @ W.T`` for each ``(in, out)`` shape and batch;
    the table is printed row by row as it is measured (a run cut short still says something)."""
    import triton

    torch.manual_seed(0)
    dev = torch.device("cuda")
    fmt = WeightFormat("int", 4, 128, False)
    result = {
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "format": fmt.describe(),
        "copy_GBps": copy_gbps(),
        "datasheet_GBps": DATASHEET_GBPS,
        "rows": [],
    }
    print_header(result)
    for k, n in shapes:
        w = torch.randn(n, k, device=dev) * 0.02  # [out, in]
        w16 = w.half()
        qw = QuantizedWeight.quantize(w, fmt)
        packed = triton_w4a16.Packed(qw, dev)
        reference = qw.dequantize().to(dev)  # fp32 [out, in]
        weight_bytes = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.scales, packed.zeros))
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            with torch.no_grad():
                want = x.float() @ reference.t()
                error = float((packed.matmul(x).float() - want).abs().max() / want.abs().max())
                us = gpu_times({"fp16": lambda: x @ w16.t(), "triton": lambda: packed.matmul(x)}, repeats)
            x_bytes = x.numel() * x.element_size()
            q_gbps = (weight_bytes + x_bytes) / us["triton"] / 1e3
            f_gbps = (w16.numel() * 2 + x_bytes) / us["fp16"] / 1e3
            row = {
                "shape": f"{k}->{n}",
                "batch": m,
                "fp16_us": us["fp16"],
                "triton_us": us["triton"],
                "speedup": us["fp16"] / us["triton"],
                "triton_GBps": q_gbps,
                "triton_of_copy": q_gbps / result["copy_GBps"],
                "triton_of_datasheet": q_gbps / DATASHEET_GBPS,
                "fp16_GBps": f_gbps,
                "fp16_of_copy": f_gbps / result["copy_GBps"],
                "max_rel_error": error,
                "config": str(packed.config_for(x)),
            }
            result["rows"].append(row)
            print_row(row)
    return result


def print_header(result: dict) -> None:
    print(
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['format']}; "
        f"device-to-device copy {result['copy_GBps']:.0f} GB/s (datasheet {result['datasheet_GBps']:.0f}); "
        "GPU time per call, L2 evicted before each, median of interleaved rounds\n"
    )
    print("| in->out | batch | fp16 µs | triton µs | fp16/triton | triton GB/s | of copy | of 4.8 TB/s "
          "| fp16 GB/s | max rel err | config |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)


def print_row(r: dict) -> None:
    print(
        f"| {r['shape']} | {r['batch']} | {r['fp16_us']:.1f} | {r['triton_us']:.1f} | {r['speedup']:.2f}x "
        f"| {r['triton_GBps']:.0f} | {r['triton_of_copy']:.0%} | {r['triton_of_datasheet']:.0%} "
        f"| {r['fp16_GBps']:.0f} | {r['max_rel_error']:.1e} | {r['config']} |",
        flush=True,
    )


def write_json(result, path: str) -> None:
    """``path`` ``-`` prints the JSON; anything else is a file to write."""
    text = json.dumps(result, indent=1)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true", help="the Triton W4A16 kernel against fp16 matmul on the GPU")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default: 15 on CPU, 100 with --cuda)")
    ap.add_argument("--shapes", default=None, help="KxN (in x out), comma-separated")
    ap.add_argument("--batches", default=None, help="default: 1,4,16,32,512 on CPU, 1,16,128 with --cuda")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the results as JSON to PATH (alone: print them instead of the table)")  # fmt: skip
    args = ap.parse_args()
    default_shapes = "4096x4096,4096x14336,14336x4096" if args.cuda else "4096x4096,4096x11008"
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or default_shapes).split(",")]
    batches = [int(b) for b in (args.batches or ("1,16,128" if args.cuda else "1,4,16,32,512")).split(",")]
    if args.cuda:
        if not triton_w4a16.available():
            raise SystemExit(
                f"--cuda needs a CUDA GPU (Ampere or newer) and triton; here torch.cuda.is_available() is "
                f"{torch.cuda.is_available()} and triton is {'' if triton_w4a16.triton_importable() else 'not '}"
                "importable"
            )
        result = run_cuda(args.repeats or 100, shapes, batches)
        if args.json:
            write_json(result, args.json)
        return
    rows = run(args.repeats or 15, shapes, batches)
    if args.json:
        write_json({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, args.json)
        if args.json == "-":
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
