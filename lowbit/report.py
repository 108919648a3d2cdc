"""The comparison report: ``results.csv`` and a self-contained ``index.html`` (inline CSS and SVG
plots, nothing fetched from a network).

The page has the results table, a quality-versus-bits plot with the Pareto front (the runs no
other run beats at fewer or equal bits), a plot of each quantized layer's relative output error per
run, and each row's command and versions. Plots are drawn with matplotlib (``pip install
'lowbit[report]'``); without it the page says so and keeps the table.
"""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path

PPL = {"key": "ppl", "label": "perplexity", "higher_is_better": False}  # results written before "metric" existed
COLUMNS = [  # (key, heading, format); the metric's column goes second
    ("name", "run", "{}"),
    ("bits_per_weight", "bits / weight", "{:.3f}"),
    ("size_bytes", "size (MB)", "mb"),
    ("quant_seconds", "quantization (s)", "{:.1f}"),
    ("decode_tok_s", "decode (tok/s)", "{:.1f}"),
    ("decode_x_fp32", "decode vs fp32", "{:.2f}x"),
    ("layers_quantized", "layers quantized", "{}"),
]
CSV_KEYS = ["name", "method", "bits", "group_size", "ppl", "top1", "eval_count", "bits_per_weight", "size_bytes",
            "quant_seconds", "decode_tok_s", "fp32_decode_tok_s", "decode_x_fp32", "layers_quantized",
            "layers_skipped", "dir", "command", "eval_command", "lowbit", "torch"]  # fmt: skip

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.pareto td:first-child { font-weight: bold; }
code { font-size: 0.85em; background: #f4f4f4; padding: 1px 3px; word-break: break-all; }
.plot svg { max-width: 100%; height: auto; }
.note { color: #666; font-size: 0.9em; }
"""


def pareto(rows: list[dict], metric: dict | None = None) -> set[str]:
    """Names of the runs on the Pareto front of (bits per weight, quality): no other run is at least as good on
    both and better on one (quality: the metric's key, lower is better unless ``higher_is_better``)."""
    metric = metric or PPL
    sign = -1.0 if metric["higher_is_better"] else 1.0
    pts = [(r["bits_per_weight"], sign * r[metric["key"]], r["name"]) for r in rows
           if r.get("bits_per_weight") is not None and r.get(metric["key"]) is not None]  # fmt: skip
    front = set()
    for b, p, n in pts:
        if not any((b2 <= b and p2 < p) or (b2 < b and p2 <= p) for b2, p2, _ in pts):
            front.add(n)
    return front


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_KEYS})


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue and doctype: the SVG goes inline


def plots(rows: list[dict], metric: dict | None = None) -> tuple[str, str] | None:
    """``(pareto_svg, layer_error_svg)``, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = metric or PPL
    key = metric["key"]
    quantized = [r for r in rows if r["name"] != "fp32" and r.get(key) is not None and r.get("bits_per_weight")]
    front = pareto(quantized, metric)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in quantized:
        on = r["name"] in front
        ax.scatter(r["bits_per_weight"], r[key], s=40 if on else 25, zorder=3,
                   color="tab:blue" if on else "tab:gray")  # fmt: skip
        ax.annotate(r["name"], (r["bits_per_weight"], r[key]), textcoords="offset points", xytext=(4, 4),
                    fontsize=6 if len(quantized) > 8 else 7)
    pts = sorted((r["bits_per_weight"], r[key]) for r in quantized if r["name"] in front)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", lw=1, label="Pareto front")
    base = next((r for r in rows if r["name"] == "fp32"), None)
    if base is not None:
        ax.axhline(base[key], color="tab:green", ls="--", lw=1, label=f"fp32 ({base[key]:.3f})")
    if not metric["higher_is_better"]:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (as stored, every overhead counted)")
    ax.set_ylabel(metric["label"] + ("" if metric["higher_is_better"] else " (log scale)"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    pareto_svg = _svg(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.2))
    names: list[str] = []
    for r in quantized:
        for n in r.get("layer_error") or {}:
            if n not in names:
                names.append(n)
    # one colour per method, one line style per width, so a dozen runs stay tellable apart
    methods = list(dict.fromkeys(str(r.get("method")) for r in quantized))
    widths = list(dict.fromkeys(r.get("bits") for r in quantized))
    palette, styles = plt.get_cmap("tab10"), ["-", "--", ":", "-."]
    for r in quantized:
        errs = r.get("layer_error") or {}
        xs = [i for i, n in enumerate(names) if n in errs]
        ax.plot(xs, [errs[names[i]] for i in xs], marker=".", lw=1, ms=4, label=r["name"],
                color=palette(methods.index(str(r.get("method"))) % 10),
                ls=styles[widths.index(r.get("bits")) % len(styles)])  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("quantized layer, in model order")
    ax.set_ylabel("relative output error")
    ax.grid(True, which="both", alpha=0.3)
    if quantized:
        ax.legend(fontsize=7, ncol=2)
    step = max(1, len(names) // 12)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([names[i] for i in range(0, len(names), step)], rotation=60, ha="right", fontsize=6)
    layer_svg = _svg(fig)
    plt.close(fig)
    return pareto_svg, layer_svg


def render(data: dict) -> str:
    rows = data.get("rows", [])
    metric = data.get("metric") or PPL
    columns = [COLUMNS[0], (metric["key"], metric["label"], "{:.4f}" if metric["key"] == "ppl" else "{:.2f}"),
               *COLUMNS[1:]]  # fmt: skip
    front = pareto([r for r in rows if r["name"] != "fp32"], metric)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in columns)
    body = []
    for r in rows:
        cls = ' class="pareto"' if r["name"] in front else ""
        cells = "".join(f"<td>{esc(_cell(r.get(k), f))}</td>" for k, _, f in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    drawn = plots(rows, metric)
    if drawn is None:
        figures = ('<p class="note" id="no-plots">Plots need matplotlib: <code>pip install '
                   "'lowbit[report]'</code>, then run the same command again (finished rows are kept).</p>")  # fmt: skip
    else:
        figures = (f'<h2>Quality against bits per weight</h2><div class="plot" id="pareto-plot">{drawn[0]}</div>'
                   f'<h2>Each quantized layer\'s output error</h2><p class="note">Relative error of each quantized '
                   "layer's output in the quantized model against the same layer's output in the float model, both "
                   "running the same calibration windows: the error the model carries at that layer (the layers "
                   "before it included), up to one scale per output channel (which AWQ-style transforms move "
                   f'between layers).</p><div class="plot" id="layer-plot">{drawn[1]}</div>')  # fmt: skip
    repro = []
    for r in rows:
        cmd = r.get("command") or "(the float model)"
        evalc = r.get("eval_command") or ""
        repro.append(f"<li><b>{esc(r['name'])}</b>: <code>{esc(cmd)}</code>"
                     + (f"<br>evaluated: <code>{esc(evalc)}</code>" if evalc else "")
                     + f" <span class='note'>lowbit {esc(str(r.get('lowbit')))}, torch {esc(str(r.get('torch')))}"
                     "</span></li>")  # fmt: skip
    calib = data.get("calib")
    if metric["key"] == "ppl":
        sample = f"{data.get('nsamples')} windows of {data.get('seqlen')} tokens"
        scored = (f"perplexity on <code>{esc(str(data.get('eval')))}</code> in chunks of {data.get('eval_seqlen')} "
                  "tokens")  # fmt: skip
    else:
        sample = f"{data.get('nsamples')} training images"
        limit = data.get("eval_limit")
        scored = (f"top-1 on <code>{esc(str(data.get('eval')))}</code>"
                  + (f" ({limit} test images, class-balanced)" if limit else " (all test images)"))  # fmt: skip
    setup = (f"Model <code>{esc(str(data.get('model')))}</code>; calibration "
             + (f"<code>{esc(calib)}</code>, {sample}, seed {data.get('seed')} (the same for every run)"
                if calib else "none")
             + f"; {scored}, as <code>lowbit eval</code> computes it.")  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lowbit compare: {esc(str(data.get('model')))}</title>
<style>{STYLE}</style></head>
<body>
<h1>lowbit compare: {esc(str(data.get('model')))}</h1>
<p>{setup}</p>
<p class="note">Reproduce the whole comparison: <code>{esc(str(data.get('command')))}</code></p>
<h2>Results</h2>
<table id="results"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<p class="note">Bold: on the Pareto front (no other run is better at fewer or equal bits per weight).
Decode: greedy tokens/s at batch 1 on lowbit's kernels, timed in interleaved rounds beside the fp32 model.</p>
{figures}
<h2>Commands</h2>
<ul id="commands">{''.join(repro)}</ul>
</body></html>
"""


def write_report(out: str | os.PathLike, data: dict) -> Path:
    """``results.csv`` and ``index.html`` in ``out`` (each written whole, then renamed)."""
    out = Path(out)
    tmp = out / "results.csv.tmp"
    write_csv(tmp, data.get("rows", []))
    os.replace(tmp, out / "results.csv")
    tmp = out / "index.html.tmp"
    tmp.write_text(render(data))
    os.replace(tmp, out / "index.html")
    return out / "index.html"
