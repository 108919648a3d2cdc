"""Integer activations: kernels against the exact reference, observers, and the API knobs."""

import copy
import json

import pytest
import torch
import transformers as tf
from torch import nn

import lowbit
from lowbit.formats import WeightFormat, integer
from lowbit.formats import activation as A
from lowbit.formats.activation import ActFormat
from lowbit.kernels import int8 as int8_kernel
from lowbit.nn import W8A8Linear
from lowbit.nn.qmodule import QModule
from lowbit.nn.w8a8 import quantize_per_token
from lowbit.quantized_weight import QuantizedWeight

needs_kernel = pytest.mark.skipif(int8_kernel.extension() is None, reason="lowbit's AVX2 int8 kernel is unavailable")


def tiny_llama(layers=2, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return tf.BertModel(cfg).eval()


def integer_reference(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute, with plain integer arithmetic: int64 codes, one scale per
    (row, weight group, activation group)."""
    qw = layer.quantized_weight
    v = layer.transform_input(x.reshape(-1, x.shape[-1]).double().float())
    if layer.perm is not None:
        v = v[:, layer.perm]
    fmt, k = layer.act, v.shape[1]
    if fmt.dynamic:
        s_a, z_a = A.dynamic_params(v, fmt)
        s_a, z_a = s_a.expand(-1, k), z_a.expand(-1, k)
    elif fmt.granularity == "group":
        s_a, z_a = A.group_columns(layer.act_scale, layer.act_zero, layer.act_bounds)
        s_a, z_a = s_a.expand(v.shape[0], -1), z_a.expand(v.shape[0], -1)
    else:
        s_a, z_a = layer.act_scale.expand(v.shape), layer.act_zero.expand(v.shape)
    a = A.codes(v, s_a, z_a, fmt).long()  # q - z
    w = qw.codes().long() - integer.expand_groups(qw.zero_or_default().long(), k, qw.fmt.group_size)
    s_w = integer.expand_groups(qw.scale.double(), k, qw.fmt.group_size)
    y = torch.einsum("mk,nk,mk,nk->mn", a.double(), w.double(), s_a.double(), s_w)
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.float()


WEIGHTS = [(8, -1, True), (8, -1, False), (4, 32, True), (4, -1, False), (3, 48, True), (6, 64, False), (2, 16, True)]
ACTS = [
    (ActFormat(8, "token"), {}),
    (ActFormat(8, "token", True, False), {}),
    (ActFormat(8, "tensor", True), {}),
    (ActFormat(8, "tensor", False), dict(act_scale=0.04, act_zero=0)),
    (ActFormat(6, "tensor", False, False), dict(act_scale=0.1, act_zero=17)),
    (ActFormat(4, "group", False, False), "groups"),
]


def make_layer(bits, group, sym, act, extra, k=100, n=37, seed=0, kernel="reference", transform=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = QuantizedWeight.quantize(w, WeightFormat("int", bits, group, sym))
    kw = {}
    if extra == "groups":
        kw = dict(act_scale=torch.tensor([0.05, 0.2, 0.1]), act_zero=torch.tensor([3.0, 8.0, 0.0]),
                  act_bounds=torch.tensor([0, 30, 30 + 41, k]), perm=torch.randperm(k, generator=g))  # fmt: skip
    elif extra:
        kw = dict(extra)
    if transform:
        kw.update(input_shift=torch.randn(k, generator=g) * 0.3, input_scale=torch.rand(k, generator=g) + 0.5)
    return W8A8Linear(qw, torch.randn(n, generator=g), act, kernel=kernel, **kw)


@pytest.mark.parametrize("bits,group,sym", WEIGHTS)
@pytest.mark.parametrize("act,extra", ACTS, ids=[a.describe() for a, _ in ACTS])
def test_reference_path_is_the_integer_computation(bits, group, sym, act, extra):
    layer = make_layer(bits, group, sym, act, extra, transform=True)
    x = torch.randn(9, 100) * 3
    torch.testing.assert_close(layer(x), integer_reference(layer, x), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("bits,group,sym", WEIGHTS)
@pytest.mark.parametrize("act,extra", ACTS, ids=[a.describe() for a, _ in ACTS])
@pytest.mark.parametrize("rows", [1, 6, 33])
def test_avx2_kernel_matches_the_reference(bits, group, sym, act, extra, rows):
    ref = make_layer(bits, group, sym, act, extra, transform=rows == 6)
    fast = make_layer(bits, group, sym, act, extra, kernel="int8_avx2", transform=rows == 6)
    x = torch.randn(rows, 100) * 3
    y, r = fast(x), ref(x)
    assert ((y - r).abs().max() / r.abs().max()) < 1e-5


@needs_kernel
@pytest.mark.parametrize("k", [64, 130, 2048 + 96])
def test_avx2_kernel_over_long_rows_and_every_vector_path(k):
    """Lengths that exercise the 64-column 4-bit steps, half steps, scalar tails and K blocking."""
    for bits, group, sym in [(4, -1, True), (4, 96, True), (8, -1, True), (8, 128, False)]:
        for act in (ActFormat(8, "token"), ActFormat(8, "token", True, False)):
            ref = make_layer(bits, group, sym, act, {}, k=k, n=19)
            fast = make_layer(bits, group, sym, act, {}, k=k, n=19, kernel="int8_avx2")
            x = torch.randn(7, k)
            y, r = fast(x), ref(x)
            assert ((y - r).abs().max() / r.abs().max()) < 1e-5, (bits, group, sym, act)


def test_int_mm_path_matches_the_reference_and_refuses_what_it_cannot_run():
    for bits, sym in [(8, True), (8, False), (4, True)]:
        for act, extra in [ACTS[0], ACTS[2], ACTS[3]]:
            ref = make_layer(bits, -1, sym, act, extra)
            fast = make_layer(bits, -1, sym, act, extra, kernel="int_mm")
            x = torch.randn(5, 100)
            torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="kernel='int_mm' takes 8-bit symmetric"):
        make_layer(8, -1, True, *ACTS[1], kernel="int_mm")
    with pytest.raises(ValueError, match="kernel='int_mm' takes"):
        make_layer(8, 32, True, *ACTS[0], kernel="int_mm")


def test_per_token_quantization_keeps_each_row_within_half_a_step():
    x = torch.randn(5, 32) * torch.tensor([[0.01], [1.0], [100.0], [3.0], [0.5]])
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-7).all())


def test_asymmetric_activations_use_the_whole_unsigned_range():
    fmt = ActFormat(8, "token", True, False)
    x = torch.rand(4, 50) * 6 - 0.5  # mostly positive, like a GELU output
    scale, zero = A.dynamic_params(x, fmt)
    q = A.codes(x, scale, zero, fmt) + zero
    assert float(q.min()) >= 0 and float(q.max()) == 255
    assert bool(((A.codes(x, scale, zero, fmt) * scale - x).abs() <= scale / 2 + 1e-6).all())


def test_observers_pick_sensible_static_ranges():
    from lowbit.observers import ChannelStats, kl_threshold, observe_range

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2000, 50, generator=g)
    rows[:2, 7] = 40.0  # a few outliers, rarer than one in ten thousand values
    st = ChannelStats(rows.amin(0), rows.amax(0), torch.stack([r.amin(0) for r in rows.split(500)]),
                      torch.stack([r.amax(0) for r in rows.split(500)]), rows)  # fmt: skip
    fmt = ActFormat(8, "tensor", False)
    ranges = {name: observe_range(st, name, fmt) for name in ("minmax", "ema", "percentile", "mse", "kl")}
    assert ranges["minmax"][1] == pytest.approx(40.0)
    for name in ("percentile", "mse", "kl"):
        assert ranges[name][1] < 40.0, name

    def err(hi):
        s, z = A.params_from_range(torch.tensor(-hi), torch.tensor(hi), fmt)
        return float((A.codes(rows, s, z, fmt) * s - rows).pow(2).mean())

    assert err(ranges["mse"][1]) <= err(ranges["minmax"][1])
    assert 3.0 < kl_threshold(rows.abs().flatten()) < 40.0
    with pytest.raises(ValueError, match="unknown activation observer"):
        observe_range(st, "entropy", fmt)


def test_unsupported_combinations_fail_clearly():
    seq = nn.Sequential(nn.Linear(8, 8))
    cases = [
        (dict(method_or_recipe="llmint8", bits=4), r"LLM.int8\(\) quantizes weights to int8"),
        (dict(method_or_recipe="rtn", format="nf4", act_bits=8), "integer activations need integer weights"),
        (dict(method_or_recipe="rtn", bits=8, act_bits=9), "act_bits=9 is not supported"),
        (dict(method_or_recipe="rtn", bits=8, act_bits=8, act_dynamic=False), "per-token scales are computed at run"),
        (dict(method_or_recipe="rtn", bits=8, act_bits=8, act_granularity="channel"), "act_granularity 'channel'"),
        (dict(method_or_recipe="zeroquant", symmetric=False), "ZeroQuant's weights are symmetric"),
        (dict(method_or_recipe="rtn", bits=8, act_bits=8, act_granularity="tensor"), "calibration data"),
        (dict(method_or_recipe="rtn", bits=8, act_bits=8, act_granularity="tensor", act_observer="entropy"),
         "unknown activation observer"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lowbit.quantize(copy.deepcopy(seq), progress=False, **kwargs)
    ids = torch.randint(0, 96, (2, 8))
    with pytest.raises(ValueError, match="RPTQ's per-cluster activation scales are static"):
        lowbit.quantize(tiny_llama(1), "rptq+rtn", calib=ids, bits=8, act_bits=8, progress=False)
    with pytest.raises(ValueError, match="SmoothQuant prepares integer activations"):
        lowbit.quantize(tiny_llama(1), "smoothquant+rtn", calib=ids, bits=8, progress=False)


def test_any_module_takes_integer_activations_and_reloads_identically(tmp_path):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 32)
    ref = seq(x)
    lowbit.quantize(seq, "rtn", bits=8, group_size=-1, act_bits=8, progress=False)
    assert isinstance(seq[0], W8A8Linear) and isinstance(seq[2], W8A8Linear)
    assert (seq(x) - ref).norm() / ref.norm() < 0.02

    model = tiny_llama()
    lowbit.quantize(model, "rtn", bits=4, group_size=32, act_bits=8, progress=False)  # W4A8, grouped
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, W8A8Linear)
    assert loaded.model.layers[0].mlp.down_proj.fmt.describe() == "int4 g32 asym"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def test_llm_int8_keeps_outlier_columns_in_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[:, 5] = 60.0  # one huge feature column, as in large transformers
    naive = lowbit.quantize(nn.Sequential(copy.deepcopy(lin)), "rtn", bits=8, group_size=-1, symmetric=True,
                            act_bits=8, progress=False)  # fmt: skip
    mixed = lowbit.quantize(nn.Sequential(copy.deepcopy(lin)), "llmint8", progress=False)
    ref = lin(x)
    err_naive = (naive(x) - ref).norm() / ref.norm()
    err_mixed = (mixed(x) - ref).norm() / ref.norm()
    assert err_mixed < err_naive / 3
    # without outliers the decomposition changes nothing
    y = torch.randn(4, 64)
    mixed[0].outlier_threshold = 1e9
    torch.testing.assert_close(mixed(y), integer_reference(mixed[0], y), rtol=1e-4, atol=1e-4)


def test_static_activations_calibrate_through_the_engine(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(64, 32)
    q = lowbit.quantize(copy.deepcopy(model), "rtn", calib=[x], bits=8, group_size=-1, act_bits=8,
                        act_granularity="tensor", act_observer="mse", progress=False)  # fmt: skip
    assert not q[0].act.dynamic and float(q[0].act_scale) > 0
    assert q.lowbit_coverage.get("0").act == "a8 per-tensor static sym, mse"  # the observer that set it
    ref = model(x)
    assert (q(x) - ref).norm() / ref.norm() < 0.05
    lowbit.save(q, tmp_path / "q")
    again = lowbit.load(tmp_path / "q", model=copy.deepcopy(model))
    assert torch.equal(again(x), q(x))


def exact_transform_only(model, method, ids_or_batch, act=None):
    """Wrap ``model`` as the engine does and run ``method``'s transform on every unit, each on the
    previous one's outputs, with every quantizer off (no rounding): the model now computes through
    the transformed quantized modules in floating point. Returns the modules whose weights changed."""
    from lowbit.engine.capture import capture_inputs
    from lowbit.engine.loop import advance, wrap
    from lowbit.engine.unit import Unit
    from lowbit.methods import RTN
    from lowbit.models import adapter_for, plan
    from lowbit.nn.qmodule import set_quantization

    adapter = adapter_for(model)
    adapter.prepare(model)
    quantizer = RTN(bits=8, group_size=-1, symmetric=True, act_bits=8, **(act or {})).for_family(adapter.family)
    wrap(model, adapter, quantizer, [t for t in plan(model, adapter=adapter) if t.skip is None], None)
    set_quantization(model, False)
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, QModule)}
    inputs = None
    for spec in adapter.units(model):
        if not (spec.follows and inputs is not None):
            inputs = capture_inputs(model, model.get_submodule(spec.modules[0]), [ids_or_batch], torch.device("cpu"))
        unit = Unit(model, spec, adapter, inputs)
        method.transform(unit, quantizer)
        inputs = advance(unit.outputs(), inputs)
    return [n for n, w in before.items() if not torch.equal(model.get_submodule(n).weight, w)]


@pytest.mark.parametrize("name", ["smoothquant", "smoothquant_fixed", "osplus"])
@pytest.mark.parametrize("arch", ["llama", "bert", "opt"])
def test_migration_alone_leaves_outputs_unchanged(name, arch):
    """Smoothing (and OS+ shifting) before any rounding: folded where exact, applied by the layer elsewhere."""
    from lowbit.methods import OSPlus, SmoothQuant

    method = {"smoothquant": SmoothQuant(), "smoothquant_fixed": SmoothQuant(search=False),
              "osplus": OSPlus(grid=10)}[name]  # fmt: skip
    ids = torch.randint(0, 96, (2, 16))
    if arch == "llama":
        model = tiny_llama(1, kv_heads=4)
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[3] = 30.0  # an outlier channel to migrate
        run = lambda: model(input_ids=ids).logits
    elif arch == "opt":
        torch.manual_seed(0)
        cfg = tf.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=64)  # fmt: skip
        model = tf.OPTForCausalLM(cfg).eval()
        with torch.no_grad():  # biases and an outlier, so shifts and scales both do something
            model.model.decoder.layers[0].self_attn_layer_norm.bias[5] = 8.0
        run = lambda: model(input_ids=ids).logits
    else:
        model = tiny_bert()
        run = lambda: model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        before = run()
    act = {"act_granularity": "tensor"} if name == "osplus" else None
    changed = exact_transform_only(model, method, ids, act)
    assert changed, "the migration must move something into the weights"
    explicit = [m for m in model.modules() if isinstance(m, QModule) and m.input_q.input_scale is not None]
    if arch == "bert":
        assert explicit, "post-LayerNorm encoders must get explicit input transforms"
    else:  # pre-norm decoders: the norms and linears before q/k/v, gate/up, o and down absorb it all
        assert not explicit
    with torch.no_grad():
        torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-4)


def test_osplus_shifts_fold_into_norms_and_explicit_transforms_reach_the_quantized_layer():
    model = tiny_bert()
    ids = torch.randint(0, 96, (4, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    lowbit.quantize(model, "osplus+rtn", calib=ids, bits=8, group_size=-1, symmetric=True, act_bits=8,
                    act_granularity="tensor", progress=False)  # fmt: skip
    query = model.encoder.layer[0].attention.self.query
    assert isinstance(query, W8A8Linear) and query.input_shift is not None and query.input_scale is not None
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.99


def test_kmeans_and_cluster_reordering():
    from lowbit.methods.rptq import kmeans, reorder_by_cluster

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [8.0, -8.0], [2.0, -1.0]])
    labels_true = torch.randint(0, 3, (300,), generator=g)
    points = centers[labels_true] + 0.05 * torch.randn(300, 2, generator=g)
    labels = kmeans(points, 3)
    # the same partition, whatever the label names
    assert all(len(set(labels[labels_true == c].tolist())) == 1 for c in range(3))
    perm, bounds = reorder_by_cluster(labels, points[:, 0] - points[:, 1])
    assert sorted(perm.tolist()) == list(range(300)) and int(bounds[-1]) == 300
    for g_ in range(3):  # each cluster is contiguous after the permutation
        members = labels[perm[bounds[g_] : bounds[g_ + 1]]]
        assert members.unique().numel() == 1


@pytest.mark.parametrize("recipe", ["rptq+rtn", "peg+rtn", "peg+gptq"])
def test_per_group_activations_beat_per_tensor_on_channels_of_very_different_ranges(recipe, tmp_path):
    torch.manual_seed(0)
    k = 96
    ranges = torch.ones(k)
    ranges[torch.randperm(k)[:8]] = 40.0  # a few wide channels among narrow ones
    x = torch.randn(256, k) * ranges
    model = nn.Sequential(nn.Linear(k, 48))
    ref = model(x)
    cfg = dict(calib=[x], bits=8, group_size=-1, act_bits=8, act_granularity="tensor", act_symmetric=False,
               progress=False)  # fmt: skip
    naive = lowbit.quantize(copy.deepcopy(model), "rtn", **cfg)
    grouped = lowbit.quantize(copy.deepcopy(model), recipe, **cfg)
    layer = grouped[0]
    assert layer.act.granularity == "group" and layer.perm is not None
    err = lambda m: float((m(x) - ref).detach().norm() / ref.detach().norm())
    assert err(grouped) < err(naive) / 2
    lowbit.save(grouped, tmp_path / "q")
    again = lowbit.load(tmp_path / "q", model=copy.deepcopy(model))
    assert torch.equal(again(x), grouped(x))


def test_zeroquant_is_grouped_weights_with_token_wise_activations():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    lowbit.quantize(model, "zeroquant", group_size=32, progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, W8A8Linear) and down.fmt.describe() == "int8 g32 sym"
    assert down.act.describe() == "a8 per-token dynamic sym"
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).norm() / ref.norm() < 0.02


def test_cli_integer_activation_flags(tiny_llama_dir, text_file, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["quantize", str(tiny_llama_dir), *map(str, args)])

    r = run("--method", "llmint8", "--bits", "8", "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "int8 per-channel sym"
    layers = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["layers"]
    assert next(iter(layers.values()))["act"]["outlier_threshold"] == 6.0
    r = run("--method", "smoothquant+rtn", "--bits", "8", "--group-size", "-1", "--act-bits", "8",
            "--act-granularity", "tensor", "--act-observer", "kl", "--calib", text_file, "--nsamples", "4",
            "--seqlen", "32", "--out", tmp_path / "b", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["activations"] == "a8 per-tensor static sym"
    r = run("--method", "rtn", "--bits", "8", "--act-bits", "8", "--act-granularity", "tensor", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--calib" in r.stderr and not (tmp_path / "c").exists()
    r = run("--method", "rtn", "--format", "nf4", "--act-bits", "8", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "integer weights" in r.stderr and not (tmp_path / "d").exists()


def test_int32_rescale_epilogue_equals_the_tensor_expression():
    ext = int8_kernel.extension()
    if ext is None:
        pytest.skip("lowbit's AVX2 int8 kernel is not available here")
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (37, 53), generator=g, dtype=torch.int32)
    rows, cols, bias = torch.rand(37, generator=g), torch.rand(53, generator=g), torch.randn(53, generator=g)
    want = acc.double() * rows.double()[:, None] * cols.double()
    torch.testing.assert_close(ext.rescale_int32(acc, rows, cols, None).double(), want, rtol=1e-6, atol=0)
    got = ext.rescale_int32(acc, rows, cols, bias).double()
    torch.testing.assert_close(got, want + bias.double(), rtol=1e-6, atol=1e-5)
    with pytest.raises(RuntimeError, match="row_scale"):
        ext.rescale_int32(acc, rows[:5], cols, None)


def test_token_codes_in_cpp_equal_the_reference_quantizer():
    ext = int8_kernel.extension()
    if ext is None:
        pytest.skip("lowbit's AVX2 int8 kernel is not available here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 70, generator=g) * torch.rand(19, 1, generator=g) * 5
    x[3] = 0.0  # an all-zero row: the 1e-8 floor
    shift, premul = torch.randn(70, generator=g), torch.rand(70, generator=g) + 0.5
    fmt = ActFormat(8)
    for sh, pm in ((None, None), (shift, premul)):
        v = x if sh is None else (x - sh) * pm
        scale, zero = A.dynamic_params(v, fmt)
        want = A.codes(v, scale, zero, fmt)
        codes, s = ext.quantize_tokens_int8(x, sh, pm)
        assert torch.equal(s, scale.reshape(-1)) and torch.equal(codes.float(), want)
