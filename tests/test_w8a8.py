"""W8A8 / W4A8 linears against the fake-quant reference, and the API knobs."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import WeightFormat
from lowbit.nn import W8A8Linear
from lowbit.nn.w8a8 import quantize_per_token
from lowbit.quantized_weight import QuantizedWeight


def fake_quant_reference(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize the activations per token, then multiply in float64."""
    flat = x.reshape(-1, x.shape[-1]).double()
    scale = flat.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(flat / scale).clamp(-127, 127) * scale
    y = xq @ layer.weight.double().t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], -1).float()


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_matmul_matches_the_fake_quant_reference(bits, symmetric, rows):
    lin = nn.Linear(96, 40)
    qw = QuantizedWeight.quantize(lin.weight.detach(), WeightFormat("int", bits, -1, symmetric))
    layer = W8A8Linear(qw, lin.bias)
    x = torch.randn(rows, 96) * 3
    torch.testing.assert_close(layer(x), fake_quant_reference(layer, x), rtol=1e-4, atol=1e-4)


def test_per_token_quantization_keeps_each_row_within_half_a_step():
    x = torch.randn(5, 32) * torch.tensor([[0.01], [1.0], [100.0], [3.0], [0.5]])
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-7).all())


def test_unsupported_combinations_fail_clearly():
    with pytest.raises(ValueError, match="per-channel 4- or 8-bit"):
        lowbit.quantize(nn.Sequential(nn.Linear(8, 8)), "rtn", bits=8, group_size=32, act_bits=8, progress=False)
    with pytest.raises(ValueError, match="act_bits=4 is not supported"):
        lowbit.quantize(nn.Sequential(nn.Linear(8, 8)), "rtn", bits=8, group_size=-1, act_bits=4, progress=False)
    with pytest.raises(ValueError, match="per-channel 4- or 8-bit"):
        lowbit.quantize(nn.Sequential(nn.Linear(8, 8)), "rtn", bits=3, group_size=-1, act_bits=8, progress=False)


def test_api_w8a8_on_any_module_and_save_load(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 32)
    ref = seq(x)
    lowbit.quantize(seq, "rtn", bits=8, group_size=-1, act_bits=8, progress=False)
    assert isinstance(seq[0], W8A8Linear) and isinstance(seq[2], W8A8Linear)
    assert (seq(x) - ref).norm() / ref.norm() < 0.02

    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(model, "rtn", bits=8, group_size=-1, act_bits=8, progress=False)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, W8A8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def test_llm_int8_keeps_outlier_columns_in_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[:, 5] = 60.0  # one huge feature column, as in large transformers
    naive = lowbit.quantize(nn.Sequential(copy_of(lin)), "rtn", bits=8, group_size=-1, symmetric=True, act_bits=8,
                            progress=False)  # fmt: skip
    mixed = lowbit.quantize(nn.Sequential(copy_of(lin)), "llmint8", progress=False)
    ref = lin(x)
    err_naive = (naive(x) - ref).norm() / ref.norm()
    err_mixed = (mixed(x) - ref).norm() / ref.norm()
    assert err_mixed < err_naive / 3
    # without outliers the decomposition changes nothing
    y = torch.randn(4, 64)
    mixed[0].outlier_threshold = 1e9
    torch.testing.assert_close(mixed(y), fake_quant_reference(mixed[0], y), rtol=1e-4, atol=1e-4)


def copy_of(m):
    import copy

    return copy.deepcopy(m)


def test_llm_int8_rejects_4_bit_weights_clearly():
    with pytest.raises(ValueError, match=r"LLM.int8\(\) quantizes weights to int8; bits=4"):
        lowbit.quantize(nn.Sequential(nn.Linear(8, 8)), "llmint8", bits=4, progress=False)


