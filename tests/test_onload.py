"""Sequential onloading: a model quantized, evaluated and exported one unit at a time from its
safetensors files gives the same checkpoint, the same perplexity and the same export as the
in-memory path, tensor for tensor; and what it cannot do it refuses by name."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.engine.checkpoint import Progress, progress_dir_for
from lowbit.eval.perplexity import perplexity, streamed_perplexity
from lowbit.io.native import read_weights
from lowbit.io.onload import WeightSource, empty_model
from lowbit.models import load_pretrained


def _digests(directory) -> dict[str, str]:
    return {k: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, t in read_weights(Path(directory)).items()}  # fmt: skip


def _write_llama(d: Path, tied: bool, layers: int = 3) -> Path:
    """A small random Llama saved in bf16 across several shards, as large models are shipped."""
    cfg = tf.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(1)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="60KB")
    assert len(list(d.glob("*.safetensors"))) > 2
    return d


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _write_llama(tmp_path_factory.mktemp("sharded"), tied=False)


@pytest.fixture(scope="module")
def sharded_tied(tmp_path_factory):
    return _write_llama(tmp_path_factory.mktemp("sharded_tied"), tied=True)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 200, (6, 24), generator=torch.Generator().manual_seed(0))


def _in_memory(src, out, recipe, **kw):
    model, _ = load_pretrained(str(src))
    torch.manual_seed(0)
    lowbit.quantize(model, recipe, bits=4, group_size=32, progress=False, **kw)
    lowbit.save(model, out)
    return model


def _onloaded(src, out, recipe, **kw):
    torch.manual_seed(0)
    return lowbit.quantize_to_disk(src, recipe, out=out, bits=4, group_size=32, progress=False, **kw)


@pytest.mark.parametrize("recipe,tied,spill", [("rtn", False, False), ("gptq", False, True), ("gptq", True, False),
                                               ("awq+gptq", True, True)])  # fmt: skip
def test_onloaded_run_writes_the_in_memory_checkpoint(sharded, sharded_tied, calib, tmp_path, recipe, tied, spill):
    src = sharded_tied if tied else sharded
    kw = {} if recipe == "rtn" else {"calib": calib}
    ref = _in_memory(src, tmp_path / "memory", recipe, **kw)
    skeleton = _onloaded(src, tmp_path / "onload", recipe, spill_activations=spill, **kw)
    assert _digests(tmp_path / "onload") == _digests(tmp_path / "memory")
    a = json.loads((tmp_path / "memory" / "config.json").read_text())["quantization_config"]
    b = json.loads((tmp_path / "onload" / "config.json").read_text())["quantization_config"]
    ta, tb = a["provenance"].pop("seconds"), b["provenance"].pop("seconds")
    assert ta > 0 and tb > 0  # the model card's time: each run's own
    assert a == b  # layers, structure, tied names, coverage (the method that decided each layer), provenance
    card = (tmp_path / "onload" / "README.md").read_text()
    assert "## Calibration data" in card and "## Coverage" in card
    assert skeleton.lowbit_coverage.to_dict() == ref.lowbit_coverage.to_dict()
    shards = sorted(p.name for p in (tmp_path / "onload").glob("model-*.safetensors"))
    assert len(shards) >= 4  # one per block, and the rest
    assert not list(tmp_path.glob("lowbit-activations-*"))  # spilled activations removed
    ids = torch.randint(0, 200, (2, 16))
    want = lowbit.load(tmp_path / "memory")(ids).logits
    assert torch.equal(lowbit.load(tmp_path / "onload")(ids).logits, want)
    # nothing of the model is resident afterwards: the skeleton's parameters are on meta
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_onload_resumes_after_a_crash_to_the_same_checkpoint(sharded, calib, tmp_path, monkeypatch):
    _onloaded(sharded, tmp_path / "whole", "gptq", calib=calib)
    want = _digests(tmp_path / "whole")
    saves, real = [], Progress.save
    record_sizes = []

    def save_then_crash(self, index, *a, **k):
        real(self, index, *a, **k)
        saves.append(index)
        record_sizes.append(sum(p.stat().st_size for p in self.dir.glob("unit-*.safetensors")))
        if len(saves) == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Progress, "save", save_then_crash)
    out = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated"):
        _onloaded(sharded, out, "gptq", calib=calib, checkpoint_dir=progress_dir_for(out))
    monkeypatch.setattr(Progress, "save", real)
    assert not out.exists() and progress_dir_for(out).exists()
    # the record keeps the codes, not the weights it can read again from the source
    block_bytes = sum(t.numel() * 4 for k, t in load_pretrained(str(sharded))[0].state_dict().items()
                      if k.startswith("model.layers.0."))  # fmt: skip
    assert 0 < record_sizes[-1] < block_bytes
    model = _onloaded(sharded, out, "gptq", calib=calib, checkpoint_dir=progress_dir_for(out), resume=True)
    model.lowbit_progress.finish()
    assert _digests(out) == want


def test_streamed_perplexity_equals_the_in_memory_one(stories_dir, tinystories_halves, tmp_path):
    text = tinystories_halves[1][:20000]
    model, tok = load_pretrained(str(stories_dir))
    for path in (stories_dir, None):  # the float model (tied head) and a quantized checkpoint
        if path is None:
            lowbit.quantize(model, "rtn", bits=4, group_size=-1, progress=False)
            lowbit.save(model, tmp_path / "q", tokenizer=tok)
            path = tmp_path / "q"
            model = lowbit.load(path)
        want = perplexity(model, tok, text, seqlen=64, batch_size=4, progress=False)
        got = streamed_perplexity(path, tok, text, seqlen=64, batch_size=4, progress=False, spill_dir=tmp_path)
        assert got == want


def test_streamed_compressed_tensors_export_equals_the_in_memory_one(sharded, calib, tmp_path):
    pytest.importorskip("compressed_tensors")
    from lowbit.io.compressed_tensors import export_compressed_tensors, export_compressed_tensors_streamed

    _onloaded(sharded, tmp_path / "q", "gptq", calib=calib, symmetric=True)
    export_compressed_tensors(lowbit.load(tmp_path / "q"), tmp_path / "memory")
    export_compressed_tensors_streamed(tmp_path / "q", tmp_path / "streamed")
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "memory")
    a = json.loads((tmp_path / "memory" / "config.json").read_text())
    b = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert a["quantization_config"] == b["quantization_config"]
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    ids = torch.randint(0, 200, (1, 12))
    ref = lowbit.load(tmp_path / "q")(ids).logits
    assert torch.allclose(loaded(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_source_reads_only_the_tensor_asked_for(sharded):
    src = WeightSource(sharded)
    full = {}
    for f in sharded.glob("*.safetensors"):
        full.update(load_file(f))
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(src.read(key, None), full[key])
    assert torch.equal(src.read(key), full[key].float())
    net = empty_model(sharded)
    assert all(p.device.type == "meta" for p in net.parameters())
    assert all(b.device.type == "cpu" for b in net.buffers())  # rotary frequencies computed as usual


def test_onload_errors_name_the_file_and_the_problem(sharded, calib, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*NaN|NaN.*q_proj"):
        _onloaded(bad, tmp_path / "o1", "rtn")
    assert not (tmp_path / "o1").exists()

    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shard.name):
        WeightSource(bad)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        WeightSource(bad)
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        WeightSource(tmp_path)

    renamed = tmp_path / "renamed"
    shutil.copytree(sharded, renamed)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    f = renamed / index["weight_map"][key]
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up.weight"] = tensors.pop(key)
    save_file(tensors, f, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.mlp.up.weight"] = index["weight_map"].pop(key)
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="up_proj.weight"):
        _onloaded(renamed, tmp_path / "o2", "rtn")

    with pytest.raises(ValueError, match="cannot run with onloading"):
        _onloaded(sharded, tmp_path / "o3", "brecq", calib=calib, iters=2)


def test_onloaded_memory_does_not_grow_with_the_units(tmp_path):
    """Resident memory after each unit is written stays flat across 12 units of 50 MB (fp32) each:
    nothing of a finished unit is kept (the 7B-shaped measurement is benchmarks/onload_7b.py)."""
    import subprocess
    import sys

    script = (
        "import sys, lowbit\n"
        "from lowbit.io.onload import Onload\n"
        "def rss():\n"
        "    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024\n"
        "seen, write = [], Onload.write\n"
        "def traced(self, spec):\n"
        "    write(self, spec)\n"
        "    seen.append(rss())\n"
        "Onload.write = traced\n"
        "lowbit.quantize_to_disk(sys.argv[1], 'rtn', out=sys.argv[2], bits=4, group_size=128, progress=False)\n"
        "print(*seen)\n"
    )
    d = tmp_path / "model"
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tf.LlamaForCausalLM(cfg).state_dict().items()}
    d.mkdir()
    cfg.save_pretrained(d)
    save_file({k: torch.randn(s).to(torch.bfloat16) * 0.02 for k, s in shapes.items()}, d / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    layer_bytes = sum(s.numel() * 4 for k, s in shapes.items() if k.startswith("model.layers.0."))
    done = subprocess.run([sys.executable, "-c", script, str(d), str(tmp_path / "out")], capture_output=True,
                          text=True, check=True)  # fmt: skip
    rss = [int(x) for x in done.stdout.split()]
    assert len(rss) == 12
    assert max(rss) - rss[0] < 0.5 * layer_bytes, rss  # in memory, each unit would add layer_bytes
