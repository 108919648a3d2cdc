"""SignRound: the learned grid against a plain formula, the start equal to min-max RTN, codes that
freeze to exactly what was simulated, signed steps, and quality against RTN on real models."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats.spec import WeightFormat
from lowbit.methods.signround import _signed_step
from lowbit.nn.quantizers import WeightQuantizer
from lowbit.quantized_weight import QuantizedWeight


def plain_signround_value(w, v, alpha, beta, bits, group, symmetric):
    """SignRound's quantized weight written out group by group (the paper's formula, scale rounded to fp16)."""
    out = torch.empty_like(w)
    top = 2**bits - 1
    for r in range(w.shape[0]):
        for j, c0 in enumerate(range(0, w.shape[1], group)):
            seg = w[r, c0 : c0 + group]
            lo = min(float(seg.min()), 0.0) * float(alpha[r, j])
            hi = max(float(seg.max()), 0.0) * float(beta[r, j])
            if symmetric:
                scale = max(hi, -lo) / (2 ** (bits - 1) - 1)
            else:
                scale = (hi - lo) / top
            scale = float(torch.tensor(scale).half().float())
            zero = 2 ** (bits - 1) if symmetric else min(max(round(-lo / scale), 0), top)
            q = torch.clamp(torch.round(seg / scale + v[r, c0 : c0 + group]) + zero, 0, top)
            out[r, c0 : c0 + group] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, False), (3, 24, False), (4, 16, True), (2, 32, False)])
def test_signed_grid_is_the_plain_formula_and_freezes_to_what_it_simulates(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 56) * torch.linspace(0.1, 3, 56)  # 56 = ragged last group for 16, 24 and 32
    wq = WeightQuantizer(WeightFormat("int", bits, group, symmetric))
    v, alpha, beta = wq.start_signed_rounding(w)
    with torch.no_grad():
        v.uniform_(-0.5, 0.5)
        alpha.uniform_(0.6, 1.0)
        beta.uniform_(0.6, 1.0)
    simulated = wq(w).detach()
    expected = plain_signround_value(w, v.detach(), alpha.detach(), beta.detach(), bits, group, symmetric)
    torch.testing.assert_close(simulated, expected, rtol=0, atol=1e-6)
    wq.finish_signed_rounding(w, "signround")
    assert wq.rounding == "fixed" and wq.method == "signround"
    assert wq.fixed.scale.dtype == torch.float16  # the scale learned is the scale stored
    torch.testing.assert_close(wq.fixed.dequantize(), simulated, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_signround_starts_at_min_max_rtn(symmetric):
    w = torch.randn(8, 64)
    fmt = WeightFormat("int", 4, 32, symmetric)
    wq = WeightQuantizer(fmt)
    wq.start_signed_rounding(w)
    torch.testing.assert_close(wq(w).detach(), QuantizedWeight.quantize(w, fmt).dequantize(), rtol=0, atol=0)


def test_gradients_reach_offsets_and_range_factors_and_a_step_moves_by_the_sign():
    w = torch.randn(4, 32)
    wq = WeightQuantizer(WeightFormat("int", 3, 16, False))
    v, alpha, beta = wq.start_signed_rounding(w)
    x = torch.randn(10, 32)
    (x @ wq(w).t()).pow(2).sum().backward()
    assert v.grad.abs().sum() > 0 and alpha.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0
    before = alpha.detach().clone()
    _signed_step(alpha, 0.01, 0.0, 1.0)
    expected = (before - 0.01 * torch.sign(alpha.grad)).clamp(0, 1)
    torch.testing.assert_close(alpha.detach(), expected)
    v.grad = torch.full_like(v, -1.0)
    for _ in range(200):
        _signed_step(v, 0.01, -0.5, 0.5)
    assert float(v.max()) == 0.5  # offsets never leave [-0.5, 0.5]


def test_signround_lowers_a_two_layer_units_output_error_below_rtn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    # correlated inputs (a few directions carry most of the energy), as a real model's activations are: with
    # independent channels every weight's own rounding error is its whole gradient and nearest is optimal
    x = torch.randn(64, 32, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(64, 32, 64)
    ref = model(x).detach()
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=32, progress=False)
    sr = lowbit.quantize(copy.deepcopy(model), "signround", calib=x, bits=3, group_size=32, iters=200,
                         progress=False)  # fmt: skip
    assert {r.method for r in sr.lowbit_coverage.quantized} == {"signround"}
    err_rtn = (rtn(x) - ref).pow(2).mean()
    err_sr = (sr(x) - ref).pow(2).mean()
    assert err_sr < 0.7 * err_rtn, (float(err_sr), float(err_rtn))


def test_the_mse_start_is_the_rtn_clip_search_grid():
    from lowbit.formats import integer
    from lowbit.methods.signround import _mse_factors

    torch.manual_seed(0)
    w = torch.randn(8, 256) * torch.rand(8, 1)
    fmt = WeightFormat("int", 3, 64, False)
    wq = WeightQuantizer(fmt)
    _, alpha, beta = wq.start_signed_rounding(w)
    _mse_factors(w, fmt, alpha, beta)
    scale, zero = integer.mse_params(w, 3, 64, False)
    assert float(alpha.min()) < 1.0  # some group's range shrank
    got = wq(w).detach()
    searched = QuantizedWeight.quantize(w, fmt, scale, zero).dequantize()
    minmax = QuantizedWeight.quantize(w, fmt).dequantize()
    # the same grids up to a rounding flip of a zero point where a factor lands on a .5 boundary
    assert (got != searched).float().mean() < 0.05
    err, err_search, err_minmax = ((x - w).pow(2).mean() for x in (got, searched, minmax))
    assert abs(err - err_search) < 0.01 * err_search and err < 0.9 * err_minmax


def test_signround_refuses_formats_without_an_integer_grid_and_bad_knobs():
    with pytest.raises(ValueError, match="signround"):
        lowbit.methods.make_method("signround", format="nf4")
    with pytest.raises(ValueError, match="iters"):
        lowbit.methods.make_method("signround", iters=0)
    with pytest.raises(ValueError, match="lr"):
        lowbit.methods.make_method("signround", lr=-1.0)
    with pytest.raises(ValueError, match="init"):
        lowbit.methods.make_method("signround", init="gptq")


@pytest.mark.slow
def test_signround_beats_rtn_and_reloads_exactly_on_stories260k(stories, tinystories_halves, tmp_path):
    from lowbit.data import calibration_windows
    from lowbit.eval import perplexity

    model, tok = stories
    calib = calibration_windows(tok, tinystories_halves[0], nsamples=16, seqlen=256, seed=0)
    text = tinystories_halves[1][:100_000]
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=32, progress=False)
    q = lowbit.quantize(model, "signround", calib=calib, bits=3, group_size=32, iters=100, progress=False)
    assert q.lowbit_coverage.block_counts() == (35, 35)
    ppl_rtn = perplexity(rtn, tok, text, progress=False)["ppl"]
    ppl_q = perplexity(q, tok, text, progress=False)["ppl"]
    assert ppl_q < 0.9 * ppl_rtn, (ppl_q, ppl_rtn)
    lowbit.save(q, tmp_path / "sr")
    back = lowbit.load(tmp_path / "sr")
    assert perplexity(back, tok, text, progress=False)["ppl"] == ppl_q
