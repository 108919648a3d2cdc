"""Weight-only PTQ quality: RTN, GPTQ, AWQ and AWQ+GPTQ against fp32, and against
llm-compressor's GPTQ on the same calibration data when it is installed.

stories260K: calibrate on the first half of tinystories_dev.txt (128 windows of
512 tokens, seed 0), perplexity on the second half. MiniLM: calibrate on
WikiText-2 windows (128 x 128 tokens) from the first half of the file, embedding
cosine against fp32 on 256 sentences from the second half.

    python benchmarks/llm_quality.py [--model stories|minilm|both] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import lowbit
from lowbit.assets import asset
from lowbit.data import calibration_windows, read_text, sentences, split_halves
from lowbit.eval import embedding_fidelity, perplexity
from lowbit.models import load_pretrained

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def run_lowbit(model, method, calib, bits, group_size):
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    lowbit.quantize(q, method, calib=calib, bits=bits, group_size=group_size, progress=False)
    seconds = time.perf_counter() - t0
    done, total = q.lowbit_coverage.block_counts()
    return q, {
        "seconds": seconds,
        "bits_per_weight": q.lowbit_coverage.mean_bits_per_weight(),
        "coverage": f"{done}/{total}",
    }


def run_llmcompressor(model, calib, bits, group_size):
    """llm-compressor's GPTQ (its defaults) on the same windows; ``None`` if it is not installed."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from loguru import logger
    except ImportError:
        return None, None
    logger.remove()  # its per-layer log would bury this table
    q = copy.deepcopy(model)
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "channel"}
    if group_size != -1:
        weights.update(strategy="group", group_size=group_size)
    recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    try:
        oneshot(model=q, dataset=data, recipe=recipe, max_seq_length=calib.shape[1], num_calibration_samples=len(calib))
    except Exception as e:  # report what the peer says, as its result
        return None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return q, {"seconds": time.perf_counter() - t0, "bits_per_weight": None, "coverage": "-"}


CONFIGS = [(4, -1), (3, -1), (4, 32), (3, 32), (2, 32)]


def stories(nsamples: int) -> list[dict]:
    model, tok = load_pretrained(str(asset("stories260K")))
    cal, test = split_halves(read_text(asset("text", "tinystories_dev.txt")))
    calib = calibration_windows(tok, cal, nsamples, 512, seed=0)

    def ppl(m):
        return perplexity(m, tok, test, seqlen=512, progress=False)["ppl"]

    rows = [{"model": "stories260K", "config": "fp32", "method": "fp32", "ppl": ppl(model)}]
    print(_fmt(rows[-1]), flush=True)
    for bits, g in CONFIGS:
        config = f"w{bits} " + ("per-channel" if g == -1 else f"g{g}")
        for method in METHODS:
            q, info = run_lowbit(model, method, calib, bits, g)
            rows.append({"model": "stories260K", "config": config, "method": method, "ppl": ppl(q), **info})
            print(_fmt(rows[-1]), flush=True)
        q, info = run_llmcompressor(model, calib, bits, g)
        if info is not None:
            rows.append({"model": "stories260K", "config": config, "method": "llmcompressor gptq",
                         "ppl": ppl(q) if q is not None else None, **info})  # fmt: skip
            print(_fmt(rows[-1]), flush=True)
    return rows


def minilm(nsamples: int) -> list[dict]:
    model, tok = load_pretrained("minilm")
    text = read_text(asset("text", "wikitext2_test_raw.txt"))
    lines = text.splitlines()
    first, second = "\n".join(lines[: len(lines) // 2]), "\n".join(lines[len(lines) // 2 :])
    calib = calibration_windows(tok, first, nsamples, 128, seed=0)
    evalset = sentences(second, limit=256)

    def loss(m):
        return embedding_fidelity(model, m, tok, evalset)["cosine_loss"]

    rows = []
    for bits, g in [(4, 128), (4, -1), (3, 128), (3, -1)]:
        config = f"w{bits} " + ("per-channel" if g == -1 else f"g{g}")
        for method in METHODS:
            q, info = run_lowbit(model, method, calib, bits, g)
            rows.append({"model": "MiniLM", "config": config, "method": method, "cosine_loss": loss(q), **info})
            print(_fmt(rows[-1]), flush=True)
        q, info = run_llmcompressor(model, calib, bits, g)
        if info is not None:
            rows.append({"model": "MiniLM", "config": config, "method": "llmcompressor gptq",
                         "cosine_loss": loss(q) if q is not None else None, **info})  # fmt: skip
            print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    metric = "ppl" if "ppl" in r else "cosine_loss"
    value = r.get(metric)
    shown = f"{value:.4f}" if value is not None else r.get("error", "-")
    bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
    secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
    cov = r.get("coverage", "-")
    return f"{r['model']:<12}{r['config']:<16}{r['method']:<20}{metric}={shown:<12} bpw={bpw:<7} cov={cov:<8} s={secs}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="both", choices=["stories", "minilm", "both"])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    if args.model in ("stories", "both"):
        rows += stories(args.nsamples)
    if args.model in ("minilm", "both"):
        rows += minilm(args.nsamples)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
