"""lowbit's look-up-table kernels (``kernels/lut.py``, and ``kernels/vq.py`` for GPTVQ's vector codebooks)
against fp32 ``nn.Linear`` on CPU.

A decode step's regime: every weight comes from memory. Each implementation runs on a chain of
distinct layers of one shape whose weights together are at least twice the largest CPU cache
(read from sysfs), and the time is per layer. All implementations of one batch and thread count
are timed in the same rounds, interleaved, and reported as medians and as a speed ratio against
fp32 ``nn.Linear`` measured in those rounds. Codes and tables are random (the kernel's speed does
not depend on their values); the outliers are 0.45% of the weights, scattered at random. The vq rows
are 2-D codebooks per 256 columns with GPTVQ's default block (as many rows per codebook as it has entries).

    python benchmarks/lut_gemv.py [--shape 4096x4096] [--batches 1,4] [--threads 1,2] [--repeats 15] [--isa avx2]
                                  [--only vq]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path

import torch

from lowbit.formats import WeightFormat, binary, codebook, floating, integer, vector
from lowbit.formats.sparse import Outliers
from lowbit.kernels import lut
from lowbit.kernels.build import cpu_flags
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight
from lowbit.timing import interleaved_times

FORMATS = {  # name: (format, outlier fraction)
    "lut4 per-channel": (WeightFormat("lut", 4, -1), 0.0),
    "lut3 per-channel": (WeightFormat("lut", 3, -1), 0.0),
    "lut4 g128": (WeightFormat("lut", 4, 128), 0.0),
    "nf4 g64": (WeightFormat("nf4", 4, 64), 0.0),
    "bcq3 g128": (WeightFormat("bcq", 3, 128), 0.0),
    "bcq4 g128": (WeightFormat("bcq", 4, 128), 0.0),
    "lut4 per-channel +0.45% outliers": (WeightFormat("lut", 4, -1), 0.0045),
    "vq2 d2": (WeightFormat("vq", 2, 256, vq_dim=2), 0.0),
    "vq3 d2": (WeightFormat("vq", 3, 256, vq_dim=2), 0.0),
    "vq4 d2": (WeightFormat("vq", 4, 256, vq_dim=2), 0.0),
}


def l3_bytes() -> int:
    """The largest CPU cache, from sysfs (32 MiB where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


def random_weight(n: int, k: int, fmt: WeightFormat, outliers: float, gen: torch.Generator) -> QuantizedWeight:
    """A weight of format ``fmt`` with random codes, tables (or scales, or codebooks) and outliers."""
    if fmt.kind == "vq":
        nbooks, entries, dim = vector.book_shape(n, k, fmt)
        codes = torch.randint(0, entries, (n, vector.vectors(k, dim)), generator=gen, dtype=torch.uint8)
        return QuantizedWeight.from_codes(codes, torch.randn(nbooks, entries, dim, generator=gen).half(), None, fmt)
    ngroups = integer.num_groups(k, fmt.group_size)
    codes = torch.randint(0, 1 << fmt.bits, (n, k), generator=gen, dtype=torch.uint8)
    if fmt.kind == "lut":
        scale = torch.randn(n, ngroups, codebook.levels(fmt.bits), generator=gen).sort(-1).values.reshape(n, -1)
    elif fmt.kind == "bcq":  # alphas and an offset per group
        scale = torch.rand(n, ngroups * binary.params_per_group(fmt.bits), generator=gen)
    else:
        scale = torch.rand(n, ngroups, generator=gen) / floating.max_level(fmt.kind) + 1e-3
    scale = scale.half().float()
    kept = None
    if outliers:
        mask = torch.rand(n, k, generator=gen) < outliers
        kept = Outliers.from_dense(torch.randn(n, k, generator=gen), mask)
    return QuantizedWeight.from_codes(codes, scale, None, fmt, outliers=kept)


def lut_layer(n: int, k: int, fmt: WeightFormat, outliers: float, gen: torch.Generator, _: int) -> QLinear:
    return QLinear(random_weight(n, k, fmt, outliers, gen), kernel="vq" if fmt.kind == "vq" else "lut")


def run_all(layers: list[torch.nn.Module], x: torch.Tensor) -> None:
    for layer in layers:
        layer(x)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def chain(make, bytes_each: int) -> list[torch.nn.Module]:
    """Enough distinct layers that their weights are twice the largest cache (at least two)."""
    return [make(i) for i in range(max(2, math.ceil(2 * l3_bytes() / bytes_each)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096", help="out x in")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--isa", default=None, help="force a path of the LUT kernels (portable, avx2, avx512)")
    ap.add_argument("--only", default="", help="only the formats whose name contains this (fp32 nn.Linear always)")
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    if args.isa:
        lut.isa_code(args.isa)  # refuses a path this CPU lacks, before anything is built
        os.environ["LOWBIT_ISA"] = args.isa
    gen = torch.Generator().manual_seed(0)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c")))
    print(f"CPU flags: {' '.join(flags)}; LUT kernel path: {args.isa or lut.available_isas()[-1]}; "
          f"largest cache {l3_bytes() / 2**20:.0f} MiB; torch {torch.__version__}")  # fmt: skip

    def linear(_):
        return torch.nn.Linear(k, n, bias=False).requires_grad_(False)

    impls = {"fp32 nn.Linear": chain(linear, 4 * n * k)}
    for name, (fmt, frac) in FORMATS.items():
        if args.only not in name:
            continue
        make = functools.partial(lut_layer, n, k, fmt, frac, gen)
        first = make(0)
        impls[name] = [first, *chain(make, weight_bytes(first))[1:]]
    print(f"{'shape':>10} {'rows':>4} {'thr':>3}  {'format':<34} {'bits/w':>6} {'layers':>6} {'ms/layer':>9} "
          f"{'x fp32':>7}")  # fmt: skip
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(b) for b in args.batches.split(",")):
            x = torch.randn(rows, k, generator=gen)

            with torch.inference_mode():
                fns = {name: functools.partial(run_all, ls, x) for name, ls in impls.items()}
                times = interleaved_times(fns, repeats=args.repeats)
            base = times["fp32 nn.Linear"] / len(impls["fp32 nn.Linear"])
            for name, layers in impls.items():
                per = times[name] / len(layers)
                bpw = 32.0 if name.startswith("fp32") else layers[0].quantized_weight.bits_per_weight
                print(f"{n}x{k:<5} {rows:>4} {threads:>3}  {name:<34} {bpw:>6.2f} {len(layers):>6} {per * 1e3:>9.3f} "
                      f"{base / per:>6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
