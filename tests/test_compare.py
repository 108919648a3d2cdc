"""lowbit compare: the runs share one calibration sample and one evaluation, the numbers equal what
``lowbit eval`` gives for the same directories, the report renders (in a real browser where
Chromium is installed), finished rows are not computed again, and every run has its model card."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lowbit
import lowbit.compare
from lowbit.assets import asset
from lowbit.compare import Comparison, compare, layer_errors, settings
from lowbit.report import pareto, render

STORIES = asset("stories260K")
TEXT = asset("text", "tinystories_dev.txt")
pytestmark = pytest.mark.skipif(not (STORIES / "config.json").exists() or not TEXT.exists(),
                                reason="stories260K or its text is not in ../shared/assets")  # fmt: skip


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories_head.txt"
    path.write_text(TEXT.read_text()[:24000])
    return path


KW = {"nsamples": 4, "seqlen": 64, "eval_seqlen": 128, "decode_tokens": 4, "progress": False}


@pytest.fixture(scope="module")
def report(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("cmp") / "report"
    rows = compare("stories260K", ["rtn", "gptq"], [4, 3], [32], out=out, calib=small_text, eval_text=small_text,
                   **KW)  # fmt: skip
    return out, rows


def test_settings_and_names():
    got = [s.name for s in settings(["rtn", "awq+gptq"], [4, 3], [32, None, -1])]
    assert got == ["rtn-w4g32", "rtn-w4", "rtn-w4pc", "rtn-w3g32", "rtn-w3", "rtn-w3pc",
                   "awq+gptq-w4g32", "awq+gptq-w4", "awq+gptq-w4pc", "awq+gptq-w3g32", "awq+gptq-w3", "awq+gptq-w3pc"]


def test_pareto_front():
    rows = [{"name": "a", "bits_per_weight": 4.0, "ppl": 5.0}, {"name": "b", "bits_per_weight": 4.0, "ppl": 6.0},
            {"name": "c", "bits_per_weight": 3.0, "ppl": 7.0}, {"name": "d", "bits_per_weight": 3.5, "ppl": 7.5}]
    assert pareto(rows) == {"a", "c"}


def test_rows_files_and_cards(report, small_text):
    out, rows = report
    names = [r["name"] for r in rows]
    assert names == ["fp32", "rtn-w4g32", "rtn-w3g32", "gptq-w4g32", "gptq-w3g32"]
    data = json.loads((out / "results.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    with open(out / "results.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == names
    fp32 = rows[0]
    for r in rows[1:]:
        assert r["bits_per_weight"] == pytest.approx(4.643 if r["bits"] == 4 else 3.611, abs=1e-3)
        assert r["ppl"] > fp32["ppl"] and r["eval_count"] == fp32["eval_count"]
        assert r["size_bytes"] > 0 and r["quant_seconds"] > 0 and r["decode_tok_s"] > 0
        errs = r["layer_error"]
        assert len(errs) == r["layers_quantized"] == 35
        assert all(0 < e < 1 for e in errs.values())
        card = (out / "runs" / r["name"] / "README.md").read_text()
        assert r["command"] in card and f"{r['ppl']:.4f}" in card and "## Calibration data" in card
        assert r["command"].startswith(f"lowbit quantize stories260K --method {r['method']} --bits {r['bits']} ")
    # GPTQ against RTN at the same width, layer by layer: error feedback lowers most layers' error
    by = {r["name"]: r["layer_error"] for r in rows[1:]}
    better = sum(by["gptq-w3g32"][n] < by["rtn-w3g32"][n] for n in by["rtn-w3g32"])
    assert better >= 30
    page = (out / "index.html").read_text()
    assert page.count("<tr") == 1 + len(rows) and page.count("<svg") == 2 and "http" not in page.split("<svg")[0]


def test_results_equal_lowbit_eval(report, small_text):
    _, rows = report
    from lowbit.eval import perplexity

    r = rows[3]  # gptq-w4g32
    model = lowbit.load(r["dir"])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(r["dir"])
    assert perplexity(model, tok, small_text.read_text(), seqlen=128, batch_size=8, progress=False)["ppl"] == r["ppl"]
    got = subprocess.run([sys.executable, "-m", "lowbit", *r["eval_command"].split()[1:], "--json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(got.stdout)["ppl"] == r["ppl"]


def test_resume_and_directories(report, small_text, monkeypatch, tmp_path):
    out, rows = report

    def refuse(*a, **k):
        raise AssertionError("a finished row was computed again")

    monkeypatch.setattr(lowbit.compare, "quantize", refuse)
    again = compare("stories260K", ["rtn", "gptq"], [4, 3], [32], out=out, calib=small_text, eval_text=small_text,
                    **KW)  # fmt: skip
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]
    # a finished directory given as an argument is evaluated the same way
    other = tmp_path / "mine"
    shutil.copytree(rows[1]["dir"], other)
    more = compare("stories260K", ["rtn"], [4], [32], out=out, calib=small_text, eval_text=small_text, dirs=[other],
                   **KW)  # fmt: skip
    assert more[-1]["name"] == "mine" and more[-1]["ppl"] == rows[1]["ppl"]
    assert more[-1]["layer_error"] == pytest.approx(rows[1]["layer_error"])


def test_refusals(tmp_path, small_text):
    with pytest.raises(ValueError, match="--eval"):
        Comparison("stories260K", tmp_path / "r", calib=small_text, **KW)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps({"model": "other", "eval": "e", "rows": []}))
    with pytest.raises(ValueError, match="another --out"):
        Comparison("stories260K", tmp_path / "x", calib=small_text, eval_text=small_text, **KW)


def _aligned_error(q_outs, f_outs):
    qq = sum(q.pow(2).sum(0) for q in q_outs)
    ff = sum(f.pow(2).sum(0) for f in f_outs)
    qf = sum((q * f).sum(0) for q, f in zip(q_outs, f_outs))
    return float(((ff - qf.pow(2) / qq).sum() / ff.sum()).sqrt())


def test_layer_errors_are_each_layers_output_against_the_float_models():
    import copy

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    q = lowbit.quantize(copy.deepcopy(ref), "rtn", bits=2, group_size=32, progress=False)
    x = [torch.randn(8, 64) for _ in range(2)]
    errs = layer_errors(ref, q, x)
    assert set(errs) == {"0", "2"}
    with torch.no_grad():  # each layer's output in each model, the error accumulated up to it
        assert errs["0"] == pytest.approx(_aligned_error([q[0](b) for b in x], [ref[0](b) for b in x]), rel=1e-5)
        assert errs["2"] == pytest.approx(_aligned_error([q(b) for b in x], [ref(b) for b in x]), rel=1e-5)
    assert 0.05 < errs["0"] < errs["2"] < 1


def test_layer_errors_ignore_per_channel_scales_moved_between_layers():
    """An AWQ-style fold (layer 0's rows times s, layer 2's columns divided by s) changes layer 0's output
    by a per-channel factor and the model's output not at all: at 8 bits both errors stay small."""
    import copy

    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    folded = copy.deepcopy(ref)
    s = torch.rand(64) * 3 + 0.25
    with torch.no_grad():
        folded[0].weight.mul_(s[:, None])
        folded[0].bias.mul_(s)
        folded[2].weight.div_(s[None, :])
    q = lowbit.quantize(folded, "rtn", bits=8, group_size=-1, progress=False)
    x = torch.randn(16, 64)
    errs = layer_errors(ref, q, [x])
    with torch.no_grad():
        raw = float((q[0](x) - ref[0](x)).norm() / ref[0](x).norm())
    assert raw > 0.5  # compared as they are, the fold alone would look like a broken layer
    assert errs["0"] < 0.01 and errs["2"] < 0.05


