"""Weight-and-activation quantization: quality of every method, and the integer matmul's speed.

Quality (8-bit per-channel symmetric weights unless the row says otherwise):

- stories260K: calibrate on the first half of tinystories_dev.txt (128 windows of
  512 tokens, seed 0), perplexity on the second half, and the mean next-token KL
  divergence from fp32 on its first 64 chunks (fidelity: a 260K-parameter model's
  perplexity can move either way under small perturbations; KL only grows);
- all-MiniLM-L6-v2: calibrate on 128 WikiText-2 sentences from the first half of the
  file (batches of 16, padded, with [CLS]/[SEP] as in use), embedding cosine against
  fp32 on 256 sentences from the second half.

Speed: ``W8A8Linear`` (lowbit's kernel as ``auto`` picks it) against fp32
``nn.Linear`` on 4096x4096 at batch 1, 32 and 512, interleaved in one run, with
PyTorch's own int8 paths beside it (``torch._int_mm``, and FBGEMM's dynamic
quantized linear, which quantizes activations per tensor).

With ``--peer`` (and llm-compressor installed), the same models and calibration
data through llm-compressor: its W8A8 preset (per-channel int8 weights, per-token
dynamic int8 activations), its SmoothQuant before it, and a static per-tensor
variant. It has no SmoothQuant mappings for BERT; the rows for MiniLM use the
LayerNorm -> linear mappings a user would write, which fold into post-LayerNorm
norms that also feed the residual.

    python benchmarks/w8a8.py [--model stories|minilm|both] [--skip-quality] [--skip-speed] [--peer] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

import lowbit
from lowbit.assets import asset
from lowbit.data import calibration_windows, read_text, sentences, split_halves
from lowbit.eval import embedding_fidelity, kl_divergence, perplexity, token_chunks
from lowbit.formats import WeightFormat
from lowbit.models import load_pretrained
from lowbit.nn import W8A8Linear
from lowbit.quantized_weight import QuantizedWeight
from lowbit.timing import interleaved_times

W8 = {"bits": 8, "group_size": -1, "symmetric": True}
STATIC = {"act_bits": 8, "act_granularity": "tensor"}
TOKEN = {"act_bits": 8, "act_granularity": "token"}

# (label, recipe, config)
ROWS = [
    ("W8 weight-only", "rtn", W8),
    ("W8A8 naive, per-token dynamic", "rtn", {**W8, **TOKEN}),
    ("W8A8 naive, per-tensor static", "rtn", {**W8, **STATIC}),
    ("W8A8 naive, per-tensor static asym", "rtn", {**W8, **STATIC, "act_symmetric": False}),
    ("W8A8 naive, static, percentile observer", "rtn", {**W8, **STATIC, "act_observer": "percentile"}),
    ("W8A8 naive, static, mse observer", "rtn", {**W8, **STATIC, "act_observer": "mse"}),
    ("W8A8 naive, static, kl observer", "rtn", {**W8, **STATIC, "act_observer": "kl"}),
    ("W8A8 naive, static, ema observer", "rtn", {**W8, **STATIC, "act_observer": "ema"}),
    ("SmoothQuant alpha=0.5 (paper), static", "smoothquant+rtn", {**W8, **STATIC, "search": False}),
    ("SmoothQuant alpha search, static", "smoothquant+rtn", {**W8, **STATIC}),
    ("SmoothQuant alpha search, per-token", "smoothquant+rtn", {**W8, **TOKEN}),
    ("LLM.int8() (threshold 6)", "llmint8", {}),
    ("ZeroQuant W8 g128, per-token", "zeroquant", {"group_size": 128}),
    ("Outlier Suppression+, static", "osplus+rtn", {**W8, **STATIC}),
    ("RPTQ (32 clusters), static asym", "rptq+rtn", {**W8, **STATIC, "act_symmetric": False}),
    ("PEG (6 groups), static asym", "peg+rtn", {**W8, **STATIC, "act_symmetric": False}),
    ("W4A8 naive per-channel, per-token", "rtn", {"bits": 4, "group_size": -1, "symmetric": True, **TOKEN}),
    ("W4A8 ZeroQuant g128, per-token", "zeroquant", {"bits": 4, "group_size": 128}),
    ("W4A8 GPTQ g128, per-token", "gptq", {"bits": 4, "group_size": 128, "symmetric": True, **TOKEN}),
    ("W4A8 SmoothQuant+GPTQ g128, per-token", "smoothquant+gptq",
     {"bits": 4, "group_size": 128, "symmetric": True, **TOKEN}),
]  # fmt: skip


def quantized(model, recipe, config, calib):
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    lowbit.quantize(q, recipe, calib=calib, progress=False, **config)
    done, total = q.lowbit_coverage.block_counts()
    return q, {"seconds": round(time.perf_counter() - t0, 2), "coverage": f"{done}/{total}"}


def stories(nsamples: int) -> list[dict]:
    model, tok = load_pretrained(str(asset("stories260K")))
    first, second = split_halves(read_text(asset("text", "tinystories_dev.txt")))
    calib = calibration_windows(tok, first, nsamples, 512, seed=0)

    chunks = token_chunks(tok, second, 512)[:64]

    def ppl(m):
        return perplexity(m, tok, second, seqlen=512, progress=False)["ppl"]

    rows = [{"model": "stories260K", "scheme": "fp32", "ppl": ppl(model), "kl": 0.0}]
    _print(rows[-1])
    for label, recipe, config in ROWS:
        q, info = quantized(model, recipe, config, calib)
        rows.append({"model": "stories260K", "scheme": label, "ppl": ppl(q), "kl": kl_divergence(model, q, chunks),
                     **info})  # fmt: skip
        _print(rows[-1])
    return rows


def minilm(nsamples: int) -> list[dict]:
    model, tok = load_pretrained("minilm")
    lines = read_text(asset("text", "wikitext2_test_raw.txt")).splitlines()
    half = len(lines) // 2
    cal = sentences("\n".join(lines[:half]), limit=nsamples)
    test = sentences("\n".join(lines[half:]), limit=256)
    calib = [
        dict(tok(cal[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(cal), 16)
    ]
    rows = []
    for label, recipe, config in ROWS:
        q, info = quantized(model, recipe, config, calib)
        fid = embedding_fidelity(model, q, tok, test)
        rows.append({"model": "MiniLM", "scheme": label, "cosine": fid["cosine"], "min_cosine": fid["min_cosine"],
                     **info})  # fmt: skip
        _print(rows[-1])
    return rows


def speed(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    k = n = 4096
    fp32 = torch.nn.Linear(k, n)
    w = fp32.weight.detach()
    layers = {
        "W8A8 lowbit": W8A8Linear(QuantizedWeight.quantize(w, WeightFormat("int", 8, -1, True)), fp32.bias),
        "W4A8 g128 lowbit": W8A8Linear(QuantizedWeight.quantize(w, WeightFormat("int", 4, 128, True)), fp32.bias),
        "W8A8 torch._int_mm": W8A8Linear(
            QuantizedWeight.quantize(w, WeightFormat("int", 8, -1, True)), fp32.bias, kernel="int_mm"
        ),  # fmt: skip
    }
    fbgemm = _fbgemm_dynamic(fp32)
    rows = []
    for m in (1, 32, 512):
        x = torch.randn(m, k)
        fns = {
            "fp32 nn.Linear": lambda x=x: fp32(x),
            **{name: (lambda x=x, lay=lay: lay(x)) for name, lay in layers.items()},
        }
        if fbgemm is not None:
            fns["FBGEMM dynamic (per-tensor)"] = lambda x=x: fbgemm(x)
        reps = repeats if m < 512 else max(3, repeats // 3)
        if m == 512:  # the reference loop of _int_mm on CPUs without VNNI takes tens of seconds here
            fns.pop("W8A8 torch._int_mm")
        with torch.no_grad():
            t = interleaved_times(fns, repeats=reps)
        for name, seconds in t.items():
            rows.append({"shape": f"{k}x{n}", "batch": m, "kernel": name, "ms": seconds * 1e3,
                         "speedup_vs_fp32": t["fp32 nn.Linear"] / seconds})  # fmt: skip
            print(f"  batch {m:>3} {name:<28} {seconds * 1e3:9.3f} ms  {rows[-1]['speedup_vs_fp32']:5.2f}x", flush=True)
    return rows


PEER_ROWS = [
    ("llm-compressor W8A8 (per-token)", None, None),
    ("llm-compressor SmoothQuant 0.5 + W8A8", 0.5, None),
    ("llm-compressor SmoothQuant 0.8 + W8A8", 0.8, None),
    ("llm-compressor SmoothQuant 0.8 + W8A8 static", 0.8, "static"),
]
BERT_MAPPINGS = [
    [
        ["re:.*attention.self.query", "re:.*attention.self.key", "re:.*attention.self.value"],
        "re:.*embeddings.LayerNorm",
    ],
    [["re:.*intermediate.dense"], "re:.*attention.output.LayerNorm"],
]


def run_llmcompressor(model, samples: list[dict], strength, static, bert: bool):
    """llm-compressor on ``samples`` (tokenized inputs); ``(model, info)``, or ``(None, None)`` if absent."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        from loguru import logger
    except ImportError:
        return None, None
    logger.remove()
    q = copy.deepcopy(model)
    if static:
        args = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                      "dynamic": False}}  # fmt: skip
        quant = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], **args}}, ignore=["lm_head"])
    else:
        quant = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    recipe = [quant]
    if strength is not None:
        sq = {"smoothing_strength": strength}
        if bert:
            sq["mappings"] = BERT_MAPPINGS
        recipe = [SmoothQuantModifier(**sq), quant]
    data = Dataset.from_dict({k: [s[k] for s in samples] for k in samples[0]})
    t0 = time.perf_counter()
    try:
        oneshot(model=q, dataset=data, recipe=recipe, num_calibration_samples=len(samples),
                max_seq_length=max(len(s["input_ids"]) for s in samples))  # fmt: skip
    except Exception as e:  # report what the peer says, as its result
        return None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return q, {"seconds": round(time.perf_counter() - t0, 2), "coverage": "-"}


