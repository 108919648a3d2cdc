"""What a newcomer meets first: a fast ``--help`` that lists every method, and outputs that
other users can read."""

import os
import stat
import subprocess
import sys

import torch
from torch import nn
from typer.testing import CliRunner

import lowbit
from lowbit.catalog import METHODS
from lowbit.cli import app


def test_the_help_catalog_lists_exactly_the_registered_methods():
    from lowbit.methods import REGISTRY

    assert set(METHODS) == set(REGISTRY)
    r = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for name in METHODS:
        assert name in text, name
    assert "default 1000" in text  # --iters states its default


def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from lowbit.cli import app\n"
        "try:\n"
        "    app(['quantize', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "try:\n"
        "    app(['quantize'])\n"  # missing MODEL and --out: an argument error
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_lowbit_names_still_resolve_lazily():
    assert callable(lowbit.quantize) and lowbit.QLinear.__name__ == "QLinear"
    assert set(lowbit.__all__) <= set(dir(lowbit))


def test_a_saved_checkpoint_is_readable_by_other_users(tmp_path):
    old = os.umask(0o022)
    try:
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        lowbit.quantize(model, "rtn", bits=4, group_size=8, progress=False)
        out = tmp_path / "q"
        lowbit.save(model, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.iterdir() if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]
    assert torch.equal(lowbit.load(out, model=nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))(
        torch.ones(1, 16)), model(torch.ones(1, 16)))  # fmt: skip


def test_demo_reports_steps_labels_its_ratios_and_warns_when_busy(monkeypatch):
    import pytest

    from lowbit import demo
    from lowbit.assets import asset

    if not asset("stories260K").is_dir():
        pytest.skip(f"stories260K is not at {asset('stories260K')}; set LOWBIT_ASSETS")
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    read = demo.read_text
    monkeypatch.setattr(demo, "read_text", lambda path: read(path)[:60_000])  # a short text: this tests the report
    lines = []
    result = demo.run_demo("stories260K", log=lines.append)
    assert [line.split("]")[0] for line in lines if line.startswith("stories260K [")] == [
        f"stories260K [{i}/4" for i in range(1, 5)
    ]
    assert lines[0].startswith("warning: this machine is busy (load average 99.0")
    speed = result["results"][0]["decode_64_tokens"]
    assert speed["speedup"] == pytest.approx(speed["quantized_tokens_per_s"] / speed["fp32_tokens_per_s"])
    assert "x the speed of fp32" in result["table"] and "warning: this machine is busy" in result["table"]
    assert "recipe: RTN w4 g128 weight-only" in result["table"]
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert demo.busy_warning() is None
