"""REx: the expansion term against a written-out second RTN of the residual, the row choice, exact
bits, the QLinear path against dequantize-then-matmul, save/load and refusals."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats.spec import WeightFormat
from lowbit.methods import make_method
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_the_second_order_quantizes_the_residual_of_the_rows_with_most_error(ratio):
    torch.manual_seed(0)
    w = torch.randn(32, 96) * torch.rand(32, 1)
    fmt = WeightFormat("int", 3, 32)
    q = make_method("rex", bits=3, group_size=32, ratio=ratio).quantize_weight(w)
    first = QuantizedWeight.quantize(w, fmt)
    resid = w - first.dequantize()
    rows = torch.topk(resid.pow(2).sum(1), round(ratio * 32)).indices.sort().values
    assert torch.equal(q.residual.rows.long(), rows)
    second = QuantizedWeight.quantize(resid[rows], fmt)
    want = first.dequantize().index_add(0, rows, second.dequantize())
    assert torch.equal(q.dequantize(), want)
    assert q.storage_bits() == first.storage_bits() + second.storage_bits() + 32 * len(rows)
    assert float((q.dequantize() - w).pow(2).sum()) < 0.7 * float(resid.pow(2).sum())
    x = torch.randn(5, 96)
    bias = torch.randn(32)
    for kernel in ("auto", "dequant"):
        torch.testing.assert_close(QLinear(q, bias, kernel)(x), x @ want.t() + bias, rtol=1e-5, atol=1e-4)
    back = QuantizedWeight.from_tensors(q.to_tensors("r"), "r", q.fmt, q.shape)
    assert torch.equal(back.dequantize(), q.dequantize())
    bad = q.to_tensors("r")
    bad["r.rex_rows"] = torch.tensor([0, 99], dtype=torch.int32)
    with pytest.raises(ValueError, match="rex_rows"):
        QuantizedWeight.from_tensors(bad, "r", q.fmt, q.shape)


def test_rex_on_a_llama_reloads_exactly_and_refuses_bad_knobs(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    q = lowbit.quantize(copy.deepcopy(model), "rex", bits=3, group_size=32, ratio=0.5, progress=False)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"rex"}
    lowbit.save(q, tmp_path / "rex")
    back = lowbit.load(tmp_path / "rex", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    with pytest.raises(ValueError, match="ratio"):
        make_method("rex", ratio=1.5)
    with pytest.raises(ValueError, match="quantized scales"):
        make_method("rex", scale_bits=8)
