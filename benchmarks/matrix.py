"""Every registered method on every model family, through the one verb: the method x family table.

Each cell is the family's quality metric after quantization, or the one-line refusal the
method gives for that family (never an empty cell):

- stories260K (Llama): perplexity on the second half of tinystories_dev.txt (``--chunks`` chunks
  of 512 tokens; lower is better), calibrated on windows of the first half;
- all-MiniLM-L6-v2 (BERT encoder): embedding cosine to fp32 on 256 WikiText-2 sentences;
- CIFAR ViT and ResNet-20: top-1 on a class-balanced subset of the CIFAR-10 test JPEGs,
  calibrated on training images;
- a plain ``nn.Sequential`` of convs and linears (random weights): output SQNR in dB against fp32.

Settings: weight-only methods at 4 bits (language models g32, vision models per channel with
the first and last layers at 8 bits); activation methods (smoothquant, osplus, rptq, peg as
``+rtn`` recipes; llmint8; zeroquant) at W8A8. Reconstruction runs ``--iters`` steps per unit.

    python benchmarks/matrix.py [--families stories,minilm,vit,resnet20,sequential] [--methods ...]
                                [--iters 100] [--images 1000] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

import lowbit
from lowbit.models import load_pretrained
from lowbit.assets import asset

WEIGHT_ONLY = ("rtn", "gptq", "awq", "adaround", "brecq", "qdrop", "bias_correction")
ACTIVATION = ("smoothquant+rtn", "osplus+rtn", "rptq+rtn", "peg+rtn", "llmint8", "zeroquant", "repq_vit", "fq_vit",
              "ptq4vit", "noisyquant")  # fmt: skip
METHODS = WEIGHT_ONLY + ACTIVATION
RECONSTRUCTION = ("adaround", "brecq", "qdrop")


def settings(method: str, family: str, iters: int) -> dict:
    """The quantize() knobs of one cell."""
    kw: dict = {}
    if method in ("llmint8", "zeroquant"):
        kw = {}  # their own defaults: W8A8 per-token dynamic
    elif method in ACTIVATION:
        kw = {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_granularity": "tensor"}
        if method.startswith(("rptq", "peg", "repq_vit", "fq_vit", "ptq4vit", "noisyquant")):
            kw["act_dynamic"] = False
        if method in ("repq_vit", "fq_vit", "ptq4vit", "noisyquant"):  # their papers' weights: per-channel asym
            kw["symmetric"] = False
    else:
        kw = {"bits": 4}
        if family in ("stories", "minilm", "sequential"):
            kw["group_size"] = 32
    if method in RECONSTRUCTION:
        kw["iters"] = iters
    return kw


class Family:
    name = ""
    metric = ""

    def load(self) -> nn.Module: ...

    def calib(self): ...

    def score(self, model: nn.Module) -> float: ...


class Stories(Family):
    name, metric = "stories", "ppl"

    def __init__(self, chunks: int):
        from lowbit.data import calibration_windows, read_text, split_halves
        from lowbit.eval.perplexity import token_chunks

        self.model, self.tok = load_pretrained(str(asset("stories260K")))
        cal, test = split_halves(read_text(asset("text", "tinystories_dev.txt")))
        self.windows = calibration_windows(self.tok, cal, 128, 512, seed=0)
        self.chunks = token_chunks(self.tok, test, 512)[:chunks]

    def load(self):
        return copy.deepcopy(self.model)

    def calib(self):
        return self.windows

    def score(self, model):
        from lowbit.eval.perplexity import chunk_losses

        losses = chunk_losses(model, self.chunks, progress=False)
        return float(torch.exp(torch.as_tensor(losses).float().mean()))


class MiniLM(Family):
    name, metric = "minilm", "cosine"

    def __init__(self):
        from lowbit.data import calibration_windows, read_text, sentences

        self.model, self.tok = load_pretrained("minilm")
        lines = read_text(asset("text", "wikitext2_test_raw.txt")).splitlines()
        first, second = "\n".join(lines[: len(lines) // 2]), "\n".join(lines[len(lines) // 2 :])
        self.windows = calibration_windows(self.tok, first, 128, 128, seed=0)
        self.sentences = sentences(second, limit=256)

    def load(self):
        return copy.deepcopy(self.model)

    def calib(self):
        return self.windows

    def score(self, model):
        from lowbit.eval import embedding_fidelity

        return embedding_fidelity(self.model, model, self.tok, self.sentences)["cosine"]


class Cifar(Family):
    metric = "top1"

    def __init__(self, name: str, images: int, calib_images: int):
        from lowbit.data.cifar10 import load_cifar10
        from lowbit.models.loading import load_model, normalization

        self.name = name
        self.model, _ = load_model({"vit": "vit_cifar", "resnet20": "resnet20"}[name])
        norm = normalization(self.model)
        root = asset("cifar10")
        self.calib_x, _ = load_cifar10(root / "cifar10_train_jpeg.tar.gz", "train", calib_images, 0, norm)
        self.test_x, self.test_y = load_cifar10(root / "cifar10_test_jpeg.tar.gz", "test", images, 0, norm)

    def load(self):
        return copy.deepcopy(self.model)

    def calib(self):
        return self.calib_x

    def score(self, model):
        from lowbit.eval.classification import top1

        return top1(model, self.test_x, self.test_y, progress=False)


class Sequential(Family):
    name, metric = "sequential", "sqnr_db"

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
        ).eval()  # fmt: skip
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(256, 3, 16, 16, generator=g)
        self.test = torch.randn(256, 3, 16, 16, generator=g)
        with torch.no_grad():
            self.ref = self.model(self.test)

    def load(self):
        return copy.deepcopy(self.model)

    def calib(self):
        return self.x

    def score(self, model):
        with torch.no_grad():
            err = (model(self.test) - self.ref).pow(2).mean()
        return float(10 * torch.log10(self.ref.pow(2).mean() / err))


def cell(family: Family, method: str, iters: int) -> dict:
    model = family.load()
    kw = settings(method, family.name, iters)
    t0 = time.perf_counter()
    try:
        lowbit.quantize(model, method, calib=family.calib(), progress=False, **kw)
    except (ValueError, NotImplementedError, TypeError) as e:
        return {"family": family.name, "method": method, "refused": str(e).splitlines()[0]}
    seconds = time.perf_counter() - t0
    cov = model.lowbit_coverage
    decided = sorted({r.method for r in cov.quantized})
    return {"family": family.name, "method": method, family.metric: family.score(model), "seconds": seconds,
            "bits_per_weight": cov.mean_bits_per_weight(), "layers": len(cov.quantized),
            "skipped": len(cov.skipped), "decided_by": decided}  # fmt: skip


def build(name: str, args) -> Family:
    if name == "stories":
        return Stories(args.chunks)
    if name == "minilm":
        return MiniLM()
    if name in ("vit", "resnet20"):
        return Cifar(name, args.images, args.calib_images)
    if name == "sequential":
        return Sequential()
    raise SystemExit(f"unknown family {name!r}")


def show(r: dict) -> str:
    if "refused" in r:
        return f"{r['family']:<11}{r['method']:<17} refused: {r['refused']}"
    metric = next(k for k in ("ppl", "cosine", "top1", "sqnr_db") if k in r)
    return (f"{r['family']:<11}{r['method']:<17} {metric}={r[metric]:<10.4f} bpw={r['bits_per_weight']:.3f} "
            f"layers={r['layers']} skipped={r['skipped']} by={','.join(r['decided_by'])} s={r['seconds']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="stories,minilm,vit,resnet20,sequential")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.families.split(","):
        family = build(name, args)
        fp = {"family": name, "method": "fp32", family.metric: family.score(family.load())}
        print(f"{name:<11}{'fp32':<17} {family.metric}={fp[family.metric]:.4f}", flush=True)
        rows.append(fp)
        for method in args.methods.split(","):
            rows.append(cell(family, method, args.iters))
            print(show(rows[-1]), flush=True)
    if args.json:
        json.dump(rows, sys.stdout)
        print()


if __name__ == "__main__":
    main()
