"""The model card: ``README.md`` beside the weights of every directory lowbit writes.

It says what the weights are and how to make them again: the source model, the recipe, the
calibration data (file, sha256, windows, seed), the coverage (what was quantized and what was
kept, with reasons), the bits per weight as stored, the evaluation results known when it was
written, and the command. Everything on it comes from the model's ``lowbit_*`` attributes, which
a checkpoint stores in its ``config.json`` (``quantization_config.provenance``) and ``lowbit.load``
restores, so re-saving a loaded checkpoint writes the same card. Writers put it into their
temporary directory, so it appears atomically with the weights.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from torch import nn

CARD = "README.md"

# How each kind of output directory is read back (shown on the card).
LOADERS = {
    "lowbit": "import lowbit\nmodel = lowbit.load({path!r})  # on lowbit's packed kernels",
    "compressed-tensors": "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained({path!r})  # or lowbit.load(...)",
    "gptq": "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained({path!r})  # GPTQModel / AutoGPTQ layout; or lowbit.load",
    "onnx": "import onnxruntime as ort\nsession = ort.InferenceSession({path!r} + '/model.onnx')  # QDQ int8 graph",
    "bitsandbytes": "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained({path!r})  # bitsandbytes NF4",
}


def lowbit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:
        return "unknown"


def cli_command() -> str:
    """The command line of this process as a user would type it (``lowbit ...``)."""
    args = sys.argv[1:]
    return shlex.join(["lowbit", *args])


def api_command(method, config: dict, calib=None) -> str:
    """``lowbit.quantize(...)`` as called (configs built by name; a config object is shown by its name)."""
    name = (
        method
        if isinstance(method, str)
        else "+".join(
            getattr(m, "name", type(m).__name__) for m in (method if isinstance(method, (list, tuple)) else [method])
        )
    )
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(config.items()) if v is not None)
    if calib is not None:
        shown = repr(str(calib)) if isinstance(calib, (str, os.PathLike)) else "calib"
        args = f"calib={shown}" + (", " + args if args else "")
    return f"lowbit.quantize(model, {name!r}{', ' + args if args else ''})"


def provenance_of(model: nn.Module) -> dict:
    return dict(getattr(model, "lowbit_provenance", None) or {})


def _fmt_bits(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _recipe_line(recipe: list[dict]) -> str:
    if not recipe:
        return "none (a float model)"
    parts = []
    for m in recipe:
        knobs = {k: v for k, v in m.items() if k != "method" and v is not None}
        keys = ("bits", "group_size", "symmetric", "format", "mse", "iters", "act_bits", "scale_bits")
        shown = ", ".join(f"{k}={knobs[k]}" for k in keys if k in knobs and knobs[k] != "")
        parts.append(f"{m['method']}({shown})" if shown else m["method"])
    return " + ".join(parts)


THIS_DIR = "path/to/this/directory"


def render(model: nn.Module, layout: str = "lowbit") -> str:
    """The card's Markdown for ``model`` written in ``layout`` (a key of ``LOADERS``). It names no output
    path, so a checkpoint copied or re-saved elsewhere keeps the same card."""
    prov = provenance_of(model)
    coverage = getattr(model, "lowbit_coverage", None)
    recipe = getattr(model, "lowbit_recipe", None) or []
    source = prov.get("source") or getattr(model, "lowbit_source", None) or type(model).__name__
    methods = "+".join(m["method"] for m in recipe) or "no method"
    article = "an" if layout[:1] in ("a", "e", "i", "o", "u") else "a"
    lines = [
        f"# {Path(str(source)).name}, {methods}",
        "",
        f"`{Path(str(source)).name}` quantized with lowbit ({methods}), written as {article} {layout} checkpoint.",
        "",
    ]
    rows = [
        ("source model", f"`{source}`"),
        ("family", getattr(model, "lowbit_family", None) or "-"),
        ("recipe", _recipe_line(recipe)),
    ]
    if coverage is not None:
        done, total = coverage.block_counts()
        rows += [("bits per weight", (f"{_fmt_bits(coverage.mean_bits_per_weight())} (quantized layers, every "
                                     "scale, zero point, codebook and outlier counted)")),
                 ("layers", (f"{len(coverage.quantized)} quantized ({done} of {total} block linears), "
                            f"{len(coverage.skipped)} kept in full precision"))]  # fmt: skip
    if prov.get("seconds") is not None:
        rows.append(("quantization time", f"{prov['seconds']:.1f} s"))
    rows.append(("versions", f"lowbit {prov.get('lowbit', '-')}, torch {prov.get('torch', '-')}"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]

    lines += ["## Calibration data", ""]
    cal = prov.get("calibration")
    if not cal:
        lines += ["None: this recipe reads no calibration data.", ""]
    else:
        if cal.get("path"):
            lines.append(f"- file: `{cal['path']}` (sha256 `{cal.get('file_sha256', '-')}`)")
        lines.append(
            f"- {cal.get('windows', '-')} windows of {cal.get('tokens_per_window', '-')} "
            f"tokens, sampled with seed {cal.get('seed', '-')}"
            if cal.get("tokens_per_window")
            else f"- {cal.get('windows', '-')} inputs, seed {cal.get('seed', '-')}"
        )
        lines += [f"- sha256 of the inputs as the model saw them: `{cal.get('sha256', '-')}`", ""]

    lines += ["## Coverage", ""]
    if coverage is None:
        lines += ["No coverage report (the model was not quantized by lowbit).", ""]
    else:
        lines += ["```", coverage.summary(), "```", ""]

    lines += ["## Evaluation", ""]
    evals = prov.get("evaluation") or []
    if evals:
        lines += ["| metric | value | data | command |", "|---|---|---|---|"]
        for e in evals:
            lines.append(f"| {e.get('metric')} | {e.get('value'):.4f} | {e.get('data', '-')} | "
                         f"`{e.get('command', '-')}` |")  # fmt: skip
        lines.append("")
    else:
        lines += [
            (
                "Not evaluated when written. Perplexity: `lowbit eval "
                f"{THIS_DIR} --ppl TEXTFILE`; CIFAR-10 top-1: `lowbit eval {THIS_DIR} --cifar10 PATH`."
            ),
            "",
        ]

    lines += [
        "## How it was made",
        "",
        "```bash" if (prov.get("command") or "").startswith("lowbit ") else "```python",
        prov.get("command") or "(not recorded)",
        "```",
        "",
    ]
    lines += ["## Loading it", "", "```python", LOADERS.get(layout, LOADERS["lowbit"]).format(path=THIS_DIR), "```", ""]
    return "\n".join(lines)


def write(model: nn.Module, directory: str | os.PathLike, layout: str = "lowbit") -> Path:
    """Write the card into ``directory`` (a writer's temporary directory, renamed into place with the weights)."""
    dest = Path(directory) / CARD
    dest.write_text(render(model, layout))
    return dest