def peer(which: str, nsamples: int) -> list[dict]:
    rows = []
    if which in ("stories", "both"):
        model, tok = load_pretrained(str(asset("stories260K")))
        first, second = split_halves(read_text(asset("text", "tinystories_dev.txt")))
        calib = calibration_windows(tok, first, nsamples, 512, seed=0)
        samples = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib]
        for label, strength, static in PEER_ROWS:
            q, info = run_llmcompressor(model, samples, strength, static, bert=False)
            if info is None:
                return rows
            ppl = perplexity(q, tok, second, seqlen=512, progress=False)["ppl"] if q is not None else None
            rows.append({"model": "stories260K", "scheme": label, "ppl": ppl, **info})
            _print(rows[-1])
    if which in ("minilm", "both"):
        model, tok = load_pretrained("minilm")
        lines = read_text(asset("text", "wikitext2_test_raw.txt")).splitlines()
        half = len(lines) // 2
        cal = sentences("\n".join(lines[:half]), limit=nsamples)
        test = sentences("\n".join(lines[half:]), limit=256)
        samples = [dict(tok(s, truncation=True, max_length=128)) for s in cal]
        samples = [{k: v for k, v in s.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                   for s in samples]  # fmt: skip
        for label, strength, static in PEER_ROWS:
            q, info = run_llmcompressor(model, samples, strength, static, bert=True)
            if info is None:
                return rows
            fid = embedding_fidelity(model, q, tok, test) if q is not None else {"cosine": None, "min_cosine": None}
            rows.append({"model": "MiniLM", "scheme": label, "cosine": fid["cosine"], "min_cosine": fid["min_cosine"],
                         **info})  # fmt: skip
            _print(rows[-1])
    return rows


def _fbgemm_dynamic(linear):
    """PyTorch's FBGEMM dynamic int8 linear on the same weights, or ``None`` if this build lacks it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.quantized.engine = "fbgemm"
            w = linear.weight.detach()
            qw = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(w.shape[0], dtype=torch.long), 0,
                                            torch.qint8)  # fmt: skip
            packed = torch.ops.quantized.linear_prepack(qw, linear.bias.detach())
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    except (RuntimeError, AttributeError):
        return None


def _print(r: dict) -> None:
    if r.get("error"):
        metric = r["error"]
    elif "ppl" in r:
        metric = f"ppl {r['ppl']:.4f}" + (f"  KL {r['kl']:.5f}" if r.get("kl") is not None else "")
    else:
        metric = f"cosine {r['cosine']:.5f} (min {r['min_cosine']:.4f})"
    extra = f"  {r['seconds']:6.1f} s  {r['coverage']}" if "seconds" in r else ""
    print(f"{r['model']:<12} {r['scheme']:<42} {metric}{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("stories", "minilm", "both"), default="both")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--peer", action="store_true", help="also run llm-compressor (if installed) on the same data")
    ap.add_argument("--peer-only", action="store_true", help="only the llm-compressor rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = {}
    if args.peer_only:
        result["peer"] = peer(args.model, args.nsamples)
        if args.json:
            print(json.dumps(result))
        return
    if not args.skip_speed:
        result["speed"] = speed(args.repeats)
    if not args.skip_quality:
        result["quality"] = []
        if args.model in ("stories", "both"):
            result["quality"] += stories(args.nsamples)
        if args.model in ("minilm", "both"):
            result["quality"] += minilm(args.nsamples)
    if args.peer:
        result["peer"] = peer(args.model, args.nsamples)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
