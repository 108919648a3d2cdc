"""The vision-transformer post-training literature (issue 14): the activation quantizers for
the distributions transformers produce (log2, log-sqrt2, twin uniform), checked against
their formulas written out plainly, and RepQ-ViT's reparameterization, checked to give the
same codes as the per-channel quantization it replaces."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.formats import activation as A
from lowbit.formats.activation import ActFormat
from lowbit.methods.transforms import fold_scales, fold_shift, transform_input
from lowbit.models.vit_cifar import ViTCifar
from lowbit.nn.qmodule import QModule
from lowbit.observers import ChannelStats, nonuniform_params, static_params

from test_hf_vit import build, images
from test_hf_vit import output as hf_output


def output(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else hf_output(out)


def log_fmt(kind: str, bits: int = 4) -> ActFormat:
    return ActFormat(bits, "tensor", dynamic=False, symmetric=False, kind=kind)


def stats_of(values: torch.Tensor) -> ChannelStats:
    rows = values.reshape(-1, values.shape[-1])
    return ChannelStats(rows.amin(0), rows.amax(0), rows.amin(0)[None], rows.amax(0)[None], rows)


# ---- the quantizers against their formulas ---------------------------------------------------------


@pytest.mark.parametrize("kind,base", [("log2", 2.0), ("logsqrt2", math.sqrt(2))])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log_quantizers_are_the_papers_formulas(kind, base, bits):
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(64, 50) * 4, -1)
    x[0, :3] = torch.tensor([0.0, 2.0, 1e-30])  # an exact zero, one above the top, one below the last code
    s = torch.tensor([0.9])
    got = A.fake_quantize(x, log_fmt(kind, bits), s, torch.zeros(1))
    top = 2**bits - 1
    want = torch.empty_like(x)
    for i, v in enumerate(x.reshape(-1).tolist()):
        if v <= 0:
            want.view(-1)[i] = 0.0
            continue
        q = round(-math.log(v / 0.9, base))
        want.view(-1)[i] = 0.0 if q > top else 0.9 * base ** (-min(max(q, 0), top))
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    assert got[0, 0] == 0 and math.isclose(float(got[0, 1]), 0.9, rel_tol=1e-6)
    assert (got[0, 2] == 0) == (bits <= 4)  # 2^-255 lies below float32: at 8 bits every positive value has a code
    levels = torch.unique(got)
    assert levels.numel() <= 2**bits + 1  # every code's value, and 0


def test_log_sqrt2_is_shifts_and_one_sqrt2_factor_at_inference():
    q = torch.arange(16.0)
    shifted = torch.exp2(-torch.ceil(q / 2)) * torch.where(q % 2 == 1, torch.tensor(math.sqrt(2)), torch.tensor(1.0))
    assert torch.allclose(shifted, torch.exp2(-q / 2), rtol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_twin_uniform_selects_one_of_two_grids(signed):
    torch.manual_seed(0)
    fmt = ActFormat(4, "tensor", dynamic=False, symmetric=signed, kind="twin")
    x = F.gelu(torch.randn(4000) * 3) if signed else torch.softmax(torch.randn(40, 100) * 3, -1).reshape(-1)
    d1, d2 = (0.17 / 8, 0.4) if signed else (1 / 7 / 16, 1 / 7)
    got = A.fake_quantize(x[:, None], fmt, torch.tensor([d1, d2]), torch.zeros(1)).reshape(-1)
    qn = 8  # 2^(bits-1) codes per grid
    for v, g in zip(x.tolist(), got.tolist()):
        if signed:
            want = max(-qn, min(0, round(v / d1))) * d1 if v < 0 else min(qn - 1, round(v / d2)) * d2
        else:
            want = round(v / d1) * d1 if v < (qn - 0.5) * d1 else min(qn - 1, round(v / d2)) * d2
        assert math.isclose(g, want, rel_tol=1e-5, abs_tol=1e-7)
    assert torch.unique(got).numel() <= 16


def test_nonuniform_observers_pick_the_least_squared_error_candidate():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(256, 64) * 3, -1)
    fmt = log_fmt("logsqrt2")
    st = stats_of(x.reshape(-1, 1))
    picked = nonuniform_params(st, fmt, "mse")
    vals = x.reshape(-1)
    tops = [float(vals.max())] + [float(torch.quantile(vals, q)) for q in (0.999, 0.9999, 0.99999)]
    errs = [float((A.fake_quantize(vals[:, None], fmt, torch.tensor([t]), None) - vals[:, None]).pow(2).mean())
            for t in tops]  # fmt: skip
    assert float((A.fake_quantize(vals[:, None], fmt, picked, None) - vals[:, None]).pow(2).mean()) <= min(errs) + 1e-12
    assert math.isclose(float(nonuniform_params(st, fmt, "minmax")), float(vals.max()), rel_tol=1e-6)
    twin = nonuniform_params(st, ActFormat(4, "tensor", dynamic=False, symmetric=False, kind="twin"), "mse")
    ratio = float(twin[1] / twin[0])
    assert math.isclose(math.log2(ratio), round(math.log2(ratio)), abs_tol=1e-4)  # d2 = 2^m d1


def test_nonuniform_kinds_are_static_per_tensor_and_round_trip():
    with pytest.raises(ValueError, match="static per tensor"):
        ActFormat(4, "token", dynamic=True, kind="log2")
    with pytest.raises(ValueError, match="unknown activation kind"):
        ActFormat(4, "tensor", dynamic=False, kind="log10")
    fmt = log_fmt("logsqrt2")
    assert ActFormat.from_dict(fmt.to_dict()) == fmt and "logsqrt2" in fmt.describe()
    assert ActFormat.from_dict({"bits": 8, "granularity": "tensor", "dynamic": False}).kind == "int"


# ---- RepQ-ViT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [True, False])
def test_repq_reparameterization_gives_the_per_channel_codes_exactly(fold):
    """Per-channel asymmetric quantization of a LayerNorm's output equals per-tensor quantization on
    (s~, round(mean z)) after the change of variables, folded into the norm or applied by the
    consumer's quantizer."""
    torch.manual_seed(0)
    c = 24
    ln = nn.LayerNorm(c)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(c) * 4 + 0.1)
        ln.bias.copy_(torch.randn(c) * 2)
    lin = QModule(nn.Linear(c, 16), lowbit.WeightFormat("int", 8, -1))
    x = torch.randn(512, c)
    h = ln(x).detach()
    fmt = ActFormat(4, "tensor", dynamic=False, symmetric=False)
    s, z = static_params(stats_of(h), fmt, "minmax", None, torch.arange(c + 1))
    per_channel = A.codes(h, s, z, fmt) * s  # [512, c]: each channel on its own grid
    want = lin.op(per_channel, lin.weight).detach()

    s_t, z_t = s.mean(), torch.round(z.mean())
    shift, r = -s * (z - z_t), s / s_t
    if fold:
        fold_shift(ln, [lin], shift)
        fold_scales(ln, [lin], r)
        h2 = ln(x).detach()
    else:
        transform_input(lin, shift=shift, scale=r)
        h2 = lin.input_q.transform(h)
    codes_t = torch.round(h2 / s_t) + z_t
    assert torch.equal(codes_t.clamp(0, 15), (torch.round(h / s) + z).clamp(0, 15))  # the same codes
    got = lin.op(A.codes(h2, s_t, z_t, fmt) * s_t, lin.weight).detach()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def tiny_vit():
    torch.manual_seed(0)
    return ViTCifar(dim=32, depth=2, heads=4, mlp_dim=48, patch=8).eval()