def test_report_without_matplotlib(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    page = render({"model": "m", "rows": [{"name": "fp32", "ppl": 5.0, "bits_per_weight": 32.0}]})
    assert 'id="no-plots"' in page and "lowbit[report]" in page and "<svg" not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                             ".ci/run installs it")  # fmt: skip
def test_report_renders_in_a_browser(report):
    """Headless Chromium opens the page, takes a screenshot, and its DOM holds the table and both plots
    drawn (SVG paths), with nothing logged to the console."""
    out, _ = report
    page = (out / "index.html").as_uri()
    shot = out / "screenshot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--window-size=1200,2400"]  # fmt: skip
    done = subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, text=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 20000, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True)
    assert not re.findall(r"CONSOLE\(\d+\)|Uncaught", dom.stderr), dom.stderr[-2000:]
    html = dom.stdout
    table = html[html.index('id="results"'):html.index("</table>")]
    shown = json.loads((out / "results.json").read_text())["rows"]  # other tests may have added rows
    assert table.count("<tr") == 1 + len(shown) and "gptq-w3g32" in table
    for plot in ("pareto-plot", "layer-plot"):
        svg = html[html.index(f'id="{plot}"'):]
        svg = svg[: svg.index("</svg>")]
        assert svg.count("<path") > 10, plot
    print(f"screenshot: {shot}")


CIFAR = asset("cifar10", "cifar10_test_jpeg.tar.gz")
CIFAR_TRAIN = asset("cifar10", "cifar10_train_jpeg.tar.gz")


@pytest.mark.skipif(not CIFAR.exists() or not CIFAR_TRAIN.exists(), reason="the CIFAR-10 images are not in ../shared/assets")
def test_vision_models_are_compared_by_top1_as_lowbit_eval_scores_them(tmp_path):
    from lowbit.data.cifar10 import load_cifar10
    from lowbit.eval.classification import top1
    from lowbit.models.loading import normalization

    out = tmp_path / "r20"
    rows = compare("resnet20", ["rtn"], [4], [-1], out=out, calib=CIFAR_TRAIN, eval_text=CIFAR, nsamples=32,
                   eval_limit=120, progress=False)  # fmt: skip
    assert [r["name"] for r in rows] == ["fp32", "rtn-w4pc"]
    r = rows[1]
    assert r["eval_count"] == 120 and 0 < r["top1"] <= 100 and "decode_tok_s" not in r
    assert r["command"].startswith("lowbit quantize resnet20 --method rtn --bits 4 --group-size -1 --calib ")
    assert r["eval_command"].endswith(f"--cifar10 {CIFAR} --limit 120")
    model = lowbit.load(r["dir"])
    images, labels = load_cifar10(CIFAR, split="test", limit=120, normalize=normalization(model))
    assert top1(model, images, labels) == r["top1"]
    assert len(r["layer_error"]) == r["layers_quantized"] > 15
    page = (out / "index.html").read_text()
    assert "top-1 (%)" in page and page.count("<svg") == 2
