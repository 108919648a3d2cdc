"""The main job on real pretrained models that work offline: quantize, then report
quality against the original, size, and speed as ratios measured in the same run."""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable

import torch
from torch import nn

import lowbit
from lowbit.assets import asset
from lowbit.data import read_text, sentences, split_halves
from lowbit.eval import embedding_fidelity, perplexity
from lowbit.generate import greedy_decode
from lowbit.models import load_pretrained
from lowbit.models.adapters import is_linear
from lowbit.nn import QLinear
from lowbit.timing import interleaved_times

# Used when WikiText-2 from the shared assets is not on this machine.
FALLBACK_SENTENCES = [
    "The river rose through the night and by morning the lower town was under water.",
    "She tuned the old piano herself, one string at a time, until it sounded right.",
    "Quantization stores each weight in a few bits instead of thirty-two.",
    "A committee of engineers reviewed the bridge before it opened to traffic.",
    "The museum keeps its oldest maps in a dark room at a constant temperature.",
    "He missed the last train and walked home along the frozen canal.",
    "Most of the island's electricity now comes from wind turbines on the ridge.",
    "The recipe calls for two cups of flour, a pinch of salt and cold butter.",
    "Astronomers measured the distance to the star by watching it shift over a year.",
    "The team rewrote the parser so that malformed input fails with a clear message.",
    "Children in the village learn to swim in the lake before they can read.",
    "The novel follows three sisters who inherit a failing vineyard in the hills.",
    "A small change in the interest rate can move the housing market for years.",
    "The violinist played the final movement faster than anyone had heard before.",
    "Rain had washed the chalk drawings from the pavement by the afternoon.",
    "The library extended its hours during the examination period in spring.",
]


def _linear_bytes(model: nn.Module) -> int:
    """Bytes of all linear weights as stored."""
    total_bits = 0
    for m in model.modules():
        if isinstance(m, QLinear):
            total_bits += m.quantized_weight.storage_bits()
        elif is_linear(m):
            total_bits += m.weight.numel() * m.weight.element_size() * 8
    return total_bits // 8


