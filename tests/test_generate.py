"""Greedy decoding: the lean loop gives generate()'s tokens, on fp32 and quantized models; the CLI."""

import copy
import json

import pytest
import torch

import lowbit
from lowbit.generate import greedy_decode, step_profile


def test_lean_greedy_loop_gives_the_tokens_of_transformers_generate(stories):
    model, tok = stories
    quant = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=32, progress=False)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    for net in (model, quant):
        ours = greedy_decode(net, ids, 24)
        with torch.no_grad():
            theirs = net.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert torch.equal(ours.tokens, theirs[:, : ours.tokens.shape[1]])
        assert ours.new_tokens == 24 and ours.tokens_per_s > 0 and len(ours.step_s) == 23


def test_decode_stops_at_eos_and_refuses_bad_requests(stories):
    model, tok = stories
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    first = greedy_decode(model, ids, 1).tokens[0, -1].item()
    stopped = greedy_decode(model, ids, 30, eos_token_id=first)
    assert stopped.new_tokens == 1  # the first new token is the "eos": nothing after it
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, ids, 0)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_decode(model, ids[0], 4)


def test_step_profile_counts_the_kernel_calls_of_a_decode_step(stories):
    model, tok = stories
    quant = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=32, progress=False)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    prof = step_profile(quant, ids, steps=4, fused=False)
    linears = sum(isinstance(m, lowbit.QLinear) for m in quant.modules())
    assert prof["kernel_calls_per_step"] == linears and prof["path"] == "transformers"  # each linear once a token
    assert 0 < prof["kernel_ms"] < prof["step_ms"]
    fused = step_profile(quant, ids, steps=4)
    layers = quant.config.num_hidden_layers
    assert fused["path"] == "fused" and fused["kernel_calls_per_step"] == 4 * layers  # qkv, o, gate+up, down
    assert step_profile(model, ids, steps=2)["kernel_calls_per_step"] == 0


def test_generate_command_prints_text_and_speed(stories_dir):
    from typer.testing import CliRunner

    from lowbit.cli import app

    res = CliRunner().invoke(
        app, ["generate", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "8", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["text"].startswith("Once upon a time") and out["new_tokens"] == 8 and out["tokens_per_s"] > 0
    assert out["decoder_step"] == "fused"
    plain = CliRunner().invoke(
        app, ["generate", str(stories_dir), "--max-new-tokens", "8", "--no-fused", "--json"]
    )
    assert plain.exit_code == 0 and json.loads(plain.stdout)["decoder_step"] == "transformers"
    assert json.loads(plain.stdout)["text"] == out["text"]
    bad = CliRunner().invoke(app, ["generate", str(stories_dir), "--threads", "0"])
    assert bad.exit_code != 0 and "--threads" in bad.output
