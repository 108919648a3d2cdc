"""Weight-only PTQ quality: lowbit's methods against fp32, round-to-nearest and the peer toolkits,
every row on the same calibration windows and scored by the same evaluation.

MiniLM: calibrate on WikiText-2 windows (128 x 128 tokens) from the first half of the file;
1 - mean embedding cosine against fp32 on 256 sentences of the second half.
stories260K: calibrate on the first half of tinystories_dev.txt (128 windows of 512 tokens);
perplexity on the second half. SmolLM2-135M (its GGUF's weights as fp32): calibrate on
WikiText-2 windows (64 x 512) from the first half, perplexity on 48 chunks of 512 tokens of
the second half.

Peers, each measured in this run where it installs, on the same windows:
- llm-compressor's GPTQ, in this environment when installed;
- auto-round (SignRound, its defaults: 200 iterations, batch 8), HQQ (calibration-free) and
  bitsandbytes NF4, in their own environment through LOWBIT_PEERS_PYTHON (see
  benchmarks/peer_quantize.py); their checkpoints' codes and scales are decoded in fp32 and
  put into a copy of the fp32 model, so every row is evaluated by the same code.

    python benchmarks/llm_quality.py [--model minilm,stories,smollm2] [--configs w4g128,w3g128,w3pc,w2g64]
        [--methods rtn,gptq,awq+gptq,signround,spqr:group_size=16] [--peers autoround,hqq,bnb-nf4,llmcompressor] [--json OUT]

bpw: bits per weight the checkpoint stores (codes, scales, zero points) over the block linears.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.assets import asset
from lowbit.data import calibration_windows, read_text, sentences, split_halves
from lowbit.eval import embedding_fidelity, perplexity
from lowbit.eval.perplexity import token_chunks
from lowbit.models import load_pretrained

CONFIGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w3pc": (3, -1), "w2g64": (2, 64), "w4pc": (4, -1),
           "w4g32": (4, 32), "w3g32": (3, 32), "w2g32": (2, 32)}  # fmt: skip
PEER_SCRIPT = Path(__file__).with_name("peer_quantize.py")


def method_knobs(spec: str) -> tuple[str, dict]:
    """``"spqr:group_size=16:outlier_threshold=0.5"``: a method and knobs that override the column's."""
    name, *pairs = spec.split(":")
    knobs = {}
    for pair in pairs:
        k, _, v = pair.partition("=")
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        knobs[k] = {"True": True, "False": False, "None": None}.get(v, v) if isinstance(v, str) else v
    return name, knobs


def run_lowbit(model, method, calib, bits, group_size):
    q = copy.deepcopy(model)
    name, knobs = method_knobs(method)
    t0 = time.perf_counter()
    lowbit.quantize(q, name, calib=calib, **{"bits": bits, "group_size": group_size, **knobs}, progress=False)
    seconds = time.perf_counter() - t0
    done, total = q.lowbit_coverage.block_counts()
    return q, {"seconds": seconds, "bits_per_weight": q.lowbit_coverage.mean_bits_per_weight(),
               "coverage": f"{done}/{total}"}  # fmt: skip


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
    except Exception as e:  # noqa: BLE001 -- report what the peer says, as its result
        return None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return q, {"seconds": time.perf_counter() - t0, "bits_per_weight": None, "coverage": "-"}


