"""``lowbit plan``: the peak memory, disk and time of a run, from the config and the weight files' headers."""

import json

import pytest

import lowbit
from lowbit.models import load_pretrained
from lowbit.plan import GIB, make_plan


def test_the_plan_counts_what_quantize_does(stories_dir, tmp_path):
    plan = make_plan(str(stories_dir), "rtn", bits=4, group_size=32, probe=False)
    model, _ = load_pretrained(str(stories_dir))
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    lowbit.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    cov = model.lowbit_coverage
    assert plan.quantized_weights == sum(r.numel for r in cov.quantized)
    assert plan.units == 7 and plan.largest_unit.startswith("model.layers.")
    lowbit.save(model, tmp_path / "q")
    written = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert 0.8 * written < plan.checkpoint_bytes < 1.25 * written
    assert plan.peak_memory_bytes > plan.memory_parts["fp32 model"] > 0


def test_a_7b_model_does_not_fit_in_24_gib_without_onloading(tmp_path):
    """A Llama-7B shape from its config alone (no weights needed): ~27 GB of fp32 weights."""
    import transformers as tf

    tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   vocab_size=32000, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)  # fmt: skip
    plan = make_plan(str(tmp_path), "gptq", probe=False)
    assert 6.7e9 < plan.parameters < 6.8e9 and plan.units == 34
    assert plan.peak_memory_bytes > 24 * GIB
    assert plan.memory_parts["largest unit's work"] > 4 * (4096**2 + 11008**2)  # its Hessians
    assert 3.5 * GIB < plan.checkpoint_bytes < 4.5 * GIB
    if plan.machine_memory_bytes and plan.machine_memory_bytes < 26 * GIB:
        assert plan.fits is False and "does NOT fit" in plan.describe()


def test_a_corrupted_shard_is_named_before_any_work(tmp_path):
    import transformers as tf

    tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=128).save_pretrained(tmp_path)  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="model.safetensors: header length"):
        make_plan(str(tmp_path), probe=False)


def test_the_cli_prints_a_plan(stories_dir):
    from typer.testing import CliRunner

    from lowbit.cli import app

    r = CliRunner().invoke(app, ["plan", str(stories_dir), "--method", "gptq", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["estimated_seconds"] > 0 and out["gflops"] > 0 and out["peak_memory_bytes"] > 0
    r = CliRunner().invoke(app, ["plan", str(stories_dir / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output
