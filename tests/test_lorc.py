"""Low-rank terms (formats.lowrank) and LoRC: the factors against a truncated SVD and the output-error
optimum, exact bits, the QLinear path against dequantize-then-matmul, save/load and refusals."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats.lowrank import LowRank
from lowbit.methods import make_method
from lowbit.methods.lorc import weighted_factors
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight


def test_factors_are_the_truncated_svd_and_count_their_bits():
    torch.manual_seed(0)
    E = torch.randn(30, 50)
    f = LowRank.of_error(E, 4)
    u, s, vh = torch.linalg.svd(E.double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(f.to_dense().double(), best, rtol=0, atol=5e-3)
    assert f.u.dtype == f.v.dtype == torch.float16 and f.storage_bits() == 16 * 4 * (30 + 50)
    assert LowRank.of_error(E, 0) is None
    with pytest.raises(ValueError, match="fp16"):
        LowRank(f.u, f.v.float()).check((30, 50), "w")


def test_activation_aware_factors_minimise_the_output_error():
    torch.manual_seed(0)
    X = torch.randn(400, 48) @ torch.diag(torch.logspace(-2, 1, 48))  # a few input directions dominate
    H = X.t() @ X / 400
    E = torch.randn(20, 48)
    out_err = lambda f: float(((X @ (E - f.to_dense()).t()) ** 2).sum())
    aware, plain = weighted_factors(E, H, 3, damp=1e-6), LowRank.of_error(E, 3)
    assert out_err(aware) < 0.5 * out_err(plain)
    # no rank-3 perturbation of the optimum does better
    for _ in range(5):
        g = LowRank((aware.u.float() + 0.01 * torch.randn(20, 3)).half(), aware.v)
        assert out_err(aware) <= out_err(g) * (1 + 1e-3)


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_qlinear_adds_the_low_rank_term_on_every_row_count(rows):
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    qw = QuantizedWeight.quantize(w, lowbit.formats.spec.WeightFormat("int", 4, 32))
    from dataclasses import replace

    qw = replace(qw, lowrank=LowRank.of_error(w - qw.dequantize(), 5))
    bias = torch.randn(40)
    x = torch.randn(rows, 96)
    ref = x @ qw.dequantize().t() + bias
    for kernel in ("auto", "dequant"):
        torch.testing.assert_close(QLinear(qw, bias, kernel)(x), ref, rtol=1e-5, atol=1e-4)
    assert qw.storage_bits() == replace(qw, lowrank=None).storage_bits() + 16 * 5 * (40 + 96)


def _llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (4, 16))


def test_lorc_on_a_llama_beats_gptq_reloads_exactly_and_exports_refuse(tmp_path):
    model, ids = _llama()
    with torch.no_grad():
        ref = model(ids).logits
    g = lowbit.quantize(copy.deepcopy(model), "gptq", calib=ids, bits=3, group_size=32, progress=False)
    q = lowbit.quantize(copy.deepcopy(model), "lorc", calib=ids, bits=3, group_size=32, rank=4, progress=False)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"lorc"}
    with torch.no_grad():
        err_g = float((g(ids).logits - ref).pow(2).mean())
        err_q = float((q(ids).logits - ref).pow(2).mean())
    assert err_q < err_g
    lowbit.save(q, tmp_path / "lorc")
    back = lowbit.load(tmp_path / "lorc", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    from lowbit.io.compressed_tensors import export_compressed_tensors

    with pytest.raises(ValueError, match="low-rank or a residual term"):
        export_compressed_tensors(q, tmp_path / "ct")
    with pytest.raises(ValueError, match="rank"):
        make_method("lorc", rank=0)
