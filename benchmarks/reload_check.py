"""Every method of the codebook / outlier / learned-rounding family through ``lowbit quantize`` on
the three language models, and each checkpoint reloaded exactly.

For each model and method:

1. ``lowbit quantize MODEL --method M --bits 4 ... --out DIR --json`` runs as a subprocess (the
   command a user types; each method's own group size and knobs unless given);
2. ``lowbit.load(DIR)`` runs a fixed input on lowbit's kernels (``QLinear(kernel="auto")``);
3. each quantized layer's kernel output on 12 random rows must equal ``F.linear`` of its stored
   weight decoded (``QuantizedWeight.dequantize()``) to 1e-5 relative (fp32 rounding); the
   whole model recomputed that way is reported beside it (``model_vs_stored_rel``: through 30
   layers the last-bit differences grow, to 6e-5 on SmolLM2);
4. ``lowbit.save`` of the loaded model and ``lowbit.load`` again must give the identical output
   (bit for bit) and identical files, so a checkpoint survives any number of round trips;
5. on the models where it is cheap (``--inproc``: stories260K and MiniLM by default), the same
   method run in this process through ``lowbit.quantize`` with the same calibration is saved
   and reloaded, and the reloaded output must equal the in-memory quantized model's bit for bit.

    python benchmarks/reload_check.py [--models stories,minilm,smollm2] [--methods ...] [--json out.json]

SmolLM2-135M is read from ``../shared/assets/smollm2-135m`` (its GGUF file converted once into an
fp32 transformers directory under ``--workdir``, so each subprocess does not convert it again).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.assets import asset
from lowbit.nn import QLinear

METHODS = {  # method: extra CLI arguments (signround: fewer steps, to fit a CPU run)
    "signround": ["--iters", "20"],
    "squeezellm": [],
    "spqr": [],
    "owq": [],
    "gobo": [],
    "bcq": [],
    "gptvq": [],
    "lorc": [],
    "rex": [],
    "deep_compression": [],
    "nf4": [],
    "hqq": [],
    "rtn:apot": ["--format", "apot", "--group-size", "64", "--mse"],
    "gptq:pot": ["--format", "pot", "--group-size", "64"],
    "gptq:log": ["--format", "log", "--group-size", "64"],
}


def model_source(name: str, workdir: Path) -> tuple[str, str]:
    """``(model path or id for the CLI, calibration text)``."""
    text = str(asset("text", "wikitext2_test_raw.txt"))
    if name == "stories":
        return str(asset("stories260K")), str(asset("text", "tinystories_dev.txt"))
    if name == "minilm":
        return "minilm", text
    if name == "smollm2":
        d = workdir / "smollm2-135m-fp32"
        if not (d / "config.json").exists():
            from lowbit.models import load_pretrained

            model, tok = load_pretrained(str(asset("smollm2-135m")))
            model.save_pretrained(d)
            tok.save_pretrained(d)
        return str(d), text
    raise SystemExit(f"unknown model {name!r}; choose stories, minilm or smollm2")


def probe_input(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (1, 12), generator=g)  # 12 rows: the GEMV kernels


def run(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def by_stored_tensors(loaded, ids: torch.Tensor) -> torch.Tensor:
    """The loaded model with each QLinear swapped for ``F.linear`` of its stored weight, decoded."""
    plain = copy.deepcopy(loaded)
    for name, m in list(plain.named_modules()):
        if isinstance(m, QLinear):
            w = m.quantized_weight.dequantize()
            bias = m.bias

            def forward(x, w=w, bias=bias):
                return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

            m.forward = forward
    return run(plain, ids)


def layer_errors(loaded) -> float:
    """The largest relative difference between a QLinear's kernel and ``F.linear`` of its decoded weight."""
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for m in loaded.modules():
        if isinstance(m, QLinear):
            x = torch.randn(12, m.quantized_weight.matrix_shape[1], generator=g)
            with torch.no_grad():
                ref = x @ m.quantized_weight.dequantize().t()
                if m.bias is not None:
                    ref = ref + m.bias.float()
                worst = max(worst, float((m(x) - ref).norm() / ref.norm().clamp(min=1e-30)))
    return worst


def files_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    fa = sorted(p.name for p in a.glob("*.safetensors"))
    if fa != sorted(p.name for p in b.glob("*.safetensors")):
        return False
    for f in fa:
        x, y = load_file(a / f), load_file(b / f)
        if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def check(model_name: str, method: str, args, workdir: Path) -> dict:
    name, _, fmt = method.partition(":")
    src, calib = model_source(model_name, workdir)
    out = workdir / f"{model_name}-{method.replace(':', '-')}"
    for d in (out, workdir / f"{out.name}-again", workdir / f"{out.name}-inproc"):
        shutil.rmtree(d, ignore_errors=True)
    for marker in workdir.glob(f".{out.name}.lowbit-progress*"):  # an earlier run of this check cut off
        shutil.rmtree(marker, ignore_errors=True) if marker.is_dir() else marker.unlink()
    cmd = [sys.executable, "-m", "lowbit", "quantize", src, "--method", name, "--bits", "4", "--calib", calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out), "--json",
           *METHODS[method]]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    row = {"model": model_name, "method": method, "cli_seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
        return row
    info = json.loads(r.stdout.strip().splitlines()[-1])
    row.update(format=info["format"], bits_per_weight=round(info["bits_per_weight"], 3),
               coverage=f"{info['block_linears_quantized']}/{info['block_linears_total']}")  # fmt: skip
    loaded = lowbit.load(out)
    ids = probe_input(loaded)
    y = run(loaded, ids)
    ref = by_stored_tensors(loaded, ids)
    row["model_vs_stored_rel"] = float((y - ref).norm() / ref.norm())
    row["kernel_vs_stored_rel"] = layer_errors(loaded)
    again = workdir / f"{out.name}-again"
    lowbit.save(loaded, again)
    y2 = run(lowbit.load(again), ids)
    row["resave_identical"] = bool(torch.equal(y, y2)) and files_equal(out, again)
    if model_name in args.inproc:
        from lowbit.data import calibration_windows, read_text
        from lowbit.models import load_pretrained

        base, tok = load_pretrained(src)
        windows = calibration_windows(tok, read_text(calib), args.nsamples, args.seqlen, seed=0)
        knobs = {"format": fmt} if fmt else {}
        extra = dict(zip(METHODS[method][::2], METHODS[method][1::2]))
        if "--iters" in extra:
            knobs["iters"] = int(extra["--iters"])
        if "--group-size" in extra:
            knobs["group_size"] = int(extra["--group-size"])
        if "--mse" in METHODS[method]:
            knobs["mse"] = True
        q = lowbit.quantize(base, name, bits=4, calib=windows, progress=False, **knobs)
        mem = run(q, ids)
        lowbit.save(q, workdir / f"{out.name}-inproc")
        back = run(lowbit.load(workdir / f"{out.name}-inproc"), ids)
        row["inproc_reload_identical"] = bool(torch.equal(mem, back))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories,minilm,smollm2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--inproc", default="stories,minilm", help="models to also quantize in this process")
    ap.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.inproc = [m for m in args.inproc.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model_name in args.models.split(","):
            for method in methods:
                row = check(model_name, method, args, workdir)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if "error" in r or not r.get("resave_identical") or r["kernel_vs_stored_rel"] > 1e-5
           or r.get("inproc_reload_identical") is False]  # fmt: skip
    print(f"{len(rows) - len(bad)}/{len(rows)} checkpoints reload exactly", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
