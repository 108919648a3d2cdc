"""Weight-and-activation quantization: quality and the int8 matmul's speed.

Quality: stories260K perplexity (second half of tinystories_dev.txt) and MiniLM
embedding cosine (WikiText-2 sentences) for fp32, weight-only W8, naive W8A8 and
W4A8 (per-channel weights, per-token dynamic int8 activations).
Speed: ``W8A8Linear`` against fp32 ``nn.Linear`` on 4096x4096 at batch 1, 32 and
512, interleaved in one run.

    python benchmarks/w8a8.py [--skip-quality] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import lowbit
from lowbit.assets import asset
from lowbit.data import read_text, sentences, split_halves
from lowbit.eval import embedding_fidelity, perplexity
from lowbit.formats import WeightFormat
from lowbit.models import load_pretrained
from lowbit.nn import W8A8Linear
from lowbit.quantized_weight import QuantizedWeight
from lowbit.timing import interleaved_times

SCHEMES = {
    "W8 (weight-only)": dict(bits=8, group_size=-1, symmetric=True),
    "W8A8 naive": dict(bits=8, group_size=-1, symmetric=True, act_bits=8),
    "W4A8 naive": dict(bits=4, group_size=-1, symmetric=True, act_bits=8),
}


def quality() -> list[dict]:
    rows = []
    model, tok = load_pretrained(str(asset("stories260K")))
    _, test = split_halves(read_text(asset("text", "tinystories_dev.txt")))
    rows.append({"model": "stories260K", "scheme": "fp32", "ppl": perplexity(model, tok, test, progress=False)["ppl"]})
    for name, cfg in SCHEMES.items():
        q = lowbit.quantize(copy.deepcopy(model), "rtn", progress=False, **cfg)
        rows.append({"model": "stories260K", "scheme": name, "ppl": perplexity(q, tok, test, progress=False)["ppl"]})
    model, tok = load_pretrained("minilm")
    texts = sentences(read_text(asset("text", "wikitext2_test_raw.txt")), limit=256)
    for name, cfg in SCHEMES.items():
        q = lowbit.quantize(copy.deepcopy(model), "rtn", progress=False, **cfg)
        rows.append({"model": "MiniLM", "scheme": name, "cosine": embedding_fidelity(model, q, tok, texts)["cosine"]})
    return rows


def speed(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    k = n = 4096
    fp32 = torch.nn.Linear(k, n)
    w8 = W8A8Linear(QuantizedWeight.quantize(fp32.weight.detach(), WeightFormat("int", 8, -1, True)), fp32.bias)
    rows = []
    for m in (1, 32, 512):
        x = torch.randn(m, k)
        with torch.no_grad():
            t = interleaved_times({"fp32": lambda: fp32(x), "w8a8": lambda: w8(x)}, repeats=repeats)
        rows.append({"shape": f"{k}x{n}", "batch": m, "fp32_ms": t["fp32"] * 1e3, "w8a8_ms": t["w8a8"] * 1e3,
                     "speedup": t["fp32"] / t["w8a8"]})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = {"speed": speed(args.repeats)}
    if not args.skip_quality:
        result["quality"] = quality()
    if args.json:
        print(json.dumps(result))
        return
    for r in result["speed"]:
        print(f"{r['shape']} batch {r['batch']:>4}: fp32 {r['fp32_ms']:.3f} ms, W8A8 {r['w8a8_ms']:.3f} ms, "
              f"{r['speedup']:.2f}x")  # fmt: skip
    for r in result.get("quality", []):
        metric = f"ppl {r['ppl']:.4f}" if "ppl" in r else f"cosine {r['cosine']:.5f}"
        print(f"{r['model']:<12} {r['scheme']:<18} {metric}")


if __name__ == "__main__":
    main()