def test_repq_vit_on_the_cifar_vit_and_a_transformers_vit_reparameterizes_and_reloads(tmp_path):
    x = images(32)
    for name, model in [("cifar", tiny_vit()), ("hf", build("vit"))]:
        ref = output(model(x)).detach()
        q = lowbit.quantize(copy.deepcopy(model), "repq_vit", bits=8, act_bits=8, calib=x, progress=False)
        cov = q.lowbit_coverage
        assert {r.method for r in cov.quantized} == {"repq_vit"}
        notes = [r.act for r in cov.quantized if "RepQ-ViT" in r.act]
        if name == "hf":  # pre-norm: every q/k/v and fc1 input folded into its LayerNorm (2 layers x 4)
            assert len(notes) == 8 and all("folded into it" in n for n in notes)
        else:  # post-norm: linear1 of each layer and the second layer's q/k/v, as channel transforms
            assert len(notes) == 5 and all("channel transform" in n for n in notes)
        softmaxes = [m for n, m in q.named_modules() if n.endswith("softmax") and hasattr(m, "output_q")]
        assert softmaxes and all(m.output_q.fmt.kind == "logsqrt2" for m in softmaxes)
        got = output(q(x)).detach()
        assert F.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.98
        lowbit.save(q, tmp_path / name)
        again = lowbit.load(tmp_path / name)
        assert torch.allclose(output(again(x)), got, atol=1e-5)