def _model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def busy_warning() -> str | None:
    """A warning when the machine is too busy to time (load average above its core count)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        return None
    cores = os.cpu_count() or 1
    if load > cores:
        return (f"this machine is busy (load average {load:.1f} on {cores} cores): the latencies are "
                "not reliable; rerun on an idle machine")  # fmt: skip
    return None


def _speed(ref: nn.Module, quant: nn.Module, inputs: dict, repeats: int = 15) -> dict:
    """Median latencies of the two models, called in turn round by round (interleaved), and the
    speed-up, fp32 time / quantized time (above 1: the quantized model is faster)."""
    with torch.no_grad():
        times = interleaved_times(
            {"fp32": lambda: ref(**inputs), "quantized": lambda: quant(**inputs)}, repeats=repeats, warmup=1
        )
    return {
        "fp32_ms": times["fp32"] * 1e3,
        "quantized_ms": times["quantized"] * 1e3,
        "time_ratio": times["quantized"] / times["fp32"],
        "speedup": times["fp32"] / times["quantized"],
        "repeats": repeats,
    }


def _size(ref: nn.Module, quant: nn.Module) -> dict:
    lin_ref = _linear_bytes(ref)
    lin_q = _linear_bytes(quant)
    return {
        "linear_fp32_mb": lin_ref / 1e6,
        "linear_quantized_mb": lin_q / 1e6,
        "quantized_bits_per_weight": quant.lowbit_coverage.mean_bits_per_weight(),
        "model_fp32_mb": _model_bytes(ref) / 1e6,
        "model_quantized_mb": _model_bytes(quant) / 1e6,
    }


MINILM_RECIPE = "SmoothQuant W8A8 (8-bit weights, 8-bit per-token activations, integer GEMM)"


def demo_minilm(log: Callable[[str], None]) -> dict:
    """MiniLM as an encoder is deployed: every call is a batch of token rows (compute-bound), so
    the recipe that makes it faster is integer activations (W8A8), not 4-bit weights alone."""
    log("MiniLM [1/5] loading all-MiniLM-L6-v2")
    model, tokenizer = load_pretrained("minilm")
    wiki = asset("text", "wikitext2_test_raw.txt")
    pool = sentences(read_text(wiki), limit=320) if wiki.exists() else FALLBACK_SENTENCES
    texts, calib_texts = (pool[:256], pool[256:]) if wiki.exists() else (pool, pool[::2])
    log(f"MiniLM [2/5] quantizing ({MINILM_RECIPE}, {len(calib_texts)} calibration sentences)")
    calib = [tokenizer(t, return_tensors="pt")["input_ids"] for t in calib_texts]
    quant = lowbit.quantize(
        copy.deepcopy(model), "smoothquant+rtn", bits=8, group_size=-1, symmetric=True, act_bits=8,
        calib=calib, progress=False,
    )  # fmt: skip
    log(f"MiniLM [3/5] embedding cosine on {len(texts)} {'WikiText-2' if wiki.exists() else 'built-in'} sentences")
    fid = embedding_fidelity(model, quant, tokenizer, texts)
    one = dict(tokenizer(texts[:1], return_tensors="pt"))
    batch = dict(tokenizer(texts[:32], padding=True, return_tensors="pt"))
    log("MiniLM [4/5] timing 1 sentence, fp32 and quantized interleaved, 15 rounds")
    speed_one = _speed(model, quant, one)
    log("MiniLM [5/5] timing 32 sentences, 5 rounds")
    speed_batch = _speed(model, quant, batch, repeats=5)
    return {
        "model": "all-MiniLM-L6-v2",
        "recipe": MINILM_RECIPE,
        "coverage": quant.lowbit_coverage.to_dict()["block_linears_quantized"],
        "embedding_cosine": fid["cosine"],
        "sentences": fid["sentences"],
        **_size(model, quant),
        "speed_1_sentence": speed_one,
        "speed_32_sentences": speed_batch,
    }


def _decode_speed(ref: nn.Module, quant: nn.Module, ids: torch.Tensor, tokens: int, repeats: int) -> dict:
    """Greedy decode tokens/s, interleaved rounds: fp32 as transformers runs it, the quantized model
    on lowbit's decode path (its fused decoder step where the architecture has one)."""
    samples = {"fp32": [], "quantized": []}
    greedy_decode(quant, ids, 2)  # warm-up: kernels built
    for _ in range(repeats):
        samples["fp32"].append(greedy_decode(ref, ids, tokens, fused=False).tokens_per_s)
        samples["quantized"].append(greedy_decode(quant, ids, tokens).tokens_per_s)
    fp32, q = statistics.median(samples["fp32"]), statistics.median(samples["quantized"])
    return {"fp32_tokens_per_s": fp32, "quantized_tokens_per_s": q, "speedup": q / fp32, "repeats": repeats}


def demo_stories(bits: int, group_size: int, log: Callable[[str], None]) -> dict:
    """stories260K as a language model is used: perplexity, and decoding one token at a time."""
    recipe = f"RTN w{bits} " + ("per-channel" if group_size == -1 else f"g{group_size}") + " weight-only"
    log("stories260K [1/4] loading")
    model, tokenizer = load_pretrained(str(asset("stories260K")))
    log(f"stories260K [2/4] quantizing ({recipe})")
    quant = lowbit.quantize(copy.deepcopy(model), "rtn", bits=bits, group_size=group_size, progress=False)
    _, test = split_halves(read_text(asset("text", "tinystories_dev.txt")))
    log("stories260K [3/4] perplexity on the second half of tinystories_dev.txt, fp32 and quantized")
    ppl_ref = perplexity(model, tokenizer, test, seqlen=512, progress=False)
    ppl_q = perplexity(quant, tokenizer, test, seqlen=512, progress=False)
    ids = tokenizer(test[:200], return_tensors="pt").input_ids[:, :16]
    log("stories260K [4/4] greedy decode of 64 tokens, fp32 and quantized interleaved, 7 rounds")
    speed = _decode_speed(model, quant, ids, tokens=64, repeats=7)
    return {
        "model": "stories260K",
        "recipe": recipe,
        "coverage": quant.lowbit_coverage.to_dict()["block_linears_quantized"],
        "ppl_fp32": ppl_ref["ppl"],
        "ppl_quantized": ppl_q["ppl"],
        "tokens": ppl_ref["tokens"],
        **_size(model, quant),
        "decode_64_tokens": speed,
    }


