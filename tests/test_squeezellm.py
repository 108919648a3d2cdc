"""Codebook (lut) weights and SqueezeLLM: weighted k-means against a plain Lloyd loop, the format's
storage and exact bits, the Fisher against per-example autograd, and the method end to end."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import codebook
from lowbit.formats.spec import WeightFormat
from lowbit.methods.squeezellm import weight_fisher
from lowbit.quantized_weight import QuantizedWeight


def plain_weighted_lloyd(x, w, c, iters):
    """One row, written out: assign to the nearest centroid, move each to its members' weighted mean."""
    c = c.clone()
    for _ in range(iters):
        code = torch.tensor([int(torch.argmin((c - v).abs())) for v in x])
        for j in range(len(c)):
            sel = code == j
            if w[sel].sum() > 0:
                c[j] = (w[sel] * x[sel]).sum() / w[sel].sum()
        c = c.sort().values
    return c


def test_weighted_kmeans_is_lloyds_algorithm_from_the_better_of_two_starts():
    torch.manual_seed(0)
    x = torch.randn(3, 200)
    w = torch.rand(3, 200) ** 4
    got = codebook.weighted_kmeans(x, w, 8, iters=30)
    for r in range(3):
        order = torch.argsort(x[r])
        cum = torch.cumsum(w[r][order], 0) / w[r].sum()
        quantiles = torch.stack([x[r][order][min(int((cum < (i + 0.5) / 8).sum()), 199)] for i in range(8)])
        lo, hi = x[r].min(), x[r].max()
        uniform = lo + (hi - lo) * (torch.arange(8) + 0.5) / 8
        refs = [plain_weighted_lloyd(x[r], w[r], s, 30) for s in (quantiles, uniform)]
        errs = [float((w[r] * (x[r][:, None] - c[None]).abs().min(1).values ** 2).sum()) for c in refs]
        torch.testing.assert_close(got[r], refs[errs.index(min(errs))], rtol=1e-5, atol=1e-6)
    # weighting moves the centroids toward the heavy values: lower weighted error than plain k-means
    plain = codebook.weighted_kmeans(x, torch.ones_like(x), 8, iters=30)

    def werr(c):
        return (w * (x - c.gather(1, codebook.assign(x, c))) ** 2).sum()

    assert werr(got) < werr(plain)


@pytest.mark.parametrize("bits,group", [(3, -1), (4, -1), (2, 48)])
def test_lut_weights_decode_to_their_codebook_and_count_their_bits(bits, group):
    torch.manual_seed(0)
    w = torch.randn(12, 100)
    fmt = WeightFormat("lut", bits, group)
    qw = QuantizedWeight.quantize(w, fmt)
    assert qw.scale.dtype == torch.float16 and qw.zero is None
    ng = 1 if group == -1 else 3  # 100 = 48 + 48 + a ragged 4
    assert tuple(qw.scale.shape) == (12, ng * 2**bits)
    deq = qw.dequantize()
    books = qw.scale.float().reshape(12, ng, -1)
    for r in range(12):
        for j in range(ng):
            seg = deq[r, (0 if group == -1 else j * 48) : (100 if group == -1 else min(100, (j + 1) * 48))]
            assert set(seg.tolist()) <= set(books[r, j].tolist())
    assert qw.storage_bits() == qw.packed.numel() * 8 + 12 * ng * 2**bits * 16
    back = QuantizedWeight.from_tensors(qw.to_tensors("l"), "l", fmt, (12, 100))
    assert torch.equal(back.dequantize(), deq)
    assert ((deq - w) ** 2).mean() < ((QuantizedWeight.quantize(w, WeightFormat("int", bits, group)).dequantize() - w)
                                      ** 2).mean()  # fmt: skip
    per_tensor = QuantizedWeight.quantize(w, WeightFormat("lut", bits, None))  # one codebook for every row
    assert tuple(per_tensor.scale.shape) == (1, 2**bits)
    assert set(per_tensor.dequantize().unique().tolist()) <= set(per_tensor.scale.float().reshape(-1).tolist())


def test_weight_fisher_is_the_sum_of_per_example_squared_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    x = torch.randn(7, 6)
    got = weight_fisher(model, ["0", "2"], [x[:4], x[4:]])
    expect = torch.zeros(5, 6)
    for i in range(7):
        model.zero_grad()
        out = model(x[i : i + 1])
        torch.nn.functional.cross_entropy(out, out.argmax(-1), reduction="sum").backward()
        expect += model[0].weight.grad ** 2
    torch.testing.assert_close(got["0"], expect)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (6, 16))


def test_squeezellm_on_a_llama_keeps_outliers_reloads_exactly_and_beats_plain_kmeans(tmp_path):
    model, ids = _tiny_llama()
    ref = model(input_ids=ids).logits
    km = lowbit.quantize(copy.deepcopy(model), "rtn", format="lut", bits=3, group_size=-1, progress=False)
    q = lowbit.quantize(model, "squeezellm", calib=ids, bits=3, outlier_fraction=0.01, progress=False)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"squeezellm"}
    lin = q.model.layers[0].mlp.down_proj
    assert lin.fmt.kind == "lut" and lin.outliers is not None and lin.outliers.nnz == int(0.01 * 64 * 96)

    def kl(m):
        out = m(input_ids=ids).logits.log_softmax(-1)
        return torch.nn.functional.kl_div(out, ref.log_softmax(-1), log_target=True, reduction="batchmean")

    assert kl(q) < kl(km)
    lowbit.save(q, tmp_path / "sq")
    back = lowbit.load(tmp_path / "sq")
    assert torch.equal(back(input_ids=ids).logits, q(input_ids=ids).logits)


def test_squeezellm_on_an_encoder_says_it_weighted_by_input_energy():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    model = tf.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (4, 16))
    assert weight_fisher(model, ["encoder.layer.0.output.dense"], [ids]) == {}  # hidden states: no loss to take
    q = lowbit.quantize(model, "squeezellm", calib=ids, bits=4, progress=False)
    assert {r.method for r in q.lowbit_coverage.quantized} == {
        "squeezellm (weighted by input energy: no logits for a Fisher)"
    }


def test_squeezellm_refuses_other_formats():
    with pytest.raises(ValueError, match="lut"):
        lowbit.methods.make_method("squeezellm", format="int")


@pytest.mark.slow
def test_squeezellm_beats_rtn_at_3_bits_on_stories260k(stories, tinystories_halves):
    from lowbit.data import calibration_windows
    from lowbit.eval import perplexity

    model, tok = stories
    calib = calibration_windows(tok, tinystories_halves[0], nsamples=16, seqlen=256, seed=0)
    text = tinystories_halves[1][:100_000]
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=-1, progress=False)
    q = lowbit.quantize(model, "squeezellm", calib=calib, bits=3, progress=False)
    assert q.lowbit_coverage.block_counts() == (35, 35)
    ppl_rtn = perplexity(rtn, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < 0.8 * ppl_rtn, (ppl_q, ppl_rtn)