def test_repq_vit_refuses_other_families_and_weight_only_runs():
    from test_one_toolkit import tiny_llama

    model, ids = tiny_llama()
    with pytest.raises(ValueError, match="repq_vit cannot run on"):
        lowbit.quantize(model, "repq_vit", act_bits=4, calib=ids, progress=False)
    with pytest.raises(ValueError, match="act_bits"):
        lowbit.quantize(tiny_vit(), "repq_vit", bits=4, calib=images(8), progress=False)


# ---- FQ-ViT ----------------------------------------------------------------------------------------


def test_power_of_two_factors_share_one_zero_and_pick_each_channels_best_factor():
    from lowbit.observers import ptf_params

    torch.manual_seed(0)
    spread = torch.tensor([0.1, 0.5, 1.0, 8.0])  # channel ranges an order of magnitude apart
    x = torch.randn(4096, 4) * spread + 0.3
    fmt = ActFormat(8, "tensor", dynamic=False, symmetric=False)
    scale, zero = ptf_params(stats_of(x), fmt)
    assert torch.unique(zero).numel() == 1
    s_top = (float(x.max()) - min(float(x.min()), 0)) / 255
    ratios = torch.log2(scale / (s_top / 8))
    assert torch.allclose(ratios, torch.round(ratios), atol=1e-5) and ratios.min() >= 0 and ratios.max() <= 3
    for c in range(4):  # each channel's factor is the best of the four for that channel
        errs = [float(((torch.round(x[:, c] / s) + zero[0]).clamp(0, 255) - zero[0]).mul(s).sub(x[:, c]).pow(2).mean())
                for s in (s_top / 8 * 2.0**a for a in range(4))]  # fmt: skip
        assert int(ratios[c]) == min(range(4), key=errs.__getitem__)
    assert float(scale[0]) < float(scale[3])  # the narrow channel gets the finer grid


def test_fq_vit_quantizes_layer_norm_inputs_per_channel_and_attention_on_log2():
    x = images(32)
    model = tiny_vit()
    ref = model(x).detach()
    q = lowbit.quantize(copy.deepcopy(model), "fq_vit", bits=8, act_bits=8, calib=x, progress=False)
    layer = q.transformer.layers[0]
    attn = layer.self_attn.softmax.output_q
    assert attn.fmt.kind == "log2" and attn.fmt.bits == 4 and float(attn.scale) == 1.0
    res = layer.add1.output_q
    assert res.fmt.granularity == "group" and res.scale.numel() == 32 and torch.unique(res.zero).numel() == 1
    assert F.cosine_similarity(q(x).flatten(), ref.flatten(), 0) > 0.98


# ---- PTQ4ViT ---------------------------------------------------------------------------------------


def test_ptq4vit_twin_grids_and_hessian_search_lower_the_weighted_error():
    x = images(32)
    model = tiny_vit()
    ref = model(x).detach()
    kw = dict(bits=4, group_size=-1, act_bits=6, calib=x, progress=False)
    q = lowbit.quantize(copy.deepcopy(model), "ptq4vit", candidates=20, rounds=1, search_images=16, **kw)
    layer = q.transformer.layers[0]
    assert layer.self_attn.softmax.output_q.fmt.kind == "twin" and not layer.self_attn.softmax.output_q.fmt.symmetric
    assert layer.activation.output_q.fmt.kind == "twin" and layer.activation.output_q.fmt.symmetric
    twin = layer.self_attn.softmax.output_q.scale
    assert math.isclose(math.log2(float(twin[1] / twin[0])), round(math.log2(float(twin[1] / twin[0]))), abs_tol=1e-4)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"ptq4vit"}
    plain = lowbit.quantize(copy.deepcopy(model), "ptq4vit", search=False, **kw)
    with torch.no_grad():
        # the search improves on its round-to-nearest start
        assert float((q(x) - ref).pow(2).mean()) < float((plain(x) - ref).pow(2).mean())


# ---- APQ-ViT ---------------------------------------------------------------------------------------


def test_apq_vit_mpq_top_level_minimises_the_probability_weighted_error():
    x = images(32)
    model = tiny_vit()
    kw = dict(bits=4, group_size=-1, act_bits=4, calib=x, progress=False)
    q = lowbit.quantize(copy.deepcopy(model), "apq_vit", search=False, **kw)
    site = q.transformer.layers[0].self_attn.softmax.output_q
    assert site.fmt.kind == "log2"
    top = float(site.scale)
    # the probabilities the site sees, and the error at its level against every other candidate level
    seen = []
    h = site.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1)))
    with torch.no_grad():
        q(x)
    h.remove()
    p = torch.cat(seen)

    def err(s):
        return float((p * (p - A.fake_quantize(p[:, None], site.fmt, torch.tensor([s]), torch.zeros(1)).reshape(-1)).pow(2)).sum())

    assert float(p.max()) / 2 - 1e-6 <= top <= 1.0
    assert err(top) <= min(err(1.0), err(float(p.max())), err(float(p.max()) * 0.75)) * (1 + 1e-4)


