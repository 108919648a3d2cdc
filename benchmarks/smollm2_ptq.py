"""SmolLM2-135M read from its GGUF file: fp32 against RTN and GPTQ, held-out WikiText-2 perplexity.

    python benchmarks/smollm2_ptq.py [--settings rtn:4:128,gptq:4:128,rtn:3:128,gptq:3:128] [--chunks 48]

The fp32 reference is the Q4_1 file's dequantized weights (read by lowbit's GGUF reader).
Calibration: --nsamples windows of 512 tokens from the first half of the WikiText-2 test
file; perplexity on --chunks chunks of 512 tokens of its second half. Asymmetric int4 in
groups of 32 is lossless on these weights by construction, so compare at g64/g128, 3 bits.
"""

import argparse
import json
import time

import torch

import lowbit
from lowbit.assets import asset
from lowbit.data.calib import calibration_windows
from lowbit.data.text import read_text
from lowbit.eval.perplexity import perplexity, token_chunks
from lowbit.models import load_pretrained


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="rtn:4:128,gptq:4:128,rtn:3:128,gptq:3:128")
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    torch.manual_seed(0)
    text = read_text(asset("text", "wikitext2_test_raw.txt"))
    cut = len(text) // 2
    calib_text, held = text[:cut], text[cut:]
    model, tok = load_pretrained(str(asset("smollm2-135m")))
    held_text = tok.decode(token_chunks(tok, held, 512)[: args.chunks].reshape(-1))
    calib = calibration_windows(tok, calib_text, args.nsamples, 512, 0)

    def ppl(m):
        return perplexity(m, tok, held_text, 512, 8, progress=False)["ppl"]

    rows = [{"setting": "fp32", "ppl": ppl(model), "seconds": None}]
    print(f"fp32: ppl {rows[0]['ppl']:.2f}", flush=True)
    for setting in args.settings.split(","):
        method, bits, group = setting.split(":")
        m, _ = load_pretrained(str(asset("smollm2-135m")))
        t = time.time()
        lowbit.quantize(m, method, calib=calib, bits=int(bits), group_size=int(group), progress=False)
        secs = time.time() - t
        rows.append({"setting": f"{method} w{bits} g{group}", "ppl": ppl(m), "seconds": round(secs, 1)})
        print(f"{rows[-1]['setting']}: ppl {rows[-1]['ppl']:.2f}, quantized in {secs:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
