"""Resume after a crash: a run killed at any moment continues from its last finished unit and writes
the same checkpoint, tensor for tensor, as a run never interrupted."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.engine.checkpoint import Progress, progress_dir_for
from lowbit.models import load_pretrained


def _digests(directory) -> dict[str, str]:
    """sha256 of every tensor of a lowbit checkpoint directory."""
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            for k, t in load_file(os.path.join(directory, f)).items():
                out[k] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _run(stories_dir, out, recipe, calib, resume=False, **kw):
    model, tok = load_pretrained(str(stories_dir))
    lowbit.quantize(model, recipe, calib=calib, bits=4, group_size=32, progress=False,
                    checkpoint_dir=progress_dir_for(out), resume=resume, **kw)  # fmt: skip
    lowbit.save(model, out, tokenizer=tok)
    model.lowbit_progress.finish()
    return model


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def calib(stories_dir):
    torch.manual_seed(0)
    return torch.randint(0, 512, (4, 64))


@pytest.mark.parametrize("recipe", ["gptq", "awq+gptq", "smoothquant+rtn"])
def test_an_interrupted_run_resumes_to_the_same_checkpoint(stories_dir, tmp_path, calib, recipe, monkeypatch):
    extra = {"act_bits": 8, "act_dynamic": False, "act_granularity": "tensor"} if recipe == "smoothquant+rtn" else {}
    _run(stories_dir, tmp_path / "whole", recipe, calib, **extra)
    want = _digests(tmp_path / "whole")
    assert not progress_dir_for(tmp_path / "whole").exists()  # removed once the checkpoint is written

    saves = []
    real_save = Progress.save

    def save_then_crash(self, index, *a, **k):
        real_save(self, index, *a, **k)
        saves.append(index)
        if len(saves) == 3:
            raise Crash("simulated crash after the third unit")

    monkeypatch.setattr(Progress, "save", save_then_crash)
    with pytest.raises(Crash):
        _run(stories_dir, tmp_path / "cut", recipe, calib, **extra)
    monkeypatch.setattr(Progress, "save", real_save)
    assert not (tmp_path / "cut").exists() and progress_dir_for(tmp_path / "cut").exists()
    with pytest.raises(FileExistsError, match="pass --resume"):  # never silently restarted or mixed
        _run(stories_dir, tmp_path / "cut", recipe, calib, **extra)
    with pytest.raises(ValueError, match="differs in calibration_sha256"):
        _run(stories_dir, tmp_path / "cut", recipe, calib + 1, resume=True, **extra)
    model = _run(stories_dir, tmp_path / "cut", recipe, calib, resume=True, **extra)
    assert _digests(tmp_path / "cut") == want
    assert [r.method for r in model.lowbit_coverage.quantized][:1] != []


KILL_SCRIPT = r"""
import sys, torch, lowbit
from lowbit.engine.checkpoint import progress_dir_for
from lowbit.models import load_pretrained
out, resume = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
calib = torch.randint(0, 512, (4, 64))
model, tok = load_pretrained(sys.argv[3])
lowbit.quantize(model, "gptq", calib=calib, bits=4, group_size=32, progress=False,
                checkpoint_dir=progress_dir_for(out), resume=resume)
lowbit.save(model, out, tokenizer=tok)
model.lowbit_progress.finish()
"""


def test_kill_9_at_three_moments_then_resume(stories_dir, tmp_path):
    """A real ``kill -9`` of the quantizing process after 1, 3 and 5 finished units (of 7), each followed
    by ``resume``: every resumed checkpoint equals the uninterrupted one, tensor for tensor."""
    script = tmp_path / "q.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out, resume):
        return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0", str(stories_dir)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    whole = tmp_path / "whole"
    p = launch(whole, False)
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    want = _digests(whole)
    for after in (1, 3, 5):
        out = tmp_path / f"killed{after}"
        record = progress_dir_for(out)
        p = launch(out, False)
        deadline = time.time() + 600
        while not (record / f"unit-{after - 1:05d}.json").exists():
            assert p.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL and not out.exists()
        finished = sum(1 for f in os.listdir(record) if f.startswith("unit-") and f.endswith(".json"))
        assert finished >= after
        p = launch(out, True)
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
        assert _digests(out) == want, f"killed after {after} units"
        assert not record.exists()


def test_the_cli_records_progress_and_resumes(stories_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    out = tmp_path / "q"
    progress_dir_for(out).mkdir()
    (progress_dir_for(out) / "meta.json").write_text("{}")  # an interrupted run of something else
    args = ["quantize", str(stories_dir), "--method", "rtn", "--group-size", "32", "--out", str(out), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0 and "pass --resume" in r.output
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code != 0 and "cannot resume" in r.output and "differs in" in r.output
    import shutil

    shutil.rmtree(progress_dir_for(out))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists() and not progress_dir_for(out).exists()


def test_two_processes_never_write_the_same_output(stories_dir, tmp_path):
    """A second run into an --out another is quantizing into is refused; and when two finished runs
    race to rename into the same --out, one wins whole and the other writes nothing."""
    from lowbit.io.native import atomic_directory

    first = Progress(progress_dir_for(tmp_path / "q"), {"model": "a"}, resume=False)
    with pytest.raises(FileExistsError, match="another lowbit process is quantizing"):
        Progress(progress_dir_for(tmp_path / "q"), {"model": "a"}, resume=True)
    first.release()
    Progress(progress_dir_for(tmp_path / "q"), {"model": "a"}, resume=True).finish()
    assert not progress_dir_for(tmp_path / "q").exists()

    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="written by another process"), atomic_directory(out) as tmp:
        (tmp / "mine").write_text("b")
        out.mkdir()  # the other process's rename lands first
        (out / "theirs").write_text("a")
    assert sorted(os.listdir(out)) == ["theirs"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out.partial")] == []