def _table(results: list[dict]) -> str:
    rows = [f"{'model':<18}{'metric':<34}{'fp32':>12}{'quantized':>14}"]
    for r in results:
        rows.append(f"{r['model']:<18}{'recipe: ' + r['recipe']}")
        if "embedding_cosine" in r:
            rows.append(f"{'':<18}{'embedding cosine vs fp32':<34}{1.0:>12.4f}{r['embedding_cosine']:>14.4f}")
        else:
            rows.append(
                f"{'':<18}{'perplexity (TinyStories, 2nd half)':<34}{r['ppl_fp32']:>12.4f}{r['ppl_quantized']:>14.4f}"
            )
        rows.append(f"{'':<18}{'linear weights MB':<34}{r['linear_fp32_mb']:>12.3f}{r['linear_quantized_mb']:>14.3f}")
        rows.append(f"{'':<18}{'quantized layers, bits per weight':<34}{32:>12}{r['quantized_bits_per_weight']:>14.3f}")
        rows.append(
            f"{'':<18}{'whole model MB (in memory)':<34}{r['model_fp32_mb']:>12.3f}{r['model_quantized_mb']:>14.3f}"
        )
        for key, value in r.items():
            if key.startswith("speed_"):
                what = key.removeprefix("speed_").replace("_", " ")
                rows.append(
                    f"{'':<18}{'latency ms, ' + what:<34}{value['fp32_ms']:>12.2f}"
                    f"{value['quantized_ms']:>14.2f}  ({value['speedup']:.2f}x the speed of fp32)"
                )
            elif key.startswith("decode_"):
                what = key.removeprefix("decode_").replace("_", " ")
                rows.append(
                    f"{'':<18}{'decode tokens/s, ' + what:<34}{value['fp32_tokens_per_s']:>12.1f}"
                    f"{value['quantized_tokens_per_s']:>14.1f}  ({value['speedup']:.2f}x the speed of fp32)"
                )
    rows.append("speed: medians of interleaved rounds, above 1x the quantized model is faster; decode: fp32 as")
    rows.append("transformers runs it, quantized on lowbit's decode path (fused decoder step, packed kernels)")
    return "\n".join(rows)


def run_demo(which: str = "default", bits: int = 4, group_size: int = 128, log: Callable[[str], None] = print) -> dict:
    which = which.lower()
    if which not in ("default", "minilm", "stories260k"):
        raise ValueError(f"unknown demo model {which!r}; choose minilm, stories260K or default")
    results = []
    warning = busy_warning()
    if warning:
        log(f"warning: {warning}")
    if which in ("default", "minilm"):
        results.append(demo_minilm(log))
    if which == "stories260k" or (which == "default" and asset("stories260K").is_dir()):
        if not asset("stories260K").is_dir():
            raise FileNotFoundError(f"stories260K is not at {asset('stories260K')}; set LOWBIT_ASSETS")
        results.append(demo_stories(bits, group_size, log))
    warning = warning or busy_warning()
    table = _table(results)
    if warning:
        table += f"\nwarning: {warning}"
    return {
        "warning": warning,
        "results": results,
        "table": table,
    }