def test_apq_vit_block_search_lowers_the_block_output_error():
    x = images(32)
    model = tiny_vit()
    ref = model(x).detach()
    kw = dict(bits=4, group_size=-1, act_bits=4, calib=x, progress=False)
    searched = lowbit.quantize(copy.deepcopy(model), "apq_vit", candidates=8, rounds=1, search_images=16, **kw)
    plain = lowbit.quantize(copy.deepcopy(model), "apq_vit", search=False, **kw)
    logged = [e for e in searched.lowbit_log if "last_block_metric" in e]
    assert {f"transformer.layers.{i}" for i in range(2)} <= {e["unit"] for e in logged}  # every encoder layer searched
    for e in logged:
        assert e["last_block_metric"] <= e["first_block_metric"] + 1e-9
    assert {r.method for r in searched.lowbit_coverage.quantized} == {"apq_vit"}
    with torch.no_grad():
        assert float((searched(x) - ref).pow(2).mean()) < float((plain(x) - ref).pow(2).mean())
    from test_one_toolkit import tiny_llama

    m, ids = tiny_llama()
    with pytest.raises(ValueError, match="apq_vit cannot run on"):
        lowbit.quantize(m, "apq_vit", act_bits=8, calib=ids, progress=False)


# ---- PTQ for ViT -----------------------------------------------------------------------------------


def test_ptq_for_vit_ranking_loss_counts_inverted_pairs_and_bias_correction_centres_the_error():
    from lowbit.methods.ptq_for_vit import PTQForViT, _scores

    torch.manual_seed(0)
    method = PTQForViT(bits=4, gamma=1.0, rank_pairs=4096)
    q_f, k_f = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    class FakeUnit:
        def get(self, name):
            return nn.MultiheadAttention(8, 2)

    metric = method.metric_for(FakeUnit(), "attn.q_proj", {"attn.k_proj": (None, k_f)}, 2)
    assert metric(q_f, q_f, None) == pytest.approx(0.0, abs=1e-6)  # identical: cosine 1, no pair inverted
    reversed_ = metric(-q_f, q_f, None)  # every score's sign flipped: every ordered pair inverted
    s_f, s_q = _scores(q_f, k_f, 2), _scores(-q_f, k_f, 2)
    assert torch.allclose(s_f.sum(-1), torch.ones(2, 2, 5))  # attention maps
    df = s_f[..., :, None] - s_f[..., None, :]
    dq = s_q[..., :, None] - s_q[..., None, :]
    hinge = torch.relu(-dq * torch.sign(df)).mean()  # flipped scores invert the order of the map
    assert float(hinge) > 0
    assert reversed_ == pytest.approx(2.0 + float(hinge), rel=0.1)  # cosine -1 gives 2; sampled pairs ~ all

    x = images(32)
    model = tiny_vit()
    kw = dict(bits=4, group_size=-1, act_bits=6, calib=x, progress=False)
    q = lowbit.quantize(copy.deepcopy(model), "ptq_for_vit", candidates=10, rounds=1, search_images=16, **kw)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"ptq_for_vit"}
    searched = [e for e in q.lowbit_log if "weight_factor" in e]
    assert searched and all(e["last_metric"] <= e["first_metric"] + 1e-9 for e in searched)
    ref = model(x).detach()
    plain = lowbit.quantize(copy.deepcopy(model), "ptq_for_vit", search=False, **kw)
    with torch.no_grad():
        assert F.cosine_similarity(q(x).flatten(), ref.flatten(), 0) >= F.cosine_similarity(plain(x).flatten(), ref.flatten(), 0) - 1e-3


def test_ptq_for_vit_mse_similarity_sees_the_output_scale_and_bad_names_are_refused():
    from lowbit.methods.ptq_for_vit import PTQForViT

    out = torch.randn(4, 5, 8)

    class NoAttention:
        def get(self, name):
            return None

    pearson = PTQForViT(bits=4).metric_for(NoAttention(), "fc1", {}, 4)
    mse = PTQForViT(bits=4, similarity="mse").metric_for(NoAttention(), "fc1", {}, 4)
    assert pearson(2 * out, out, None) == pytest.approx(0.0, abs=1e-6)  # a doubled output correlates perfectly
    assert mse(2 * out, out, None) == pytest.approx(1.0, rel=1e-5)  # |2o - o|^2 / |o|^2
    with pytest.raises(ValueError, match="similarity"):
        PTQForViT(similarity="l1")


