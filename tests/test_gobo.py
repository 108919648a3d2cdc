"""GOBO: the Gaussian outlier set, the centroid selection against a plain loop, the per-layer codebook's
exact bits, and the method end to end (quality against RTN, exact reload)."""

import copy
import math

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.methods.gobo import gaussian_outliers, select_centroids


def test_outliers_are_the_weights_below_the_gaussian_log_probability_threshold():
    torch.manual_seed(0)
    w = torch.randn(40, 50) * 0.05
    w[3, 7], w[10, 1] = 0.6, -0.4
    mu, sigma = float(w.double().mean()), float(w.double().std(unbiased=False))
    for threshold in (-4.0, 0.0):
        expect = torch.zeros_like(w, dtype=torch.bool)
        for i in range(40):
            for j in range(50):
                x = float(w[i, j])
                logp = -0.5 * math.log(2 * math.pi * sigma**2) - (x - mu) ** 2 / (2 * sigma**2)
                expect[i, j] = logp < threshold
        assert torch.equal(gaussian_outliers(w, threshold), expect)
    assert bool(gaussian_outliers(w)[3, 7]) and bool(gaussian_outliers(w)[10, 1])
    assert gaussian_outliers(w).float().mean() < 0.01


def plain_selection(x, k, max_iters):
    """One row, written out: the means of the row's Gaussian over k equal-probability bins, then assign to the
    nearest centroid and move each to its members' mean while the L1 error falls; the lowest-L1 centroids."""
    n = len(x)
    mu = sum(x) / n
    sigma = math.sqrt(sum((v - mu) ** 2 for v in x) / n)
    normal = torch.distributions.Normal(0.0, 1.0)
    edges = [normal.icdf(torch.tensor(i / k, dtype=torch.float64)).item() for i in range(k + 1)]

    def pdf(e):
        return 0.0 if math.isinf(e) else math.exp(-e * e / 2) / math.sqrt(2 * math.pi)

    c = [mu + sigma * k * (pdf(edges[i]) - pdf(edges[i + 1])) for i in range(k)]
    best, best_l1 = c, math.inf
    for _ in range(max_iters):
        code = [min(range(k), key=lambda j: (abs(v - c[j]), j)) for v in x]
        l1 = sum(abs(v - c[j]) for v, j in zip(x, code))
        if l1 >= best_l1:
            break
        best, best_l1 = c, l1
        members = [[v for v, j in zip(x, code) if j == i] for i in range(k)]
        c = sorted(sum(m) / len(m) if m else c[i] for i, m in enumerate(members))
    return best


def test_centroid_selection_is_the_l1_converged_loop_written_out():
    torch.manual_seed(0)
    x = torch.randn(3, 300) * torch.tensor([[0.02], [1.0], [0.3]]) + torch.tensor([[0.0], [0.5], [-0.1]])
    valid = torch.ones_like(x, dtype=torch.bool)
    got = select_centroids(x, valid, 8, max_iters=100)
    for r in range(3):
        ref = torch.tensor(plain_selection(x[r].tolist(), 8, 100))
        torch.testing.assert_close(got[r], ref, rtol=1e-4, atol=1e-5)
    # the entries left out (outliers) do not move the centroids
    y = torch.cat([x, torch.full((3, 5), 50.0)], 1)
    torch.testing.assert_close(select_centroids(y, torch.cat([valid, torch.zeros(3, 5, dtype=torch.bool)], 1), 8), got)


def test_gobo_weight_is_one_codebook_per_layer_plus_its_outliers_with_exact_bits():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * 0.05
    w[0, 0], w[5, 9] = 1.0, -0.8
    qw = lowbit.methods.make_method("gobo").quantize_weight(w)
    assert qw.fmt.kind == "lut" and qw.fmt.bits == 3 and qw.fmt.group_size is None
    assert tuple(qw.scale.shape) == (1, 8)  # one codebook for the layer
    mask = gaussian_outliers(w)
    assert qw.outliers.nnz == int(mask.sum())
    deq = qw.dequantize()
    torch.testing.assert_close(deq[mask], w[mask], rtol=1e-3, atol=1e-3)  # outliers kept (fp16 residuals)
    assert set(deq[~mask].unique().tolist()) <= set(qw.scale.float().reshape(-1).tolist())
    expect = math.ceil(48 * 80 * 3 / 8) * 8 + 8 * 16 + qw.outliers.nnz * (16 + 16) + 49 * 32
    assert qw.storage_bits() == expect


def test_gobo_runs_on_a_llama_and_an_encoder_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (4, 16))
    q = lowbit.quantize(model, "gobo", progress=False)
    cov = q.lowbit_coverage
    assert {r.method for r in cov.quantized} == {"gobo"} and cov.block_counts() == (14, 14)
    lowbit.save(q, tmp_path / "llama")
    back = lowbit.load(tmp_path / "llama")
    assert torch.equal(back(input_ids=ids).logits, q(input_ids=ids).logits)
    bcfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    bert = lowbit.quantize(tf.BertModel(bcfg).eval(), "gobo", bits=4, outlier_threshold=-3.0, progress=False)
    assert {r.method for r in bert.lowbit_coverage.quantized} == {"gobo"}
    lowbit.save(bert, tmp_path / "bert")
    back = lowbit.load(tmp_path / "bert")
    assert torch.equal(back(input_ids=ids).last_hidden_state, bert(input_ids=ids).last_hidden_state)


def test_gobo_refuses_other_formats():
    with pytest.raises(ValueError, match="lut"):
        lowbit.methods.make_method("gobo", format="int")


@pytest.mark.slow
def test_gobo_beats_rtn_at_3_bits_on_stories260k(stories, tinystories_halves):
    from lowbit.eval import perplexity

    model, tok = stories
    text = tinystories_halves[1][:30_000]
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=-1, progress=False)
    q = lowbit.quantize(model, "gobo", bits=3, progress=False)
    assert q.lowbit_coverage.block_counts() == (35, 35)
    ppl_rtn = perplexity(rtn, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < 0.85 * ppl_rtn, (ppl_q, ppl_rtn)
