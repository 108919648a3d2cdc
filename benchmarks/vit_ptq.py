"""The CIFAR ViT at low weight/activation widths: round-to-nearest with min-max ranges, RTN with
lowbit's defaults (min-max weights, MSE activation ranges), RTN on the MSE-searched grids
(weights and activation ranges), QDrop (block reconstruction with activations quantized and
randomly dropped), and the ViT methods: RepQ-ViT (per-channel post-LayerNorm grids
reparameterized, log-sqrt2 softmax), FQ-ViT (power-of-two factors on the residual sums, a
4-bit log2 attention map, min-max elsewhere) and PTQ4ViT (twin-uniform softmax and GELU,
Hessian-guided scale search), APQ-ViT, PTQ for ViT, P2-ViT, CPT-V, NoisyQuant, outlier-aware
slicing (QDrop at a granularity picked per block) and PMQ (mixed widths per linear within the
uniform budget), with the same calibration images and seed. Every
site is quantized: every linear's and the patch embedding's input, the softmax output, the
MLP activation output, both operands of ``q @ k^T`` and both residual sums; the patch
embedding and the head at 8 bits.

    python benchmarks/vit_ptq.py [--configs W4A4 W3A3] [--iters 100] [--images 1000] [--json out.json]

Top-1 on a class-balanced, seeded subset of the CIFAR-10 test JPEGs (``--images``), fp32 on the
same images first.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowbit  # noqa: E402
from lowbit.assets import asset  # noqa: E402
from lowbit.data.cifar10 import load_cifar10  # noqa: E402
from lowbit.eval.classification import top1  # noqa: E402
from lowbit.models.loading import load_model, normalization  # noqa: E402

CONFIGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3)}
RUNS = {
    "rtn min-max": ("rtn", {"mse": False, "act_observer": "minmax"}),
    "rtn default": ("rtn", {}),  # lowbit's defaults for a ViT: min-max weights, MSE activation ranges
    "rtn mse": ("rtn", {"mse": True}),
    "qdrop": ("qdrop", {}),
    "qdrop act_lr 4e-5": ("qdrop", {"act_lr": 4e-5}),  # a check: LSQ's step-size learning rate 100x smaller
    "qdrop fixed act scales": ("qdrop", {"learn_act_scales": False}),
    "repq_vit": ("repq_vit", {}),
    "fq_vit": ("fq_vit", {}),
    "ptq4vit": ("ptq4vit", {}),  # twin-uniform softmax / MLP activation, Hessian-guided weight and input scales
    "apq_vit": ("apq_vit", {}),  # the same search scored at each block's output, a searched log2 softmax (MPQ)
    "ptq_for_vit": ("ptq_for_vit", {}),  # cosine search + ranking-aware attention loss, bias correction
    "ptq_for_vit no rank": ("ptq_for_vit", {"gamma": 0.0}),  # ablations of the two additions
    "ptq_for_vit no bias corr.": ("ptq_for_vit", {"bias_correction": False}),
    "p2_vit": ("p2_vit", {}),  # power-of-two weight and activation scales, adaptively rounded
    "p2_vit smoothing": ("p2_vit", {"smooth": True}),  # and PoT-aware smoothing first
    "p2_vit mixed": ("p2_vit", {"mixed": True}),  # and coarse-to-fine weight widths within the same size
    "cpt_v": ("cpt_v", {}),  # evolutionary scale search against a block-output contrastive loss
    "noisyquant": ("noisyquant", {}),  # a fixed per-channel noisy bias before each linear's grid
    "oas_vit": ("oas_vit", {}),  # QDrop at the granularity (block / residual halves / layers) a trial picks per block
    "pmq": ("pmq", {}),  # widths per linear (global sensitivity, Pareto frontier) and per patch, same budget
    "pmq no patches": ("pmq", {"patches": False}),  # one width per linear
    "pmq search 128": ("pmq", {"search_images": 128}),  # the sensitivities on 4x the images
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["W4A4", "W3A3"], choices=list(CONFIGS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--iters", type=int, default=100, help="QDrop steps per unit")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model, _ = load_model("vit_cifar")
    norm = normalization(model)
    root = asset("cifar10")
    calib, _ = load_cifar10(root / "cifar10_train_jpeg.tar.gz", "train", args.calib_images, args.seed, norm)
    x, y = load_cifar10(root / "cifar10_test_jpeg.tar.gz", "test", args.images, args.seed, norm)
    rows = [{"config": "fp32", "run": "fp32", "top1": top1(model, x, y, progress=False), "seconds": 0.0}]
    print(f"fp32 top1 {rows[0]['top1']:.2f} on {len(y)} test images", flush=True)
    for config in args.configs:
        bits, act_bits = CONFIGS[config]
        for run in args.runs:
            method, extra = RUNS[run]
            kw = {"iters": args.iters, "seed": args.seed} if method in ("qdrop", "oas_vit") else {}
            t0 = time.perf_counter()
            q = lowbit.quantize(copy.deepcopy(model), method, bits=bits, act_bits=act_bits, calib=calib,
                                progress=False, **extra, **kw)  # fmt: skip
            seconds = time.perf_counter() - t0
            acc = top1(q, x, y, progress=False)
            rows.append({"config": config, "run": run, "top1": acc, "seconds": round(seconds, 1)})
            print(f"{config} {run:12s} top1 {acc:6.2f}  ({seconds:.0f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