def test_ptq_for_vit_mixed_precision_keeps_the_average_and_favours_large_nuclear_norms():
    from lowbit.methods.ptq_for_vit import PTQForViT, nuclear_norms

    x = images(16)
    model = tiny_vit()
    norms = nuclear_norms(model, [x], 16)
    assert norms and all(v > 0 for v in norms.values())
    bits = PTQForViT(bits=4, mixed_precision=True).assign_bits(norms, model)
    sizes = {n: model.get_submodule(n).weight.numel() for n in bits}
    average = sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values())
    assert average <= 4 + 1e-9 and set(bits.values()) <= {3, 4, 5} and 5 in bits.values()
    top, bottom = max(norms, key=norms.get), min(norms, key=norms.get)
    assert bits[top] == 5 and bits[bottom] == 3
    q = lowbit.quantize(copy.deepcopy(model), "ptq_for_vit", bits=4, group_size=-1, act_bits=8, calib=x, progress=False,
                        mixed_precision=True, candidates=4, rounds=1, search_images=8)  # fmt: skip
    # the head stays at the first/last layers' 8 bits, whatever its share
    widths = {r.name: int(r.format.split()[0][3:]) for r in q.lowbit_coverage.quantized if r.name in bits}
    assert widths.pop("mlp_head.1") == 8
    assert widths and all(widths[n] == bits[n] for n in widths)


# ---- P2-ViT and CPT-V ------------------------------------------------------------------------------


def test_p2_vit_makes_every_scale_a_power_of_two_choosing_floor_or_ceil_by_error():
    from lowbit.methods.p2_vit import is_power_of_two, pot_candidates

    down, up = pot_candidates(torch.tensor([0.3, 0.25, 1.7]))
    assert down.tolist() == [0.25, 0.25, 1.0] and up.tolist() == [0.5, 0.25, 2.0]
    x = images(32)
    model = tiny_vit()
    kw = dict(bits=4, group_size=-1, act_bits=8, calib=x, progress=False)
    q = lowbit.quantize(copy.deepcopy(model), "p2_vit", **kw)
    grids = [m for m in q.modules() if isinstance(m, lowbit.nn.quantizers.ActQuantizer) and m.per_tensor_grid]
    assert grids and all(is_power_of_two(g.scale) for g in grids)
    layer = q.transformer.layers[0]
    for lin in (layer.linear1, layer.linear2, layer.self_attn.q_proj):  # the frozen layers' stored weight scales
        assert is_power_of_two(lin.scales.float()) and is_power_of_two(lin.act_scale.float())
    # the adaptive choice (floor or ceil, by error) against the log-nearest power
    fixed = lowbit.quantize(copy.deepcopy(model), "p2_vit", adaptive=False, **kw)
    ref = model(x).detach()
    with torch.no_grad():
        err_adaptive = float((q(x) - ref).pow(2).mean())
        err_nearest = float((fixed(x) - ref).pow(2).mean())
    assert err_adaptive <= err_nearest * 1.05
    assert {r.method for r in q.lowbit_coverage.quantized} == {"p2_vit"}


def test_p2_vit_coarse_to_fine_picks_block_widths_then_layer_widths_within_the_block():
    from lowbit.methods.p2_vit import coarse_to_fine

    groups = {
        "b0": [("a", 10, {3: 5.0, 4: 0.5, 5: 0.1}), ("b", 10, {3: 0.25, 4: 0.2, 5: 0.19})],
        "b1": [("c", 20, {3: 5.0, 4: 0.05, 5: 0.0})],
    }
    coarse = {"b0": {3: 10.0, 4: 1.0, 5: 0.95}, "b1": {3: 5.0, 4: 0.05, 5: 0.0}}
    # coarse: 4+4 (1.05) beats 5+3 (5.95) and 3+5 (10); fine: inside b0's 80 bits a=5, b=3 (0.35 < 0.7)
    plan = coarse_to_fine(groups, coarse, bits=4)
    assert plan == {"a": 5, "b": 3, "c": 4}
    assert 10 * plan["a"] + 10 * plan["b"] + 20 * plan["c"] <= 4 * 40
    # a block that gains a lot from one more bit takes it from a block that loses little
    coarse["b1"] = {3: 0.06, 4: 0.05, 5: 0.0}
    coarse["b0"] = {3: 10.0, 4: 1.0, 5: 0.01}
    plan = coarse_to_fine(groups, coarse, bits=4)
    assert plan["c"] == 3 and 10 * plan["a"] + 10 * plan["b"] <= 5 * 20
    with pytest.raises(ValueError, match="must include 0"):
        lowbit.methods.make_method("p2_vit", bits=4, act_bits=4, offsets=(1,))
    with pytest.raises(ValueError, match="search_images"):
        lowbit.methods.make_method("p2_vit", bits=4, act_bits=4, search_images=0)


