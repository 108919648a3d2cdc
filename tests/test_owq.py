"""Sparse fp16 outliers beside the codes (formats.sparse) and OWQ: the CSR storage and its exact bits,
GPTQ with kept columns against a plain loop's invariants, the sensitivity, every QLinear kernel path
against dequantize-then-matmul, save/load, the fused decode step, refusals, and quality on a real model."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats.sparse import Outliers
from lowbit.formats.spec import WeightFormat
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.owq import column_sensitivity, weak_columns
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight


def test_csr_outliers_round_trip_and_count_their_bits_exactly():
    torch.manual_seed(0)
    values = torch.randn(5, 40)
    mask = torch.rand(5, 40) < 0.2
    mask[2] = False  # an empty row
    o = Outliers.from_dense(values, mask)
    assert o.nnz == int(mask.sum()) and o.col.dtype == torch.int16 and o.crow.tolist()[0] == 0
    torch.testing.assert_close(o.to_dense((5, 40)), torch.where(mask, values.half().float(), torch.zeros(())))
    assert o.storage_bits() == o.nnz * (16 + 16) + 6 * 32
    sparse = o.to_sparse(40, "cpu")
    x = torch.randn(3, 40)
    torch.testing.assert_close(torch.mm(sparse, x.t()).t(), x @ o.to_dense((5, 40)).t())
    with pytest.raises(ValueError, match="do not describe"):
        Outliers(o.crow, o.col, o.val[:-1]).check((5, 40), "w")
    bad = o.col.clone()
    bad[0] = 40
    with pytest.raises(ValueError, match="do not describe"):
        Outliers(o.crow, bad, o.val).check((5, 40), "w")
    with pytest.raises(ValueError, match="fp16"):
        Outliers.from_dense(torch.full((1, 2), 1e6), torch.ones(1, 2, dtype=torch.bool))


def _problem(out=24, k=64, outlier_channels=(3, 17)):
    torch.manual_seed(0)
    X = torch.randn(512, k)
    X[:, list(outlier_channels)] *= 30  # activation outliers: their columns dominate the error
    W = torch.randn(out, k)
    return W, X, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("act_order,group", [(True, 16), (False, 16), (True, -1), (False, -1)])
def test_gptq_with_kept_columns_keeps_them_in_fp16_and_lowers_the_output_error(act_order, group):
    W, X, H = _problem()
    keep = torch.zeros(64, dtype=torch.bool)
    keep[[3, 17]] = True
    codes, s, z, kept = gptq_quantize(W, H, 3, group, False, act_order=act_order, mse=False, keep=keep)
    fmt = WeightFormat("int", 3, group, False)
    dense = QuantizedWeight.from_codes(codes, s, z, fmt).dequantize()
    assert (dense[:, keep] == 0).all()  # kept columns' codes are the zero point
    assert (kept[:, ~keep] == 0).all() and kept.dtype == torch.float32
    torch.testing.assert_close(kept[:, keep], kept[:, keep].half().float())
    w_owq = dense + kept
    plain_codes, ps, pz = gptq_quantize(W, H, 3, group, False, act_order=act_order, mse=False)
    w_gptq = QuantizedWeight.from_codes(plain_codes, ps, pz, fmt).dequantize()
    err = ((X @ (w_owq - W).t()) ** 2).mean()
    err_gptq = ((X @ (w_gptq - W).t()) ** 2).mean()
    assert err < 0.5 * err_gptq, (float(err), float(err_gptq))


def test_column_sensitivity_is_the_plain_formula_and_finds_the_outlier_channels():
    W, _, H = _problem()
    fmt = WeightFormat("int", 3, 16, False)
    deq = QuantizedWeight.quantize(W, fmt).dequantize()
    plain = torch.tensor([float(H[j, j]) * float(((W[:, j] - deq[:, j]) ** 2).sum()) for j in range(64)])
    got = column_sensitivity(W, H, fmt)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=0)
    assert set(torch.topk(got, 2).indices.tolist()) == {3, 17}
    assert weak_columns(4096, 4096, 0.15, None) == 18 and weak_columns(384, 384, 0.15, None) == 0
    assert weak_columns(64, 8, 0.0, 3) == 3


def _owq_linear(bits=4, group=32, k=96, out=40):
    W, _, H = _problem(out=out, k=k)
    keep = torch.zeros(k, dtype=torch.bool)
    keep[[3, 17, 50]] = True
    codes, s, z, kept = gptq_quantize(W, H, bits, group, False, mse=False, keep=keep)
    o = Outliers.from_dense(kept, keep[None].expand(out, k) & (kept != 0))
    qw = QuantizedWeight.from_codes(codes, s, z, WeightFormat("int", bits, group, False), outliers=o)
    return qw, torch.randn(out)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("kernel", ["auto", "dequant"])
def test_qlinear_with_outliers_equals_dequantize_then_matmul_on_every_path(bits, rows, kernel):
    qw, bias = _owq_linear(bits)
    layer = QLinear(qw, bias, kernel)
    x = torch.randn(rows, 96)
    ref = (x.double() @ qw.dequantize().double().t() + bias.double()).float()
    assert qw.outliers is not None and layer.outliers.nnz == qw.outliers.nnz
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    perm = torch.randperm(96)  # an act-order layer: outliers are in stored column order
    permuted = QLinear(qw, bias, kernel, in_perm=perm)
    w_in = torch.empty(40, 96)
    w_in[:, perm] = qw.dequantize()
    torch.testing.assert_close(permuted(x), x @ w_in.t() + bias, rtol=1e-5, atol=1e-4)


def test_outlier_bits_are_counted_and_the_layer_saves_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8)).eval()
    x = torch.randn(64, 96)
    x[:, [5, 9]] *= 20
    q = lowbit.quantize(model, "owq", calib=x, bits=3, group_size=32, columns=2, progress=False)
    first = q[0]
    assert isinstance(first, QLinear) and first.outliers is not None and first.outliers.nnz > 0
    qw = first.quantized_weight
    assert qw.storage_bits() == QuantizedWeight(qw.packed, qw.scale, qw.zero, qw.fmt, qw.shape).storage_bits() + \
        qw.outliers.storage_bits()  # fmt: skip
    recs = {r.name: r for r in q.lowbit_coverage.quantized}
    assert recs["0"].method == "owq" and recs["0"].bits_per_weight == pytest.approx(qw.bits_per_weight)
    lowbit.save(q, tmp_path / "owq")
    back = lowbit.load(tmp_path / "owq", model=copy.deepcopy(model))
    assert torch.equal(back(x), q(x))
    assert torch.equal(back[0].outlier_val, first.outlier_val)


def _owq_llama(layers: int, columns: int):
    """A tiny random Llama quantized with OWQ (``columns`` kept per layer), and its calibration ids."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    ids = torch.randint(0, 64, (4, 16))
    model = tf.LlamaForCausalLM(cfg).eval()
    return lowbit.quantize(model, "owq", calib=ids, bits=4, group_size=32, columns=columns, progress=False), ids


