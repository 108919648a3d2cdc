"""SpQR: the leave-one-out test against a written-out loop, the GPTQ loop with small groups,
quantized statistics and kept outliers (their invariants), exact bits, save/load, and quality."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import integer
from lowbit.methods import make_method
from lowbit.methods.spqr import group_error, leave_one_out_reduction, spqr_quantize
from lowbit.quantized_weight import QuantizedWeight


def test_leave_one_out_reduction_is_the_group_error_without_each_weight():
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    w[1, 5] = 9.0  # a weight that stretches its row's range
    d = torch.rand(8) + 0.5
    got = leave_one_out_reduction(w, d, 3)
    for r in range(3):

        def err(cols, r=r):
            x = w[r, cols]
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            s = torch.tensor((hi - lo) / 7).half().float()
            z = torch.clamp(torch.round(-lo / s), 0, 7)
            q = (torch.clamp(torch.round(x / s) + z, 0, 7) - z) * s
            return float((((x - q) / d[cols]) ** 2).sum())

        full = err(list(range(8)))
        assert float(group_error(w, d, 3)[r]) == pytest.approx(full, rel=1e-4)
        for c in range(8):
            assert float(got[r, c]) == pytest.approx(full - err([i for i in range(8) if i != c]), rel=1e-4, abs=1e-6)
    assert int(got.argmax()) == 1 * 8 + 5  # the stretching weight helps most by leaving


def _problem(out=48, k=64):
    torch.manual_seed(0)
    X = torch.randn(512, k) @ (torch.randn(k, k) * 0.2 + torch.eye(k))
    W = torch.randn(out, k)
    W[torch.rand(out, k) < 0.01] *= 12  # heavy-tailed weights: the outliers SpQR keeps
    return W, X, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_spqr_keeps_costly_weights_exactly_and_beats_its_grid_without_them(act_order):
    W, X, H = _problem()
    codes, scale, zero, scale_q, kept, mask = spqr_quantize(W, H, 3, 16, 3, 16, 0.2, act_order=act_order)
    assert 0 < int(mask.sum()) < 0.1 * W.numel()
    # kept weights: code = zero point (the dense part is 0 there), value in fp16
    z_full = integer.expand_groups(zero, 64, 16)
    assert torch.equal(codes[mask].float(), z_full[mask])
    assert torch.equal(kept[mask], kept[mask].half().float()) and bool((kept[~mask] == 0).all())
    assert torch.equal(scale_q.decode().t(), scale)
    dense = integer.dequantize(codes, scale, zero, 16)
    err = lambda w: float(((X @ (w - W).t()) ** 2).mean())
    few = spqr_quantize(W, H, 3, 16, 3, 16, 1e9, act_order=act_order)  # a threshold that keeps nothing
    assert not bool(few[5].any())
    assert err(dense + kept) < 0.7 * err(integer.dequantize(few[0], few[1], few[2], 16))
    more = spqr_quantize(W, H, 3, 16, 3, 16, 0.05, act_order=act_order)[5]
    assert int(more.sum()) > int(mask.sum())


def test_spqr_bits_count_codes_statistics_and_outliers_and_reload_exactly():
    W, _, H = _problem()

    class Stats:
        tokens, groups = 512, 1

    Stats.H = H
    qw = make_method("spqr").quantize_linear(W, Stats)
    o = qw.outliers
    assert o is not None and qw.fmt.scale_bits == 3 and qw.fmt.group_size == 16 and qw.fmt.bits == 3
    assert qw.storage_bits() == 48 * 64 * 3 + 48 * 4 * 3 + 48 * 4 * 3 + 4 * 3 * 32 + o.storage_bits()
    back = QuantizedWeight.from_tensors(qw.to_tensors("s"), "s", qw.fmt, qw.shape)
    assert torch.equal(back.dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="scale_bits"):
        make_method("spqr", scale_bits=0)


def test_spqr_on_a_llama_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (4, 16))
    q = lowbit.quantize(copy.deepcopy(model), "spqr", calib=ids, progress=False)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"spqr"}
    lowbit.save(q, tmp_path / "spqr")
    back = lowbit.load(tmp_path / "spqr", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


@pytest.mark.slow
def test_spqr_beats_gptq_with_the_same_quantized_statistics_on_stories260k(stories, tinystories_halves):
    from lowbit.data import calibration_windows
    from lowbit.eval import perplexity

    model, tok = stories
    calib = calibration_windows(tok, tinystories_halves[0], nsamples=16, seqlen=256, seed=0)
    text = tinystories_halves[1][:60_000]
    g = lowbit.quantize(copy.deepcopy(model), "gptq", calib=calib, bits=3, group_size=16, scale_bits=3,
                        scale_group_size=16, act_order=False, mse=False, progress=False)  # fmt: skip
    q = lowbit.quantize(model, "spqr", calib=calib, progress=False)
    ppl_g = perplexity(g, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < ppl_g, (ppl_q, ppl_g)