def test_p2_vit_smoothing_factors_are_powers_of_two_and_mixed_widths_keep_the_size(tmp_path):
    from lowbit.methods.p2_vit import is_power_of_two

    x = images(32)
    model = tiny_vit()
    kw = dict(bits=4, group_size=-1, act_bits=8, calib=x, progress=False)
    plain = lowbit.quantize(copy.deepcopy(model), "p2_vit", **kw)  # smoothing is off by default
    assert not any(getattr(m, "input_scale", None) is not None for m in plain.modules())
    sim = lowbit.quantize(copy.deepcopy(model), "p2_vit", smooth=True, **kw)
    scales = [m.input_scale for m in sim.modules() if getattr(m, "input_scale", None) is not None]
    assert scales and all(is_power_of_two(s) for s in scales)
    assert any(bool((s != 1).any()) for s in scales)  # the search kept some migration
    mixed = lowbit.quantize(copy.deepcopy(model), "p2_vit", mixed=True, search_images=8, **kw)
    widths = {r.name: int(r.format.split()[0][3:]) for r in mixed.lowbit_coverage.quantized}
    numel = {r.name: r.numel for r in mixed.lowbit_coverage.quantized}
    block = {n: w for n, w in widths.items() if n.startswith("transformer.layers.")}
    assert block and set(block.values()) <= {3, 4, 5}
    assert sum(block[n] * numel[n] for n in block) <= 4 * sum(numel[n] for n in block)
    logged = {r["layer"]: r["weight_bits"] for r in mixed.lowbit_log if "weight_bits" in r}
    assert logged == block
    lowbit.save(mixed, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "q")(x), mixed(x))


def test_cpt_v_infonce_and_its_search_never_raises_the_loss():
    from lowbit.methods.cpt_v import info_nce

    f = torch.eye(3)
    # q equal to f: positives cosine 1, negatives 0 -> -log(e^10 / (e^10 + 2))
    assert float(info_nce(f.clone(), f, 0.1)) == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + 2)), rel=1e-3)
    swapped = f[[1, 0, 2]]
    assert float(info_nce(swapped, f, 0.1)) > float(info_nce(f, f, 0.1))
    x = images(32)
    model = tiny_vit()
    q = lowbit.quantize(copy.deepcopy(model), "cpt_v", bits=4, group_size=-1, act_bits=4, calib=x, progress=False,
                        iterations=10, search_images=16)  # fmt: skip
    logged = [e for e in q.lowbit_log if "last_contrastive" in e]
    assert {f"transformer.layers.{i}" for i in range(2)} <= {e["unit"] for e in logged}
    assert all(e["last_contrastive"] <= e["first_contrastive"] for e in logged)
    assert {r.method for r in q.lowbit_coverage.quantized} == {"cpt_v"}
    from test_one_toolkit import tiny_llama

    m, ids = tiny_llama()
    with pytest.raises(ValueError, match="cpt_v cannot run on"):
        lowbit.quantize(m, "cpt_v", act_bits=8, calib=ids, progress=False)


# ---- outlier-aware slicing and PMQ -----------------------------------------------------------------


