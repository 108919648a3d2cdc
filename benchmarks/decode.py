"""Greedy decode tokens/s at batch 1: transformers fp32 and bf16 against lowbit's weight-only
variants, interleaved rounds, medians and ratios to fp32 measured in the same run.

Models: stories260K (``../shared/assets``), a TinyLlama-1.1B-shaped random-init Llama
(hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000: the
weights dominate), and SmolLM2-135M when transformers can read its GGUF file (needs the
``gguf`` and ``accelerate`` packages). Each variant decodes ``--tokens`` new tokens after a
16-token prompt with ``lowbit.generate.greedy_decode``; the rounds interleave the variants.
The ``transformers`` rows run transformers' own forward (``fused=False``); the ``lowbit``
rows run lowbit's fused decoder step (``lowbit.fused_decode``), and ``lowbit fp32 (fused
step)`` is the unquantized model on that step, which separates what the step saves from
what the weights save.

A DRAM read probe (summing a 1 GiB tensor) gives the bandwidth; each variant's ceiling is
that bandwidth over the bytes it reads per token (every weight once: the quantized storage,
the float parameters left, the tied head), and its share of that ceiling is reported.

    python benchmarks/decode.py [--models stories260K,tinyllama,smollm2] [--threads 1,2]
                                [--tokens 16] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lowbit
import lowbit.assets
import lowbit.kernels.build
import lowbit.models.loading
from lowbit.generate import greedy_decode, step_profile
from lowbit.nn import QLinear

VARIANTS = {
    "lowbit w4 g128 asym": {"bits": 4, "group_size": 128, "symmetric": False},
    "lowbit w4 g32 sym": {"bits": 4, "group_size": 32, "symmetric": True},
    "lowbit int8 weight-only": {"bits": 8, "group_size": -1},
    "lowbit W8A8 (per-token int8)": {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8},
    "lowbit w4 g128 asym + head": {"bits": 4, "group_size": 128, "symmetric": False, "include_lm_head": True},
}


def dram_gbps(threads: int) -> float:
    """Read bandwidth: the best of five sums of a 1 GiB fp32 tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token: quantized storage plus every float parameter,
    an embedding as the one row it looks up unless it is also the (tied) head."""
    total, seen = 0, set()
    head = getattr(model, "lm_head", None)
    head_weight = getattr(head, "weight", None)
    for m in model.modules():
        if isinstance(m, QLinear):
            total += m.quantized_weight.storage_bits() // 8
        elif isinstance(m, torch.nn.Embedding) and m.weight is not head_weight:
            seen.add(id(m.weight))
            total += m.weight.shape[1] * m.weight.element_size()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def tinyllama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval()


def load(name: str):
    if name == "tinyllama":
        return tinyllama()
    if name == "smollm2":  # lowbit's GGUF reader: the same weights transformers' converter gives
        from lowbit.assets import asset

        name = str(asset("smollm2-135m"))
    model, _ = lowbit.models.loading.load_pretrained(name)
    return model


def variants_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {
        "transformers fp32": model,
        "transformers bf16": copy.deepcopy(model).to(torch.bfloat16),
        "lowbit fp32 (fused step)": model,
    }
    for name, kw in VARIANTS.items():
        out[name] = lowbit.quantize(copy.deepcopy(model), "rtn", progress=False, **kw)
    return out


def fused_of(name: str) -> bool | None:
    """transformers' rows run its own forward; lowbit's run the fused step wherever it applies."""
    return False if name.startswith("transformers") else None


def byte_tokenizer_dir(vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json (the 256 bytes, then padding) for GGUF export of a model
    without a tokenizer of its own (the random TinyLlama)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d = Path(tempfile.mkdtemp(prefix="lowbit_bytes_tok_"))
    chars = list(bytes_to_unicode().values())
    tj = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(chars[:256])}, "merges": []},
    }
    tj["model"]["vocab"][chars[32] + chars[116]] = 256  # one merge: llama.cpp needs at least one
    tj["model"]["merges"] = [f"{chars[32]} {chars[116]}"]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


def llama_cpp_variants(model: torch.nn.Module, mname: str) -> dict[str, Path]:
    """lowbit's w4 g32 sym and int8 g32 sym written by lowbit's GGUF export as Q4_0 and Q8_0
    (the codes as they are), when llama-cpp-python is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {}
    from lowbit.io.gguf_export import export_gguf

    tok_dir = lowbit.assets.asset("smollm2-135m") if mname == "smollm2" else None
    if mname == "stories260K":
        tok_dir = lowbit.assets.asset("stories260K")
    if tok_dir is None:
        tok_dir = byte_tokenizer_dir(model.config.vocab_size)
    out = {}
    for qtype, bits in (("q4_0", 4), ("q8_0", 8)):
        q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=bits, group_size=32, symmetric=True,
                            include_lm_head=True, progress=False)  # fmt: skip
        path = Path(tempfile.mkdtemp(prefix="lowbit_gguf_")) / f"{mname}-{qtype}.gguf"
        export_gguf(q, path, tok_dir, qtype)
        out[f"llama.cpp {qtype.upper()} (lowbit export)"] = path
        del q
    return out