def test_cli_llmint8_with_the_documented_flags(tmp_path):
    import json

    import transformers as tf
    from typer.testing import CliRunner

    from lowbit.cli import app

    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "m"), "--method", "llmint8", "--bits", "8",
                                 "--out", str(tmp_path / "q"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "int8 per-channel sym"
    layers = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layers"]
    assert next(iter(layers.values()))["act"]["outlier_threshold"] == 6.0
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "m"), "--method", "rtn", "--bits", "8", "--act-bits", "8",
                                 "--group-size", "32", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert r.exit_code == 2 and "per-channel" in r.stderr and not (tmp_path / "bad").exists()


def test_smoothquant_smoothing_alone_leaves_outputs_unchanged():
    import transformers as tf

    from lowbit.engine.sequential import block_linears, capture_block_inputs
    from lowbit.methods import RTN, SmoothQuant
    from lowbit.models import adapter_for

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 30.0  # an outlier channel to smooth
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, [ids], torch.device("cpu"))
    norm_before = block.input_layernorm.weight.clone()
    SmoothQuant(alpha=0.5).transform_block(block, inputs, adapter_for(model).scale_pairs(block), block_linears(block),
                                           RTN(bits=8, group_size=-1, act_bits=8))  # fmt: skip
    assert not torch.equal(block.input_layernorm.weight, norm_before)  # something was migrated
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_smoothquant_recipe_runs_end_to_end():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (4, 16))
    lowbit.quantize(model, "smoothquant+rtn", calib=ids, bits=8, group_size=-1, symmetric=True, act_bits=8,
                    progress=False)  # fmt: skip
    assert all(isinstance(m, W8A8Linear) for n, m in model.named_modules() if n.endswith("proj"))
    assert [r["method"] for r in model.lowbit_recipe] == ["smoothquant", "rtn"]


def test_observers_pick_sensible_static_scales():
    from lowbit.observers import static_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100000, generator=g)
    x[:5] = 40.0  # a few outliers, rarer than one in ten thousand
    mm = static_scale(40.0, x, "minmax")
    pc = static_scale(40.0, x, "percentile")
    mse = static_scale(40.0, x, "mse")
    assert mm == pytest.approx(40.0 / 127)
    assert pc < mm and mse < mm

    def err(s):
        return (torch.round(x / s).clamp(-127, 127) * s - x).pow(2).mean()

    assert err(mse) <= err(mm)
    with pytest.raises(ValueError, match="unknown activation observer"):
        static_scale(1.0, x, "kl")


def test_static_per_tensor_activations_match_the_reference_with_that_scale():
    lin = nn.Linear(48, 16)
    qw = QuantizedWeight.quantize(lin.weight.detach(), WeightFormat("int", 8, -1, True))
    layer = W8A8Linear(qw, lin.bias, act_granularity="tensor", act_scale=0.05)
    x = torch.randn(6, 48)
    xq = torch.round(x / 0.05).clamp(-127, 127) * 0.05
    torch.testing.assert_close(layer(x), xq @ layer.weight.t() + lin.bias, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="act_scale"):
        W8A8Linear(qw, lin.bias, act_granularity="tensor")


def test_static_activations_calibrate_through_the_engine(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(64, 32)
    with pytest.raises(ValueError, match="calibration data"):
        lowbit.quantize(copy_of(model), "rtn", bits=8, group_size=-1, act_bits=8, act_granularity="tensor",
                        progress=False)  # fmt: skip
    q = lowbit.quantize(copy_of(model), "rtn", calib=[x], bits=8, group_size=-1, act_bits=8,
                        act_granularity="tensor", act_observer="mse", progress=False)  # fmt: skip
    assert q[0].act_granularity == "tensor" and q[0].act_scale > 0
    ref = model(x)
    assert (q(x) - ref).norm() / ref.norm() < 0.05
    lowbit.save(q, tmp_path / "q")
    again = lowbit.load(tmp_path / "q", model=copy_of(model))
    assert torch.equal(again(x), q(x))
