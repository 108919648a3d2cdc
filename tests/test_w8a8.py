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