def test_oas_slices_a_block_at_its_residual_sum_and_picks_the_granularity_by_trial():
    from lowbit.methods.oas_vit import _boundaries, outlier_ratio

    assert outlier_ratio(torch.cat([torch.ones(999), torch.tensor([50.0])])) == pytest.approx(50.0)
    x = images(32)
    model = tiny_vit()
    q = lowbit.quantize(copy.deepcopy(model), "oas_vit", bits=4, group_size=-1, act_bits=4, calib=x, progress=False,
                        iters=8, batch_size=8)  # fmt: skip
    logged = {e["unit"]: e for e in q.lowbit_log if "granularity" in e}
    for i in range(2):
        e = logged[f"transformer.layers.{i}"]
        assert set(e["trial_errors"]) == {"block", "residual", "layer"}
        assert e["granularity"] == min(e["trial_errors"], key=e["trial_errors"].get)
        assert f"transformer.layers.{i}.add1" in e["outlier_ratio"]  # the residual cut was measured
    assert {r.method for r in q.lowbit_coverage.quantized} == {"oas_vit"}
    # the residual slicing of a block: the attention half ends at its first residual sum
    order = ["a.q", "a.k", "a.softmax", "a.out", "add1", "fc1", "act", "fc2", "add2"]

    class S(lowbit.nn.qmodule.QSite):
        def __init__(self, role):
            torch.nn.Module.__init__(self)
            self.role = role

    members = {n: (S("residual") if n.startswith("add") else S("softmax") if n in ("a.softmax", "act") else
                   lowbit.nn.qmodule.QModule(torch.nn.Linear(2, 2), lowbit.formats.spec.WeightFormat("int", 4, None)))
               for n in order}  # fmt: skip
    assert _boundaries("residual", order, members) == ["add1"]
    assert _boundaries("layer", order, members) == ["a.q", "a.k", "a.out", "fc1", "fc2"]
    assert _boundaries("block", order, members) == []
    with pytest.raises(ValueError, match="granularities"):
        lowbit.quantize(copy.deepcopy(model), "oas_vit", act_bits=4, calib=x, progress=False, granularities=("stage",))


def test_oas_the_chosen_slicing_matches_a_qdrop_block_when_only_block_is_offered():
    x = images(16)
    model = tiny_vit()
    kw = dict(bits=4, group_size=-1, act_bits=8, calib=x, progress=False, iters=4, batch_size=8)
    a = lowbit.quantize(copy.deepcopy(model), "oas_vit", granularities=("block",), **kw)
    b = lowbit.quantize(copy.deepcopy(model), "qdrop", **kw)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))  # one slice at the block's output is QDrop, step for step


def test_pmq_pareto_picks_the_cheapest_allocation_within_both_budgets():
    from lowbit.methods.pmq import pareto, token_widths

    # two layers, options (bits, ops, cost, label): the uniform (4, 4) costs 10 + 10
    opts = [[(4, 16, 10.0, "a4"), (3, 12, 30.0, "a3"), (5, 20, 1.0, "a5")],
            [(4, 16, 10.0, "b4"), (3, 12, 12.0, "b3"), (5, 20, 8.0, "b5")]]  # fmt: skip
    picked = [o[-1] for o in pareto(opts, 8, 32, 64)]
    assert picked == ["a5", "b3"]  # 13 < 20; (a5, b5) would break the budget
    assert [o[-1] for o in pareto(opts, 8, 28, 64)] == ["a4", "b3"]  # a tighter BOPs budget
    # patch widths: raise the most sensitive positions, lower the least, only when it gains
    cost = {3: torch.tensor([9.0, 1.0, 1.0, 0.4]), 4: torch.tensor([4.0, 0.5, 0.5, 0.1]),
            5: torch.tensor([1.0, 0.2, 0.2, 0.05])}  # fmt: skip
    assert token_widths(cost, 4).tolist() == [5, 4, 4, 3]
    flat = {b: torch.full((4,), 1.0) for b in (3, 4, 5)}
    assert token_widths(flat, 4) is None


def test_pmq_gives_layers_mixed_widths_within_the_uniform_budget_and_patch_widths_reload(tmp_path):
    x = images(32)
    model = tiny_vit()
    q = lowbit.quantize(copy.deepcopy(model), "pmq", bits=4, group_size=-1, act_bits=4, calib=x, progress=False,
                        patches=True, search_images=16, min_patch_bits=2)  # fmt: skip
    plan = [e for e in q.lowbit_log if "weight_bits" in e]
    assert plan and {e["weight_bits"] for e in plan} <= {3, 4, 5}
    sizes = {r.name: r.numel for r in q.lowbit_coverage.quantized}
    assert sum(e["weight_bits"] * sizes[e["layer"]] for e in plan) <= 4 * sum(sizes[e["layer"]] for e in plan)
    widths = {r.name: int(r.format.split()[0][3:]) for r in q.lowbit_coverage.quantized}
    assert all(widths[e["layer"]] == e["weight_bits"] for e in plan)
    assert widths["mlp_head.1"] == 8  # the head keeps the last layer's 8 bits
    patched = [m for m in q.modules() if isinstance(m, lowbit.nn.quantizers.ActQuantizer) and m.token_bits is not None]
    assert patched, "no layer took patch-wise widths"
    assert all(m.token_bits.numel() == 17 for m in patched)  # the class token and 16 patches of the tiny ViT
    assert any(len(set(m.token_bits.tolist())) > 1 for m in patched)
    with torch.no_grad():
        ref = q(x)
    lowbit.save(q, tmp_path / "pmq")
    back = lowbit.load(tmp_path / "pmq")
    with torch.no_grad():
        assert torch.equal(back(x), ref)
    with pytest.raises(ValueError, match="token positions"):
        patched[0](torch.randn(2, 5, 32))


