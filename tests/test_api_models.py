"""lowbit.quantize on bare modules and on tiny transformers of each adapted family."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QLinear
from lowbit.methods import RTN
from lowbit.models import adapter_for


def test_quantize_bare_sequential_with_rtn():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    x = torch.randn(4, 64)
    ref = model(x)
    out = lowbit.quantize(model, "rtn", bits=4, group_size=128, progress=False)
    assert out is model
    assert isinstance(model[0], QLinear) and isinstance(model[2], QLinear)
    assert len(model.lowbit_coverage.quantized) == 2
    assert (model(x) - ref).norm() / ref.norm() < 0.2  # two 4-bit layers: about 1/15 each


def test_generic_walker_reports_unsupported_layers_as_skipped():
    model = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8, 8)
    ref = model(x)
    lowbit.quantize(model, "rtn", bits=8, group_size=-1, progress=False)
    cov = model.lowbit_coverage
    assert [r.name for r in cov.quantized] == ["2"]
    assert cov.get("0").status == "skipped" and "Conv3d" in cov.get("0").reason
    assert cov.get("0").numel == 8 * 3 * 27  # the skipped weight still counts in the report
    assert isinstance(model[0], nn.Conv3d) and (model(x) - ref).norm() / ref.norm() < 0.02


def test_model_without_linears_is_an_error():
    with pytest.raises(ValueError, match="no layer lowbit can quantize"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), "rtn", progress=False)


def test_nan_weight_is_rejected_before_anything_changes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1.weight holds 1 NaN/Inf"):
        lowbit.quantize(model, "rtn", progress=False)
    assert isinstance(model[0], nn.Linear)


def test_skip_patterns_and_config_objects():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    lowbit.quantize(model, RTN(bits=3, group_size=16, mse=True), skip=["1"], progress=False)
    assert isinstance(model[0], QLinear) and isinstance(model[1], nn.Linear)
    assert model.lowbit_coverage.get("1").reason == "matched a --skip pattern"


def test_unknown_method_lists_the_available_ones():
    available = (
        "adaround, apq_vit, awq, bcq, bias_correction, brecq, cpt_v, deep_compression, fq_vit, gobo, gptq, gptvq, hqq, "
        "llmint8, lorc, nf4, noisyquant, oas_vit, osplus, owq, p2_vit, peg, pmq, ptq4vit, ptq_for_vit, qdrop, "
        "repq_vit, rex, rptq, rtn, signround, smoothquant, spqr, squeezellm, zeroquant"
    )
    with pytest.raises(ValueError, match=f"available: {available}$"):
        lowbit.quantize(nn.Linear(4, 4), "gptx", progress=False)


def test_mse_clipping_never_increases_weight_error():
    from lowbit.formats import integer
    from lowbit.methods.rtn import mse_clip_params

    w = torch.randn(32, 256)
    w[:, 0] *= 20  # an outlier per row makes min-max ranges wasteful
    s0, z0 = integer.minmax_params(w, 3, 64, False)
    s1, z1 = mse_clip_params(w, 3, 64, False, norm=2.0)
    e0 = (integer.fake_quantize(w, s0, z0, 3, 64) - w).pow(2).sum()
    e1 = (integer.fake_quantize(w, s1, z1, 3, 64) - w).pow(2).sum()
    assert e1 < e0


def _tiny(family):
    import transformers as tf

    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return tf.LlamaForCausalLM(cfg), 7
    if family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=96,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        )
        return tf.OPTForCausalLM(cfg), 6
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg), 4
    cfg = tf.BertConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return tf.BertModel(cfg), 6


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_adapters_quantize_every_block_linear_and_round_trip(family, tmp_path):
    model, per_block = _tiny(family)
    model.eval()
    assert adapter_for(model).name == family
    ids = torch.randint(0, 96, (2, 16))
    lowbit.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    done, total = model.lowbit_coverage.block_counts()
    assert (done, total) == (2 * per_block, 2 * per_block)
    skipped = {r.name: r.reason for r in model.lowbit_coverage.skipped}
    assert all(reason for reason in skipped.values())
    if family != "bert":
        assert any("lm_head" in reason for reason in skipped.values())
    with torch.no_grad():
        out = model(input_ids=ids)
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        again = loaded(input_ids=ids)
    key = "last_hidden_state" if family == "bert" else "logits"
    assert torch.equal(out[key], again[key])
    assert type(loaded) is type(model)


def test_quantizing_twice_reports_layers_already_quantized():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    lowbit.quantize(model, "rtn", progress=False, skip=["1"])
    lowbit.quantize(model, "rtn", progress=False)
    cov = model.lowbit_coverage
    assert cov.get("0").status == "skipped" and cov.get("0").reason == "already quantized"
    assert cov.get("1").status == "quantized"
