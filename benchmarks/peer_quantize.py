"""Quantize a model with a peer toolkit and write what its checkpoint decodes to, in fp32.

Runs in the peers' own environment (they pin other versions than lowbit's), called by
benchmarks/llm_quality.py through LOWBIT_PEERS_PYTHON:

    python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 && \\
        .venv-peers/bin/pip install auto-round==0.16.1 hqq==0.2.8 bitsandbytes==0.50.2
    .venv-peers/bin/python benchmarks/peer_quantize.py JOB.json

JOB.json: {"toolkit": "autoround" | "hqq" | "bnb-nf4", "model": DIR, "kind": "encoder" | "causal",
"calib": FILE.safetensors (input_ids, for autoround), "bits": B, "group_size": G, "out": FILE}.
The out file holds, for every linear layer the peer quantized, the weight its stored codes and
scales decode to, computed here in fp32 from those codes and scales (auto-round tunes a
CPU model in bf16; its codes and fp16 scales are what a runtime reads), and a JSON line with
the storage bits per weight of the peer's format and the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from safetensors.torch import load_file, save_file


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def load(job):
    import transformers as tf

    cls = tf.AutoModel if job["kind"] == "encoder" else tf.AutoModelForCausalLM
    model = cls.from_pretrained(job["model"], dtype=torch.float32).eval()
    return model, tf.AutoTokenizer.from_pretrained(job["model"])


def block_linears(model, names) -> list[str]:
    """The linears inside the repeated blocks (what lowbit quantizes; heads and poolers stay)."""
    return [n for n in names if ".layer." in n or ".layers." in n or ".h." in n]


def autoround(job, model, tok):
    from auto_round import AutoRound

    ids = load_file(job["calib"])["input_ids"]
    data = [{"input_ids": ids[i : i + 1], "attention_mask": torch.ones_like(ids[i : i + 1])} for i in range(len(ids))]
    g = job["group_size"]
    ar = AutoRound(model, tok, bits=job["bits"], group_size=g, sym=False, dataset=data, iters=job.get("iters", 200),
                   nsamples=len(ids), seqlen=ids.shape[1], batch_size=8, device_map="cpu")  # fmt: skip
    t0 = time.perf_counter()
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    out, bits, count = {}, 0, 0
    for name, m in linears(qmodel).items():
        scale = getattr(m, "scale", None)
        zp = getattr(m, "zp", None)
        if scale is None or zp is None:
            continue
        w = m.weight.float()
        rows, k = w.shape
        gs = k if g == -1 else g
        s = scale.float().reshape(rows, -1).repeat_interleave(gs, 1)[:, :k]
        z = zp.float().reshape(rows, -1).repeat_interleave(gs, 1)[:, :k]
        codes = torch.round(w / s) + z  # the codes auto-round stores (its weight is their bf16 dequantization)
        out[name] = ((codes - z) * s).contiguous()
        bits += w.numel() * job["bits"] + scale.numel() * 16 + zp.numel() * job["bits"]
        count += w.numel()
    return out, bits / max(count, 1), seconds


def hqq(job, model, tok):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    g = job["group_size"]
    cfg = BaseQuantizeConfig(nbits=job["bits"], group_size=None if g == -1 else g, axis=1)
    out, bits, count = {}, 0, 0
    t0 = time.perf_counter()
    for name in block_linears(model, linears(model)):
        lin = linears(model)[name]
        if g != -1 and lin.weight.numel() % g:
            continue  # HQQ groups the flattened weight (like bitsandbytes): the group must divide its size
        q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        out[name] = q.dequantize().float().reshape(lin.weight.shape).contiguous()
        meta = q.meta
        bits += lin.weight.numel() * job["bits"] + (meta["scale"].numel() + meta["zero"].numel()) * 16
        count += lin.weight.numel()
    return out, bits / max(count, 1), time.perf_counter() - t0


def bnb_nf4(job, model, tok):
    import bitsandbytes.functional as bf

    g = job["group_size"]
    out, bits, count = {}, 0, 0
    t0 = time.perf_counter()
    for name in block_linears(model, linears(model)):
        w = linears(model)[name].weight.detach().float()
        # bitsandbytes' blocks run along the flattened weight; its CPU dequantize kernel gets blocks
        # longer than a row wrong when given the 2-D shape, so both see the flat one
        packed, state = bf.quantize_4bit(w.reshape(-1), blocksize=g, quant_type="nf4")
        out[name] = bf.dequantize_4bit(packed, state).float().reshape(w.shape).contiguous()
        bits += w.numel() * 4 + state.absmax.numel() * 32
        count += w.numel()
    return out, bits / max(count, 1), time.perf_counter() - t0


TOOLKITS = {"autoround": autoround, "hqq": hqq, "bnb-nf4": bnb_nf4}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    torch.manual_seed(0)
    model, tok = load(job)
    weights, bpw, seconds = TOOLKITS[job["toolkit"]](job, model, tok)
    save_file(weights, job["out"])
    print(json.dumps({"bits_per_weight": bpw, "seconds": seconds, "layers": len(weights)}))


if __name__ == "__main__":
    main()