def test_exporters_refuse_outliers_by_name(tmp_path):
    q, _ = _owq_llama(layers=1, columns=2)
    from lowbit.io.compressed_tensors import export_compressed_tensors
    from lowbit.io.gptq_layout import export_gptq

    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: terms beside the codes"):
        export_compressed_tensors(q, tmp_path / "ct")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: terms beside the codes"):
        export_gptq(q, tmp_path / "gptq")


def test_the_fused_decode_step_runs_layers_with_outliers_on_their_own_forward():
    from lowbit.generate import greedy_decode

    q, ids = _owq_llama(layers=2, columns=3)
    prompt = ids[:1, :5]
    fused = greedy_decode(q, prompt, 8, fused=True).tokens
    plain = greedy_decode(q, prompt, 8, fused=False).tokens
    assert torch.equal(torch.as_tensor(fused), torch.as_tensor(plain))


@pytest.mark.slow
def test_owq_beats_gptq_at_3_bits_on_stories260k(stories, tinystories_halves):
    from lowbit.data import calibration_windows
    from lowbit.eval import perplexity

    model, tok = stories
    calib = calibration_windows(tok, tinystories_halves[0], nsamples=16, seqlen=256, seed=0)
    text = tinystories_halves[1][:100_000]
    gptq = lowbit.quantize(copy.deepcopy(model), "gptq", calib=calib, bits=3, group_size=-1, progress=False)
    q = lowbit.quantize(model, "owq", calib=calib, bits=3, group_size=-1, columns=2, progress=False)
    assert q.lowbit_coverage.block_counts() == (35, 35)
    ppl_gptq = perplexity(gptq, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < ppl_gptq, (ppl_q, ppl_gptq)