def llama_cpp_tokens_per_s(path: Path, prompt: list[int], tokens: int, threads: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + tokens + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip
    llm.reset()
    llm.eval(prompt)
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(tokens - 1):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    rate = (tokens - 1) / (time.perf_counter() - t)
    llm.close()
    return rate


def run(models: list[str], threads: list[int], tokens: int, rounds: int) -> dict:
    rows, probes = [], {}
    for t in threads:
        probes[t] = dram_gbps(t)
    for mname in models:
        try:
            model = load(mname)
        except (ImportError, OSError, ValueError) as e:
            rows.append({"model": mname, "skipped": str(e).splitlines()[0]})
            continue
        ggufs = llama_cpp_variants(model, mname)
        nets = variants_of(model)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, min(model.config.vocab_size, 256), (1, 16), generator=gen)
        reads = {name: bytes_per_token(net) for name, net in nets.items()}
        cfg = model.config
        embd = 0 if cfg.tie_word_embeddings else (cfg.vocab_size - 1) * cfg.hidden_size * 4  # F32 rows not read
        reads.update({name: path.stat().st_size - embd for name, path in ggufs.items()})
        for t in threads:
            torch.set_num_threads(t)
            samples = {name: [] for name in nets}
            for name, net in nets.items():  # warm-up: kernels built, caches allocated
                greedy_decode(net, prompt, 3, fused=fused_of(name))
            samples.update({name: [] for name in ggufs})
            for _ in range(rounds):
                for name, net in nets.items():
                    samples[name].append(greedy_decode(net, prompt, tokens, fused=fused_of(name)).tokens_per_s)
                for name, path in ggufs.items():
                    samples[name].append(llama_cpp_tokens_per_s(path, prompt[0].tolist(), tokens, t))
            med = {name: statistics.median(v) for name, v in samples.items()}
            for name, tps in med.items():
                ceiling = probes[t] * 1e9 / reads[name]
                row = {
                    "model": mname,
                    "threads": t,
                    "variant": name,
                    "tokens_per_s": tps,
                    "vs_fp32": tps / med["transformers fp32"],
                    "MB_per_token": reads[name] / 1e6,
                    "ceiling_tokens_per_s": ceiling,
                    "share_of_ceiling": tps / ceiling,
                }
                if name.startswith("lowbit") and "W8A8" not in name:  # the timer sees the weight-only kernels
                    row["profile"] = step_profile(nets[name], prompt, steps=8, fused=fused_of(name))
                rows.append(row)
        del nets, model
    return {"dram_GBps": probes, "rows": rows, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260K,tinyllama,smollm2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.models.split(","), [int(t) for t in args.threads.split(",")], args.tokens, args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    flags = lowbit.kernels.build.cpu_flags()
    simd = " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))))
    print(f"torch {result['torch']}; CPU flags: {simd}")
    print("DRAM read probe: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in result["dram_GBps"].items()))
    head = f"{'model':<12}{'thr':>4} {'variant':<34}{'tok/s':>8}{'vs fp32':>9}{'MB/tok':>8}{'ceiling':>9}{'share':>7}"
    print(head + "  kernel share")
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['model']:<12} skipped: {r['skipped']}")
            continue
        prof = r.get("profile")
        extra = f"  {prof['kernel_share']:.0%} of {prof['step_ms']:.1f} ms" if prof else ""
        print(
            f"{r['model']:<12}{r['threads']:>4} {r['variant']:<34}{r['tokens_per_s']:>8.1f}{r['vs_fp32']:>8.2f}x"
            f"{r['MB_per_token']:>8.1f}{r['ceiling_tokens_per_s']:>9.1f}{r['share_of_ceiling']:>6.0%}{extra}"
        )


if __name__ == "__main__":
    main()