def run_peer(toolkit, model, model_dir, kind, calib, bits, group_size, workdir):
    """A peer in its own environment (LOWBIT_PEERS_PYTHON): its decoded weights in a copy of ``model``."""
    python = os.environ.get("LOWBIT_PEERS_PYTHON")
    if not python:
        return None, None
    calib_file = Path(workdir) / "calib.safetensors"
    if not calib_file.exists():
        save_file({"input_ids": calib.contiguous()}, calib_file)
    out = Path(workdir) / f"{toolkit}-{bits}-{group_size}.safetensors"
    job = {"toolkit": toolkit, "model": str(model_dir), "kind": kind, "calib": str(calib_file), "bits": bits,
           "group_size": group_size, "out": str(out), "iters": ITERS[0]}  # fmt: skip
    job_file = Path(workdir) / "job.json"
    job_file.write_text(json.dumps(job))
    r = subprocess.run([python, str(PEER_SCRIPT), str(job_file)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return None, {"error": last[:160]}
    info = json.loads(r.stdout.strip().splitlines()[-1])
    q = copy.deepcopy(model)
    weights = load_file(out)
    for name, w in weights.items():
        q.get_submodule(name).weight.data.copy_(w)
    total = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer" in n)
    return q, {"seconds": info["seconds"], "bits_per_weight": info["bits_per_weight"],
               "coverage": f"{len(weights)}/{total}"}  # fmt: skip


def supports(toolkit, bits, group_size):
    if toolkit == "bnb-nf4":
        return bits == 4 and group_size != -1
    return True


DECODE = [32]  # greedy tokens timed per causal row (--decode; 0: off)
ITERS = [200]  # signround's and auto-round's steps per block (--iters)
SAVED: list = []  # every row so far, written to --json after each one (a cut-off run keeps what it measured)
JSON_PATH: list = []


def _keep(row: dict) -> None:
    SAVED.append(row)
    print(_fmt(row), flush=True)
    if JSON_PATH:
        Path(JSON_PATH[0]).write_text(json.dumps(SAVED, indent=1))


def decode_speed(fp32, q, rounds: int = 3) -> dict:
    """Greedy decode tokens/s of ``q`` on lowbit's kernels (its fused decoder step where the
    architecture has one) and its ratio to the fp32 model, rounds interleaved, medians."""
    from lowbit.generate import greedy_decode

    ids = (torch.arange(16)[None] * 7 + 3) % fp32.config.vocab_size
    with torch.no_grad():
        for m in (fp32, q):  # warm-up: packed layouts built, kernels loaded
            greedy_decode(m, ids, 4)
        ref, got = [], []
        for _ in range(rounds):
            ref.append(greedy_decode(fp32, ids, DECODE[0]).tokens_per_s)
            got.append(greedy_decode(q, ids, DECODE[0]).tokens_per_s)
    med = lambda v: sorted(v)[len(v) // 2]
    return {"decode_tok_s": med(got), "decode_x_fp32": med(got) / med(ref)}


def table(name, model, model_dir, kind, calib, score, metric, configs, methods, peers, workdir):
    rows = [{"model": name, "config": "fp32", "method": "fp32", metric: score(model)}]
    _keep(rows[-1])
    for cfg in configs:
        bits, g = CONFIGS[cfg]
        for method in methods:
            q, info = run_lowbit(model, method, calib, bits, g)
            if kind == "causal" and DECODE[0] > 0:
                info.update(decode_speed(model, q))
            rows.append({"model": name, "config": cfg, "method": method, metric: score(q), **info})
            _keep(rows[-1])
        for peer in peers:
            if not supports(peer, bits, g):
                continue
            if peer == "llmcompressor":
                q, info = run_llmcompressor(model, calib, bits, g)
            else:
                q, info = run_peer(peer, model, model_dir, kind, calib, bits, g, workdir)
            if info is None:
                continue
            rows.append({"model": name, "config": cfg, "method": peer, metric: score(q) if q is not None else None,
                         **info})  # fmt: skip
            _keep(rows[-1])
    return rows


def minilm(args, workdir):
    from lowbit.models.loading import minilm_dir

    model, tok = load_pretrained("minilm")
    lines = read_text(asset("text", "wikitext2_test_raw.txt")).splitlines()
    first, second = "\n".join(lines[: len(lines) // 2]), "\n".join(lines[len(lines) // 2 :])
    calib = calibration_windows(tok, first, args.nsamples or 128, 128, seed=0)
    evalset = sentences(second, limit=256)

    def score(m):
        return embedding_fidelity(model, m, tok, evalset)["cosine_loss"]

    return table("MiniLM", model, minilm_dir(), "encoder", calib, score, "cosine_loss", args.configs, args.methods,
                 args.peers, workdir)  # fmt: skip


def causal(name, model, tok, calib, held, args, workdir):
    d = Path(workdir) / "fp32"
    if args.peers and not d.exists():  # the peers read the same fp32 weights as a transformers directory
        model.save_pretrained(d)
        tok.save_pretrained(d)

    def score(m):
        return perplexity(m, tok, held, seqlen=512, progress=False)["ppl"]

    return table(name, model, d, "causal", calib, score, "ppl", args.configs, args.methods, args.peers, workdir)


def stories(args, workdir):
    model, tok = load_pretrained(str(asset("stories260K")))
    cal, test = split_halves(read_text(asset("text", "tinystories_dev.txt")))
    calib = calibration_windows(tok, cal, args.nsamples or 128, 512, seed=0)
    return causal("stories260K", model, tok, calib, test, args, workdir)


def smollm2(args, workdir):
    model, tok = load_pretrained(str(asset("smollm2-135m")))
    text = read_text(asset("text", "wikitext2_test_raw.txt"))
    cut = len(text) // 2
    calib = calibration_windows(tok, text[:cut], args.nsamples or 64, args.seqlen or 512, 0)
    held = tok.decode(token_chunks(tok, text[cut:], 512)[:48].reshape(-1))
    return causal("SmolLM2-135M", model, tok, calib, held, args, workdir)


def _fmt(r: dict) -> str:
    metric = "ppl" if "ppl" in r else "cosine_loss"
    value = r.get(metric)
    shown = f"{value:.4f}" if value is not None else r.get("error", "-")
    bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
    secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
    cov = r.get("coverage", "-")
    dec = f" decode={r['decode_tok_s']:.1f} tok/s ({r['decode_x_fp32']:.2f}x fp32)" if "decode_tok_s" in r else ""
    return (f"{r['model']:<14}{r['config']:<8}{r['method']:<16}{metric}={shown:<10} bpw={bpw:<7} cov={cov:<8} "
            f"s={secs}{dec}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm,stories", help="minilm, stories, smollm2 (comma-separated)")
    ap.add_argument("--configs", default="w4g128,w3g128,w3pc,w2g64", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--methods", default="rtn,gptq,awq+gptq,signround")
    ap.add_argument("--peers", default="autoround,hqq,bnb-nf4,llmcompressor")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default per model)")
    ap.add_argument("--json", default=None, help="write the rows here too")
    ap.add_argument("--seqlen", type=int, default=None, help="SmolLM2 only: tokens per calibration window (512)")
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens timed per causal row (0: off)")
    ap.add_argument("--iters", type=int, default=200, help="signround's and auto-round's steps per block")
    args = ap.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    args.methods = [m for m in args.methods.split(",") if m]
    if args.iters != 200:  # lowbit's signround takes the same step count as auto-round
        ITERS[0] = args.iters
        args.methods = [f"{m}:iters={args.iters}" if m == "signround" else m for m in args.methods]
    args.peers = [p for p in args.peers.split(",") if p]
    torch.manual_seed(0)
    if args.json:
        JSON_PATH.append(args.json)
    DECODE[0] = args.decode
    rows = []
    runners = {"minilm": minilm, "stories": stories, "smollm2": smollm2}
    for name in args.model.split(","):
        with tempfile.TemporaryDirectory() as workdir:
            rows += runners[name](args, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