def test_token_widths_cut_the_same_range_into_fewer_or_more_levels():

    q = lowbit.nn.quantizers.ActQuantizer(ActFormat(4, "tensor", False, False))
    q.set_static(torch.tensor(0.1), torch.tensor(5.0))  # codes 0..15 over [-0.5, 1.0]
    x = torch.linspace(-0.6, 1.1, 40).reshape(1, 4, 10)
    full = q(x)
    q.set_token_bits(torch.tensor([4, 4, 4, 4]))
    assert torch.allclose(q(x), full)
    q.set_token_bits(torch.tensor([2, 3, 4, 8]))
    out = q(x)
    assert torch.allclose(out[0, 2], full[0, 2])
    assert len(torch.unique(q(torch.linspace(-0.5, 1.0, 400).reshape(1, 4, 100))[0, 0])) <= 4  # 2 bits: 4 levels
    assert float(out.min()) >= -0.5 - 1e-6 and float(out.max()) <= 1.0 + 1e-6  # the range is kept
    with pytest.raises(ValueError, match="2..8 bits"):
        q.set_token_bits(torch.tensor([1, 4, 4, 4]))


@pytest.mark.parametrize("kind", ["vit", "deit"])
@pytest.mark.parametrize("method", ["repq_vit", "fq_vit", "ptq4vit", "apq_vit", "ptq_for_vit", "p2_vit", "cpt_v",
                                    "oas_vit", "pmq"])
def test_the_vit_methods_run_on_transformers_vit_and_deit_through_the_same_adapter(method, kind):
    x = images(16)
    model = build(kind)
    ref = output(model(x)).detach()
    extra = {"candidates": 10, "rounds": 1, "search_images": 8} if method in ("ptq4vit", "apq_vit", "ptq_for_vit") else {}
    extra = {"iterations": 5, "search_images": 8} if method == "cpt_v" else extra
    extra = {"iters": 4, "batch_size": 8} if method == "oas_vit" else extra
    q = lowbit.quantize(copy.deepcopy(model), method, bits=8, act_bits=8, calib=x, progress=False, **extra)
    assert {r.method for r in q.lowbit_coverage.quantized} == {method}
    kinds = {m.output_q.fmt.kind for n, m in q.named_modules() if n.endswith("attention.softmax")}
    assert kinds == {"repq_vit": {"logsqrt2"}, "fq_vit": {"log2"}, "ptq4vit": {"twin"}, "apq_vit": {"log2"}, "ptq_for_vit": {"int"}, "p2_vit": {"int"}, "cpt_v": {"int"},
             "oas_vit": {"int"}, "pmq": {"int"}}[method]
    with torch.no_grad():
        got = output(q(x))
    assert F.cosine_similarity(got.flatten(), ref.flatten(), 0) > 0.95


# ---- NoisyQuant ------------------------------------------------------------------------------------


def test_noisyquant_noise_is_removed_exactly_through_the_bias_and_never_raises_the_error():
    x = images(32)
    model = tiny_vit()
    kw = dict(bits=8, group_size=-1, act_bits=4, calib=x, progress=False)
    noisy = lowbit.quantize(copy.deepcopy(model), "noisyquant", **kw)
    layer = noisy.transformer.layers[1]
    site = layer.activation.output_q
    assert site.input_shift is not None  # the GELU output got its noisy bias
    noise = -site.input_shift
    step = float(site.scale)
    assert float(noise.abs().max()) <= step / 2 + 1e-6  # within half a quantization step
    # the bias took the noise back out with the quantized weights: b' = b - W_q N
    lin, orig = layer.linear2, model.transformer.layers[1].linear2
    with torch.no_grad():
        assert torch.allclose(lin.bias, orig.bias - lin.weight.float() @ noise, atol=1e-5)
        assert not torch.allclose(lin.bias, orig.bias, atol=1e-6)
    assert {r.method for r in noisy.lowbit_coverage.quantized} == {"noisyquant"}
    with pytest.raises(ValueError, match="static per-tensor"):
        from test_one_toolkit import tiny_llama

        m, ids = tiny_llama()
        lowbit.quantize(m, "noisyquant", act_bits=8, calib=ids, progress=False)
