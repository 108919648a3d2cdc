"""Every output directory has its model card (README.md): the recipe, the calibration data (file,
sha256, windows, seed), the coverage, bits per weight and the command, written with the weights."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.assets import asset
from lowbit.io import model_card

STORIES = asset("stories260K")
TEXT = asset("text", "tinystories_dev.txt")
needs_assets = pytest.mark.skipif(not (STORIES / "config.json").exists() or not TEXT.exists(),
                                  reason="stories260K or its text is not in ../shared/assets")  # fmt: skip


@needs_assets
def test_cli_quantize_writes_the_card_and_a_resave_keeps_it(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "lowbit", "quantize", "stories260K", "--method", "gptq", "--bits", "3",
           "--group-size", "32", "--calib", str(TEXT), "--nsamples", "4", "--seqlen", "64", "--seed", "7",
           "--out", str(out), "--json"]  # fmt: skip
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    card = (out / "README.md").read_text()
    sha = hashlib.sha256(TEXT.read_bytes()).hexdigest()
    assert f"`{TEXT}` (sha256 `{sha}`)" in card
    assert "4 windows of 64 tokens, sampled with seed 7" in card
    assert f"{result['bits_per_weight']:.3f}" in card
    assert "gptq(bits=3, group_size=32" in card and "35 quantized (35 of 35 block linears)" in card
    assert "skipped lm_head (Linear)" in card
    assert f"--group-size 32 --calib {TEXT}" in card and "lowbit quantize stories260K --method gptq" in card
    prov = json.loads((out / "config.json").read_text())["quantization_config"]["provenance"]
    assert prov["calibration"]["file_sha256"] == sha and prov["calibration"]["windows"] == 4
    # loading and saving again writes the same card (it names no output path)
    model = lowbit.load(out)
    lowbit.save(model, tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == card


def test_api_card_without_calibration(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    lowbit.quantize(net, "rtn", bits=4, group_size=16, progress=False)
    lowbit.save(net, tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "None: this recipe reads no calibration data." in card
    assert "lowbit.quantize(model, 'rtn', bits=4, group_size=16)" in card
    assert "Not evaluated when written" in card
    assert net.lowbit_provenance["seconds"] >= 0 and net.lowbit_provenance["torch"] == torch.__version__


def test_card_shows_evaluation_and_layout():
    net = nn.Sequential(nn.Linear(16, 16))
    lowbit.quantize(net, "rtn", bits=8, group_size=-1, progress=False)
    net.lowbit_provenance["evaluation"] = [{"metric": "perplexity", "value": 5.25, "data": "t.txt",
                                            "command": "lowbit eval d --ppl t.txt"}]  # fmt: skip
    card = model_card.render(net, layout="compressed-tensors")
    assert "| perplexity | 5.2500 | t.txt | `lowbit eval d --ppl t.txt` |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "compressed-tensors checkpoint" in card


@needs_assets
def test_exports_carry_the_card(tmp_path):
    from lowbit.io.compressed_tensors import export_compressed_tensors
    from lowbit.models.loading import load_model

    net, tok = load_model("stories260K")
    lowbit.quantize(net, "rtn", bits=4, group_size=-1, progress=False)
    export_compressed_tensors(net, tmp_path / "ct", tokenizer=tok)
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "compressed-tensors checkpoint" in card and "rtn(bits=4, group_size=-1" in card
