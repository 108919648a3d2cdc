"""HQQ: the l_p shrinkage and the half-quadratic zero/scale updates against a plain loop, its gain over
min-max RTN on real weights, and the method end to end (exact bits, exact reload)."""

import copy
import math

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import integer
from lowbit.methods.hqq import hqq_params, shrink_lp


def test_shrink_lp_is_the_generalised_soft_threshold():
    x = torch.tensor([-3.0, -0.5, -0.01, 0.0, 0.02, 0.4, 2.5])
    for beta, p in ((10.0, 0.7), (2.0, 0.5), (4.0, 1.0)):
        expect = []
        for v in x.tolist():
            a = abs(v)
            t = a - a ** (p - 1) / beta if a > 0 else -math.inf
            expect.append(math.copysign(max(t, 0.0), v))
        torch.testing.assert_close(shrink_lp(x, beta, p), torch.tensor(expect))


def plain_hqq_group(w, bits, p, beta, kappa, iters):
    """One group, written out: min-max start; W_e by shrinkage, the zero as the mean of Q - (W - W_e)/s rounded
    to the integer grid, the scale by least squares on W - W_e; keep the iterate of least l_p error, stop once
    it no longer falls."""
    qmax = 2**bits - 1
    lo, hi = min(min(w), 0.0), max(max(w), 0.0)
    s = float(torch.tensor((hi - lo) / qmax).to(torch.float16).float()) if hi > lo else 1.0
    z = float(min(max(round(-lo / s), 0), qmax))
    best = (math.inf, s, z)
    for _ in range(iters):
        q = [min(max(round(v / s + z), 0), qmax) for v in w]
        err = [v - s * (qi - z) for v, qi in zip(w, q)]
        loss = sum(abs(e) ** p for e in err)
        if loss >= best[0]:
            break
        best = (loss, s, z)
        target = [v - float(shrink_lp(torch.tensor(e), beta, p)) for v, e in zip(w, err)]
        z = float(min(max(round(sum(qi - t / s for qi, t in zip(q, target)) / len(w)), 0), qmax))
        d = [qi - z for qi in q]
        num, den = sum(t * di for t, di in zip(target, d)), sum(di * di for di in d)
        if num > 0 and den > 0:
            s = num / den
        beta *= kappa
    return best[1], best[2]


def test_hqq_params_are_the_half_quadratic_loop_written_out():
    torch.manual_seed(0)
    w = torch.randn(3, 24) * torch.tensor([[0.1], [1.0], [3.0]])
    w[0, 5] = 1.5  # an outlier the l_p norm forgives
    scale, zero = hqq_params(w, 3, 8, p=0.7, beta=10.0, kappa=1.01, iters=20)
    # the batched solver stops when no group improves and each group keeps its best; the loop stops per group
    for r in range(3):
        for j in range(3):
            s, z = plain_hqq_group(w[r, 8 * j : 8 * j + 8].tolist(), 3, 0.7, 10.0, 1.01, 20)
            assert float(zero[r, j]) == z
            assert float(scale[r, j]) == pytest.approx(float(torch.tensor(s).to(torch.float16)), rel=1e-3)
    assert zero.dtype == torch.float32 and torch.equal(zero, zero.round())


def test_hqq_handles_ragged_groups_and_symmetric_formats():
    torch.manual_seed(0)
    w = torch.randn(4, 70)
    for sym in (False, True):
        scale, zero = hqq_params(w, 4, 32, symmetric=sym)
        assert scale.shape == zero.shape == (4, 3)
        q = integer.fake_quantize(w, scale, zero, 4, 32)
        s0, z0 = integer.minmax_params(w, 4, 32, sym)
        assert (q - w).abs().pow(0.7).sum() < (integer.fake_quantize(w, s0, z0, 4, 32) - w).abs().pow(0.7).sum()
        if sym:
            assert bool((zero == 8).all())


@pytest.mark.slow
def test_hqq_beats_rtn_minmax_at_w4_and_w3_g64_on_stories260k_weights(stories):
    model, _ = stories
    for bits in (4, 3):
        err_rtn = err_hqq = 0.0
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                w = m.weight.detach().float()
                rtn = lowbit.methods.make_method("rtn", bits=bits, group_size=64).quantize_weight(w)
                hqq = lowbit.methods.make_method("hqq", bits=bits, group_size=64).quantize_weight(w)
                assert hqq.storage_bits() == rtn.storage_bits()  # the same int format, the same bits
                err_rtn += float(((rtn.dequantize() - w) ** 2).sum())
                err_hqq += float(((hqq.dequantize() - w) ** 2).sum())
        assert err_hqq < 0.97 * err_rtn, (bits, err_hqq, err_rtn)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (4, 16))


def test_hqq_on_a_llama_and_an_encoder_states_int_bits_and_reloads_exactly(tmp_path):
    model, ids = _tiny_llama()
    q = lowbit.quantize(model, "hqq", bits=4, group_size=32, progress=False)
    cov = q.lowbit_coverage
    assert {r.method for r in cov.quantized} == {"hqq"} and cov.block_counts() == (14, 14)
    assert cov.mean_bits_per_weight() == pytest.approx(4 + (16 + 4) / 32)
    lowbit.save(q, tmp_path / "llama")
    back = lowbit.load(tmp_path / "llama")
    assert torch.equal(back(input_ids=ids).logits, q(input_ids=ids).logits)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    bert = tf.BertModel(cfg).eval()
    qb = lowbit.quantize(bert, "hqq", bits=3, progress=False)
    assert {r.method for r in qb.lowbit_coverage.quantized} == {"hqq"}
    lowbit.save(qb, tmp_path / "bert")
    back = lowbit.load(tmp_path / "bert")
    assert torch.equal(back(input_ids=ids).last_hidden_state, qb(input_ids=ids).last_hidden_state)


def test_hqq_refuses_codebook_formats_and_bad_knobs():
    with pytest.raises(ValueError, match="format int"):
        lowbit.methods.make_method("hqq", format="lut")
    with pytest.raises(ValueError, match="p \\(1.5\\)"):
        lowbit.methods.make_method("hqq", p=1.5)


@pytest.mark.slow
def test_hqq_beats_rtn_at_3_bits_on_stories260k(stories, tinystories_halves):
    from lowbit.eval import perplexity

    model, tok = stories
    text = tinystories_halves[1][:30_000]
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=64, progress=False)
    q = lowbit.quantize(model, "hqq", bits=3, group_size=64, progress=False)
    assert q.lowbit_coverage.block_counts() == (35, 35)
    assert q.lowbit_coverage.mean_bits_per_weight() == rtn.lowbit_coverage.mean_bits_per_weight()
    ppl_rtn = perplexity(rtn, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < 0.9 * ppl_rtn, (ppl_q, ppl_rtn)
