"""CIFAR-10 ResNets: top-1 of fp32, RTN, RTN + bias correction, AdaRound, BRECQ and QDrop
at several weight/activation widths (first and last layers at 8 bits), with the same
calibration images and seed for every method, and the seconds each took. Every run is
``lowbit.quantize(model, method, bits=..., act_bits=..., calib=images, iters=...)``: the
one path of every model family (RTN with its MSE clipping search, the grid the
reconstruction methods also start from).

    python benchmarks/cnn_ptq.py [--models resnet20 resnet32] [--configs W4A4 W2A4] [--iters 300]
        [--nsamples 1024] [--test-images 10000] [--json out.json]
    python benchmarks/cnn_ptq.py --speed [--models resnet20 resnet32]

``--speed`` times instead: the fp32 model, the W8A8 simulation (fake-quantized
activations, float convs on the dequantized weights) and the frozen W8A8 model lowbit
returns (every conv a ``W8A8Conv`` on the integer GEMM kernels) on the same batches,
interleaved round by round, and reports each one's milliseconds and its speed relative to
fp32 in that same run, with each one's top-1.

Accuracy is on the JPEG test set (fp32 ResNet-20 scores 81.0% there, not the 91.8%
of the original PNG images): compare methods against fp32 on the same images.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.assets import asset  # noqa: E402
from lowbit.data.cifar10 import default_cifar10, load_cifar10  # noqa: E402
import lowbit  # noqa: E402
from lowbit.eval.classification import top1  # noqa: E402
from lowbit.models.resnet_cifar import NORMALIZE, load_resnet_cifar  # noqa: E402

MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}
CONFIGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}
METHODS = ("rtn", "bias_correction", "adaround", "brecq", "qdrop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--iters", type=int, default=300, help="reconstruction steps per unit (the papers: 20,000)")
    ap.add_argument("--nsamples", type=int, default=1024)
    ap.add_argument("--test-images", type=int, default=None, help="a balanced subset; default: all 10,000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here as they come")
    ap.add_argument("--speed", action="store_true", help="time fp32 vs fake-quant vs int8 W8A8 instead")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="batch sizes for --speed")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds for --speed")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    calib, _ = load_cifar10(default_cifar10("train"), split="train", limit=args.nsamples, seed=args.seed,
                            normalize=NORMALIZE)  # fmt: skip
    x, y = load_cifar10(default_cifar10("test"), split="test", limit=args.test_images, normalize=NORMALIZE)
    if args.speed:
        speed(args, calib, x, y)
        return
    rows = []
    for model_name in args.models:
        model = load_resnet_cifar(asset("resnet_cifar", MODELS[model_name]))
        fp = top1(model, x, y)
        rows.append({"model": model_name, "config": "fp32", "method": "fp32", "top1": fp, "seconds": 0.0})
        print(f"{model_name} fp32 {fp:.2f}", flush=True)
        for config in args.configs:
            bits, act_bits = CONFIGS[config]
            for method in args.methods:
                torch.manual_seed(args.seed)
                t0 = time.perf_counter()
                q = quantize(model, calib, method, bits, act_bits, args)
                seconds = time.perf_counter() - t0
                acc = top1(q, x, y)
                rows.append({"model": model_name, "config": config, "method": method, "top1": acc,
                             "seconds": round(seconds, 1), "iters": args.iters})  # fmt: skip
                print(f"{model_name} {config} {method:16s} top1 {acc:6.2f}  ({seconds:.0f} s)", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print()
    print(table(rows, args.configs, args.methods))


def quantize(model: torch.nn.Module, calib: torch.Tensor, method: str, bits: int, act_bits: int,
             args: argparse.Namespace) -> torch.nn.Module:  # fmt: skip
    """A quantized copy of ``model`` (``lowbit.quantize`` works in place); each method takes the knobs it
    knows (``iters`` and ``seed`` for the reconstruction methods, ``mse`` for RTN)."""
    return lowbit.quantize(copy.deepcopy(model), method, bits=bits, act_bits=act_bits, calib=calib, iters=args.iters,
                           seed=args.seed, mse=True, progress=False).eval()  # fmt: skip


def simulated(q: torch.nn.Module) -> torch.nn.Module:
    """The frozen model with each integer conv computed as the simulation does it (fake-quantized
    input, dequantized weight, float conv): the same numbers, PyTorch's float conv."""
    from lowbit.models.adapters import set_module
    from lowbit.nn.qconv import QConv
    from lowbit.nn.qmodule import QSite
    from lowbit.nn.quantizers import ActQuantizer
    from lowbit.nn.w8a8conv import W8A8Conv

    sim = copy.deepcopy(q)
    for name, m in list(sim.named_modules()):
        if isinstance(m, W8A8Conv):
            aq = ActQuantizer(m.act)
            aq.set_static(m.act_scale, m.act_zero)
            set_module(sim, name, QSite(QConv(m.conv_quantized_weight, m.bias, **m.conv_config()), [aq.eval()]))
    return sim


def speed(args, calib: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """fp32, the W8A8 simulation and the frozen W8A8 model (every conv on the integer kernels) on
    the same batches, interleaved."""
    from lowbit.nn.w8a8conv import W8A8Conv

    rows = []
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    for model_name in args.models:
        model = load_resnet_cifar(asset("resnet_cifar", MODELS[model_name])).eval()
        torch.manual_seed(args.seed)
        int8 = quantize(model, calib, "rtn", 8, 8, args)
        sim = simulated(int8)
        kernel = next(m for m in int8.modules() if isinstance(m, W8A8Conv))._conv_kernel(x.device)
        accs = {"fp32": top1(model, x, y), "W8A8 simulated": top1(sim, x, y), "W8A8 int8": top1(int8, x, y)}
        print(f"{model_name}: conv kernel {kernel}; top1 " + ", ".join(f"{k} {v:.2f}" for k, v in accs.items()),
              flush=True)  # fmt: skip
        runners = {"fp32": model, "W8A8 simulated": sim, "W8A8 int8": int8}
        for batch in args.batches:
            inp = x[:batch]
            times: dict[str, list[float]] = {k: [] for k in runners}
            with torch.inference_mode():
                for m in runners.values():  # warm-up: packing, allocator, first-call paths
                    m(inp)
                    m(inp)
                for _ in range(args.rounds):
                    for k, m in runners.items():
                        t0 = time.perf_counter()
                        m(inp)
                        times[k].append(time.perf_counter() - t0)
            base = sorted(times["fp32"])[len(times["fp32"]) // 2]
            for k, ts in times.items():
                med = sorted(ts)[len(ts) // 2]
                rows.append({"model": model_name, "batch": batch, "runner": k, "ms": round(med * 1e3, 3),
                             "speedup_vs_fp32": round(base / med, 3), "top1": accs[k], "kernel": kernel})  # fmt: skip
                print(f"{model_name} batch {batch:4d} {k:15s} {med * 1e3:9.2f} ms  x{base / med:.2f} vs fp32",
                      flush=True)  # fmt: skip
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))


def table(rows: list[dict], configs: list[str], methods: list[str]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        fp = next(r["top1"] for r in rows if r["model"] == model and r["method"] == "fp32")
        lines += [f"{model} (fp32 {fp:.2f})", "", "| config | " + " | ".join(methods) + " |",
                  "| --- |" + " --- |" * len(methods)]  # fmt: skip
        for config in configs:
            cells = []
            for method in methods:
                r = next((r for r in rows if r["model"] == model and r["config"] == config and r["method"] == method),
                         None)  # fmt: skip
                cells.append(f"{r['top1']:.2f} ({r['seconds']:.0f} s)" if r else "-")
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
