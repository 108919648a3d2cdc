"""Binary-coding weights (formats.binary, kind bcq) and the bcq method (LUT-GEMM's format): the sign
table, the alternating fit against its greedy start and a written-out least-squares step, exact bits,
the table kernel against dequantize-then-matmul, and the method end to end."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import binary
from lowbit.formats.spec import WeightFormat
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight


def test_a_code_is_the_signed_sum_of_its_planes_plus_the_offset():
    scale = torch.tensor([[0.5, 0.25, 0.125, 1.0]])  # alphas of 3 planes, then the offset
    table = binary.table(scale, 3, 1, 1)[0]
    for c in range(8):
        signs = [1 if (c >> i) & 1 else -1 for i in range(3)]
        assert float(table[c]) == pytest.approx(1.0 + 0.5 * signs[0] + 0.25 * signs[1] + 0.125 * signs[2])


@pytest.mark.parametrize("bits,group", [(2, -1), (3, 32), (3, 48), (4, 64)])
def test_alternating_fit_improves_on_the_greedy_start_and_counts_its_bits(bits, group):
    torch.manual_seed(0)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    fmt = WeightFormat("bcq", bits, group)
    qw = QuantizedWeight.quantize(w, fmt)
    greedy = QuantizedWeight.quantize(w, fmt, scale=binary.fit(w, bits, group, iters=0))
    err = lambda q: float((q.dequantize() - w).pow(2).sum())
    assert err(qw) < err(greedy)
    ng = 1 if group == -1 else -(-128 // group)
    assert qw.storage_bits() == 16 * 128 * bits + 16 * ng * (bits + 1) * 16
    # every code is its group's nearest table value
    vals = binary.table(qw.scale, bits, 16, ng).reshape(16, ng, -1)
    g = 128 if group == -1 else group
    for r in range(0, 16, 5):
        for k in range(0, 128, 7):
            d = (vals[r, k // g] - w[r, k]).abs()
            assert float(d[qw.codes()[r, k].long()]) == pytest.approx(float(d.min()), abs=1e-6)
    back = QuantizedWeight.from_tensors(qw.to_tensors("b"), "b", fmt, qw.shape)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_the_least_squares_step_solves_alphas_and_offset_given_the_signs():
    torch.manual_seed(0)
    x = torch.randn(1, 32)
    p = binary.fit(x, 2, -1, iters=30).float()
    vals = binary.table(p, 2, 1, 1)[0]
    codes = torch.argmin((x[0][:, None] - vals[None]).abs(), 1)
    B = torch.stack([binary.sign_matrix(2)[codes][:, 0], binary.sign_matrix(2)[codes][:, 1], torch.ones(32)], 1)
    sol = torch.linalg.lstsq(B.double(), x[0].double()[:, None]).solution[:, 0]
    # the fit is a fixed point of the alternation (up to its fp16 storage)
    torch.testing.assert_close(p[0].double(), sol, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rows", [1, 4, 20])
def test_bcq_layers_run_on_the_table_kernel_as_dequantize_then_matmul(rows):
    torch.manual_seed(0)
    qw = QuantizedWeight.quantize(torch.randn(48, 160), WeightFormat("bcq", 3, 32))
    x = torch.randn(rows, 160)
    ref = x @ qw.dequantize().t()
    torch.testing.assert_close(QLinear(qw)(x), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(QLinear(qw, kernel="dequant")(x), ref, rtol=1e-5, atol=1e-4)


def test_bcq_method_on_a_llama_reloads_exactly_and_beats_rtn(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    q = lowbit.quantize(copy.deepcopy(model), "bcq", bits=3, group_size=32, progress=False)
    r = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=32, progress=False)
    assert {x.method for x in q.lowbit_coverage.quantized} == {"bcq"}
    with torch.no_grad():
        assert float((q(ids).logits - ref).pow(2).mean()) < float((r(ids).logits - ref).pow(2).mean())
    lowbit.save(q, tmp_path / "bcq")
    back = lowbit.load(tmp_path / "bcq", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    with pytest.raises(ValueError, match="bcq"):
        lowbit.methods.make_method("bcq", format="int")


def test_degenerate_groups_keep_a_finite_fit():
    """A constant group, or one of two values, gives planes of identical signs: the least-squares
    step is singular there (MiniLM hit it), and such groups keep the parameters of the step before."""
    w = torch.randn(64, 256)
    w[3, :128] = 0.5
    w[5, :128] = torch.where(torch.rand(128) > 0.5, 1.0, -1.0)
    p = binary.fit(w, 3, 128)
    assert bool(torch.isfinite(p.float()).all())
    q = binary.dequantize(binary.quantize(w, p, 3, 128), p, 3, 128)
    assert float((q - w)[3, :128].abs().max()) == 0.0
    assert float((q - w)[5, :128].abs().max()) == 0.0


def test_a_checkpoint_with_zero_alphas_loads(tmp_path):
    """A constant group fits alphas of 0 (its planes carry nothing): valid binary coding, which the
    loader's zero-scale check must not take for corruption (SmolLM2-135M's weights produce it)."""
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:4, :32] = 0.25
    q = lowbit.quantize(copy.deepcopy(model), "bcq", bits=3, group_size=32, progress=False)
    qw = q.model.layers[0].mlp.down_proj.quantized_weight
    assert bool((qw.scale.float() == 0).any())
    lowbit.save(q, tmp_path / "bcq")
    back = lowbit.load(tmp_path / "bcq", model=copy.deepcopy(model))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
