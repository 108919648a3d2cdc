"""The CLI contract: JSON on stdout, one-line errors, nothing written on bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quantize_info_eval_json(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "q"
    r = _run(
        "quantize",
        tiny_llama_dir,
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--out",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["block_linears_quantized"] == res["block_linears_total"] == 14
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    r = _run("info", out, "--json")
    info = json.loads(r.stdout)
    assert info["block_linears_quantized"] == 14 and "lm_head" in info["layers_skipped"]
    assert 4 < info["bits_per_weight"] < 5 and info["size_bytes"] > 0

    r = _run("eval", out, "--ppl", text_file, "--seqlen", "32", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert set(ev) >= {"ppl", "tokens"} and ev["ppl"] > 1 and ev["tokens"] % 32 == 0


def test_asym_is_the_default_and_sym_is_a_flag(tiny_llama_dir, tmp_path):
    for flag, has_zero in (("--asym", True), ("--sym", False)):
        out = tmp_path / flag.strip("-")
        assert _run("quantize", tiny_llama_dir, flag, "--group-size", "-1", "--out", out).exit_code == 0
        layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
        fmt = next(iter(layers.values()))["format"]
        assert fmt["symmetric"] is (not has_zero) and fmt["group_size"] == -1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "9"], "bits=9"),
        (["--bits", "1"], "bits=1"),
        (["--group-size", "0"], "group_size 0 is invalid"),
        (["--method", "nope"], "unknown method"),
    ],
)
def test_bad_options_fail_with_one_line_and_write_nothing(tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "q"
    r = _run("quantize", tiny_llama_dir, "--out", out, *args)
    assert r.exit_code == 2
    assert message in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not out.exists()


def test_missing_model_path(tmp_path):
    r = _run("quantize", tmp_path / "no_such_model", "--out", tmp_path / "q")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "q").exists()


def test_non_empty_output_directory_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = _run("quantize", tiny_llama_dir, "--out", out)
    assert r.exit_code == 2 and "not empty" in r.stderr
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("content", ["", "once upon"])
def test_empty_or_too_short_calibration_file(tiny_llama_dir, tmp_path, content):
    calib = tmp_path / "calib.txt"
    calib.write_text(content)
    r = _run("quantize", tiny_llama_dir, "--calib", calib, "--seqlen", "64", "--out", tmp_path / "q")
    assert r.exit_code == 2 and ("empty" in r.stderr or "fewer than one window" in r.stderr)
    assert not (tmp_path / "q").exists()


def test_nan_weights_are_refused(tiny_llama_dir, tmp_path):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("inf")
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((tiny_llama_dir / f).read_bytes())
    r = _run("quantize", bad, "--out", tmp_path / "q")
    assert r.exit_code == 2 and "NaN/Inf" in r.stderr and "up_proj" in r.stderr
    assert not (tmp_path / "q").exists()


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import lowbit
    from lowbit.io import native

    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    lowbit.quantize(model, "rtn", group_size=-1, progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "copy_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        lowbit.save(model, tmp_path / "q")
    assert os.listdir(tmp_path) == []


def test_json_output_is_exactly_one_object_on_stdout(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "quantize", str(tiny_llama_dir), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["layers_quantized"] == 14


def test_calibrated_methods_need_calib_on_the_command_line(tiny_llama_dir, tmp_path):
    r = _run("quantize", tiny_llama_dir, "--method", "gptq", "--out", tmp_path / "q")
    assert r.exit_code == 2 and "needs calibration data; pass --calib" in r.stderr
    assert not (tmp_path / "q").exists()


def test_awq_gptq_recipe_from_the_command_line_and_from_yaml(tiny_llama_dir, text_file, tmp_path):
    common = ["--calib", text_file, "--nsamples", "4", "--seqlen", "32", "--bits", "3", "--group-size", "32", "--json"]
    r = _run("quantize", tiny_llama_dir, "--method", "awq+gptq", *common, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["method"] == "awq+gptq"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: awq\n- method: gptq\n  act_order: false\n")
    r = _run("quantize", tiny_llama_dir, "--recipe", recipe, *common, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["recipe"]
    assert [m["method"] for m in saved] == ["awq", "gptq"] and saved[1]["act_order"] is False


def test_every_command_help_shows_an_example():
    import re

    from typer.main import get_command
    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner()
    names = sorted(get_command(app).commands)
    assert {"quantize", "eval", "compare", "export", "info", "demo", "generate", "plan"} <= set(names)
    for name in names:
        out = runner.invoke(app, [name, "--help"], terminal_width=200).output
        text = re.sub(r"[\s│]+", " ", out)
        assert re.search(rf"example: lowbit {name}\b", text, re.IGNORECASE), f"lowbit {name} --help has no example"


@pytest.mark.parametrize("args,says", [
    (["quantize", "stories260K", "--method", "gptq", "--calib", "/no/such.txt", "--out", "{tmp}/q"],
     ["/no/such.txt", "does not exist", "pass a text file"]),
    (["info", "/no/such/dir"], ["/no/such/dir", "pass the --out directory of lowbit quantize"]),
    (["export", "/no/such/dir", "--format", "gguf", "--out", "{tmp}/x.gguf"], ["/no/such/dir", "pass the --out"]),
    (["compare", "stories260K", "--out", "{tmp}/r", "--eval", "/no/eval.txt"], ["/no/eval.txt", "does not exist"]),
    (["compare", "stories260K", "--out", "{tmp}/r", "--bits", "4,x"], ["--bits", "comma-separated integers"]),
    (["eval", "stories260K"], ["nothing to evaluate", "--ppl", "--tasks", "--cifar10"]),
])  # fmt: skip
def test_errors_name_the_input_the_problem_and_what_to_do(tmp_path, args, says):
    from typer.testing import CliRunner

    from lowbit.cli import app

    r = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2
    for part in says:
        assert part in r.output, (part, r.output)
