"""bitsandbytes' 4-bit layout: the files lowbit writes, decoded here from the published layout, and
(where bitsandbytes is installed) loaded by transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app

# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E), by code: bitsandbytes' table
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def tiny_llama(inter=128, tied=True):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def export(model, path, fmt="bnb"):
    lowbit.save(model, path / "native")
    r = CliRunner().invoke(app, ["export", str(path / "native"), "--format", fmt, "--out", str(path / "bnb")])
    assert r.exit_code == 0, r.output
    return path / "bnb"


def decode(tensors: dict, name: str) -> torch.Tensor:
    """A layer's weight as the layout describes it: codes two a byte (the earlier in the high nibble)
    along the flattened weight, ``NF4[code] * absmax`` of the code's block."""
    state = json.loads(bytes(tensors[f"{name}.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    packed = tensors[f"{name}.weight"].reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1).long()
    absmax = tensors[f"{name}.weight.absmax"].repeat_interleave(state["blocksize"])
    return (torch.tensor(NF4)[codes] * absmax).reshape(state["shape"])


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lowbit.QLinear)}


@pytest.mark.parametrize(
    "knobs",
    [{}, {"scale_bits": None}, {"group_size": 32}, {"group_size": -1}],
    ids=["g64 double-quantized scales", "g64 fp16 scales", "g32", "per-channel"],
)
def test_the_files_decode_per_the_layout_to_lowbits_weights_exactly(tmp_path, knobs):
    model = tiny_llama()
    lowbit.quantize(model, "nf4", progress=False, **knobs)
    out = export(model, tmp_path)
    tensors = load_file(out / "model.safetensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is False and qc["llm_int8_skip_modules"] == ["lm_head"]
    layers = quantized_layers(model)
    assert len(layers) == 14
    for name, m in layers.items():
        n, k = m.out_features, m.in_features
        state = json.loads(bytes(tensors[f"{name}.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
        block = k if knobs.get("group_size") == -1 else knobs.get("group_size", 64)
        assert state == {"quant_type": "nf4", "blocksize": block, "dtype": "float32", "shape": [n, k]}
        assert tensors[f"{name}.weight"].dtype == torch.uint8 and tensors[f"{name}.weight"].shape == (n * k // 2, 1)
        assert tensors[f"{name}.weight.absmax"].dtype == torch.float32
        assert tensors[f"{name}.weight.absmax"].shape == (n * k // block,)
        assert torch.equal(tensors[f"{name}.weight.quant_map"], torch.tensor(NF4))
        assert not any(k.startswith(f"{name}.weight.nested") for k in tensors)
        assert torch.equal(decode(tensors, name), m.weight), name


def test_transformers_with_bitsandbytes_computes_lowbits_weights_and_logits(tmp_path):
    pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes to load the export in transformers")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import transformers as tf

    model = tiny_llama(tied=False)
    lowbit.quantize(model, "nf4", progress=False)
    theirs = tf.AutoModelForCausalLM.from_pretrained(export(model, tmp_path), dtype=torch.float32, device_map="cpu")
    for name, m in quantized_layers(model).items():
        p = theirs.get_submodule(name).weight
        assert torch.equal(bf.dequantize_4bit(p.data, p.quant_state), m.weight), name
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)  # left unquantized, as it was
    for m in theirs.modules():
        if isinstance(m, bnb.nn.Linear4bit):  # its CPU path with AVX512-BF16 rounds absmax to bf16 itself
            m.support_avx512bf16_for_cpu = False
    for m in model.modules():
        if isinstance(m, lowbit.QLinear):  # dequantize, then matmul: the product bitsandbytes computes
            m.kernel, m._cache = "dequant", {}
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        one = ids[:1, :1]  # one token: bitsandbytes' GEMV path
        torch.testing.assert_close(theirs(input_ids=one).logits, model(input_ids=one).logits, rtol=1e-5, atol=1e-5)


def test_bitsandbytes_is_accepted_as_the_format_name(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, "nf4", progress=False)
    out = export(model, tmp_path, fmt="bitsandbytes")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"


def test_groups_bitsandbytes_cannot_tile_are_refused_with_the_layer_and_the_fix(tmp_path):
    from lowbit.io.bnb_export import export_bnb

    ragged = tiny_llama(inter=160)  # down_proj: 160 inputs, groups of 64
    lowbit.quantize(ragged, "nf4", progress=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: a ragged last group \(160 inputs") as e:
        export_bnb(ragged, tmp_path / "a")
    assert "--group-size 32" in str(e.value) and "--skip 'model.layers.0.mlp.down_proj'" in str(e.value)
    small = tiny_llama()
    lowbit.quantize(small, "nf4", group_size=16, progress=False)
    with pytest.raises(ValueError, match=r"groups of 16 inputs; bitsandbytes reads blocks of 32, 64"):
        export_bnb(small, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "method,knobs,message",
    [
        ("nf4", {"format": "fp4"}, r"fp4 \(E2M1\), whose level 1/12 .* quantize with --format nf4"),
        ("rtn", {"bits": 4, "group_size": 32}, r"int4 .* --format compressed-tensors, gptq or gguf"),
    ],
    ids=["fp4", "int4"],
)
def test_formats_other_than_nf4_are_refused_naming_where_they_go(tmp_path, method, knobs, message):
    model = tiny_llama()
    lowbit.quantize(model, method, progress=False, **knobs)
    lowbit.save(model, tmp_path / "native")
    out = tmp_path / "bnb"
    r = CliRunner().invoke(app, ["export", str(tmp_path / "native"), "--format", "bnb", "--out", str(out)])
    assert r.exit_code == 2
    assert "model.layers.0.self_attn.q_proj" in r.output
    assert r.output.startswith("error: cannot write bitsandbytes' 4-bit layout")
    with pytest.raises(ValueError, match=message):
        from lowbit.io.bnb_export import export_bnb

        export_bnb(model, out)
    assert not out.exists()


def test_export_help_names_the_bnb_format():
    r = CliRunner().invoke(app, ["export", "--help"])
    assert "bnb" in r.output and "bitsandbytes" in r.output
