"""Integer-only inference (I-ViT, I-BERT): the CIFAR ViT and MiniLM computed with integers only between
input and output (``lowbit.nn.integer``), against fp32 on the same inputs, and their speed as a ratio to
fp32 measured in the same run (interleaved rounds).

    python benchmarks/integer_only.py [--images 10000] [--sentences 256] [--json out.json]

ViT: top-1 on a class-balanced, seeded subset of the CIFAR-10 test JPEGs, calibrated on 256 training
images, both recipes (``ivit``: Shiftmax, ShiftGELU, I-LayerNorm; ``ibert``: i-exp, i-GELU, integer-root
LayerNorm). MiniLM: mean-pooled embedding cosine to fp32 on held-out WikiText-2 lines (the last lines of
the file), calibrated on its first 128 lines. Speed: the integer model in PyTorch (``torch._int_mm`` and
integer elementwise ops) and the exported integer ONNX graph in ONNX Runtime, each against fp32 PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowbit.assets import asset  # noqa: E402
from lowbit.data.cifar10 import load_cifar10  # noqa: E402
from lowbit.data.text import read_text, sentences  # noqa: E402
from lowbit.eval.classification import top1  # noqa: E402
from lowbit.eval.fidelity import embedding_fidelity  # noqa: E402
from lowbit.models.loading import load_model, load_pretrained, normalization  # noqa: E402
from lowbit.nn.integer import integer_bert, integer_vit  # noqa: E402


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns within every round."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm up
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    rows = []
    model, _ = load_model("vit_cifar")
    norm = normalization(model)
    root = asset("cifar10")
    calib, _ = load_cifar10(root / "cifar10_train_jpeg.tar.gz", "train", 256, 0, norm)
    x, y = load_cifar10(root / "cifar10_test_jpeg.tar.gz", "test", args.images, 0, norm)
    fp32 = top1(model, x, y, progress=False)
    print(f"ViT fp32 top1 {fp32:.2f} on {len(y)} test images", flush=True)
    for recipe in ("ivit", "ibert"):
        t0 = time.perf_counter()
        im = integer_vit(model, list(calib.split(64)), recipe)
        seconds = time.perf_counter() - t0
        acc = top1(im, x, y, progress=False)
        exact = bool(torch.equal(im(x[:32]), im.simulate(x[:32])))
        rows.append({"model": "vit_cifar", "recipe": recipe, "fp32_top1": fp32, "top1": acc, "build_s": round(seconds, 1),
                     "equals_simulation": exact})  # fmt: skip
        print(f"ViT {recipe}: top1 {acc:.2f} (fp32 {fp32:.2f}), integer == float64 simulation: {exact}", flush=True)
        if recipe == "ivit":
            with tempfile.TemporaryDirectory() as d:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = torch.get_num_threads()
                # ONNX Runtime's threads spin after each run by default, stealing the next timed call's CPU
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sess = ort.InferenceSession(str(im.export_onnx(Path(d) / "vit.onnx")), opts)
                for bs in (1, 64):
                    xb = x[:bs]
                    t = interleaved({"fp32": lambda: model(xb), "integer": lambda: im(xb),
                                     "onnx_int": lambda: sess.run(None, {"images": xb.numpy()})}, 9)  # fmt: skip
                    r = {"model": "vit_cifar", "recipe": recipe, "batch": bs,
                         "speed_vs_fp32_torch": t["fp32"] / t["integer"], "speed_vs_fp32_onnx": t["fp32"] / t["onnx_int"]}  # fmt: skip
                    rows.append(r)
                    print(f"ViT batch {bs}: integer (torch) {r['speed_vs_fp32_torch']:.2f}x fp32, "
                          f"integer ONNX Runtime {r['speed_vs_fp32_onnx']:.2f}x fp32", flush=True)  # fmt: skip

    bert, tok = load_pretrained("minilm")
    lines = sentences(read_text(asset("text", "wikitext2_test_raw.txt")))
    cal, held = lines[:128], lines[-args.sentences :]
    batches = [dict(tok(cal[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(cal), 32)]  # fmt: skip
    for recipe in ("ibert", "ivit"):
        t0 = time.perf_counter()
        ib = integer_bert(bert, batches, recipe)
        seconds = time.perf_counter() - t0
        fid = embedding_fidelity(bert, ib, tok, held)
        rows.append({"model": "all-MiniLM-L6-v2", "recipe": recipe, "cosine": fid["cosine"], "min_cosine": fid["min_cosine"],
                     "build_s": round(seconds, 1)})  # fmt: skip
        print(
            f"MiniLM {recipe}: embedding cosine {fid['cosine']:.4f} (min {fid['min_cosine']:.4f}) on {len(held)} sentences",
            flush=True,
        )
        if recipe == "ibert":
            one = dict(tok(held[:1], return_tensors="pt"))
            many = dict(tok(held[:32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for label, enc in (("1 sentence", one), ("32 sentences", many)):
                enc = {k: v for k, v in enc.items() if k != "token_type_ids"}
                t = interleaved({"fp32": lambda: bert(**enc), "integer": lambda: ib(**enc)}, 7)
                rows.append(
                    {
                        "model": "all-MiniLM-L6-v2",
                        "recipe": recipe,
                        "input": label,
                        "speed_vs_fp32_torch": t["fp32"] / t["integer"],
                    }
                )
                print(f"MiniLM {label}: integer (torch) {t['fp32'] / t['integer']:.2f}x fp32", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
