"""Sequential onloading at Llama-7B scale on a machine with less memory than the run would need.

1. ``write``: a Llama-7B-shaped model (32 layers, hidden 4096, intermediate 11008, vocab
   32000; random N(0, 0.02) weights) written once as bf16 safetensors, one shard per layer
   (about 13.5 GB), with a config and a byte-level tokenizer-free setup (calibration is token ids).
   ``--layers 2`` writes the 2-layer slice of the same shapes.
2. ``run``: ``lowbit quantize MODEL --onload`` under ``/usr/bin/time -v`` for each method, and
   the peak resident memory it reports, next to what ``lowbit plan`` says the in-memory run needs.

    python benchmarks/onload_7b.py write /data/llama7b-shaped
    python benchmarks/onload_7b.py write /data/llama7b-2layer --layers 2
    python benchmarks/onload_7b.py run /data/llama7b-shaped --methods rtn,gptq --calib-tokens 4x256 --extra=--no-mse
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
)


def write(out: Path, layers: int, seed: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=False)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype="bfloat16", architectures=["LlamaForCausalLM"], **SHAPE)  # fmt: skip
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    shards = [("embed", {"model.embed_tokens.weight": None})] + [(f"layer{i}", None) for i in range(layers)]
    shards.append(("head", None))
    for n, (tag, _) in enumerate(shards):
        if tag == "embed":
            tensors = {"model.embed_tokens.weight": rand(vocab, h)}
        elif tag == "head":
            tensors = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, h)}
        else:
            p = f"model.layers.{int(tag[5:])}."
            tensors = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}  # fmt: skip
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{proj}.weight"] = rand(h, h)
            tensors[p + "mlp.gate_proj.weight"] = rand(inter, h)
            tensors[p + "mlp.up_proj.weight"] = rand(inter, h)
            tensors[p + "mlp.down_proj.weight"] = rand(h, inter)
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
        print(f"wrote {name} ({sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    print(f"{out}: {total / 1e9:.2f} GB of bf16 weights, {layers} layers")


def peak_rss_kib(stderr: str) -> int:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(found.group(1)) if found else -1


def run(model: Path, methods: list[str], calib_tokens: str, work: Path, spill: bool, extra: list[str]) -> list[dict]:
    n, seqlen = (int(x) for x in calib_tokens.split("x"))
    calib = work / "calib.safetensors"
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, SHAPE["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(0))},
              str(calib))  # fmt: skip
    lowbit = [sys.executable, "-m", "lowbit"]
    plan = subprocess.run([*lowbit, "plan", str(model), "--method", methods[0], "--nsamples", str(n), "--seqlen",
                           str(seqlen), "--json"], capture_output=True, text=True, check=True)  # fmt: skip
    rows = [{"what": "plan (in memory)", **json.loads(plan.stdout)}]
    for method in methods:
        out = work / f"out-{method}"
        cmd = ["/usr/bin/time", "-v", *lowbit, "quantize", str(model), "--method", method, "--bits", "4",
               "--group-size", "128", "--onload", "--out", str(out), "--json"]  # fmt: skip
        if method != "rtn":
            cmd += ["--calib", str(calib)]
        if spill:
            cmd += ["--spill-activations"]
        if method != "rtn":
            cmd += extra
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"what": f"{method} --onload", "peak_rss_gib": peak_rss_kib(done.stderr) / 2**20,
                     "seconds": round(seconds, 1), "size_gb": result["size_bytes"] / 1e9,
                     "block_linears": f"{result['block_linears_quantized']}/{result['block_linears_total']}"})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("out", type=Path)
    w.add_argument("--layers", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("--methods", default="rtn,gptq")
    r.add_argument("--calib-tokens", default="4x256", help="calibration windows x tokens")
    r.add_argument("--work", type=Path, default=None)
    r.add_argument("--spill", action="store_true")
    r.add_argument("--extra", default="", help="more flags for the calibrated methods, e.g. --no-mse")
    args = ap.parse_args()
    if args.cmd == "write":
        write(args.out, args.layers, args.seed)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-onload-", dir=args.model.parent))
    work.mkdir(parents=True, exist_ok=True)
    rows = run(args.model, args.methods.split(","), args.calib_tokens, work, args.spill, args.extra.split())
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
