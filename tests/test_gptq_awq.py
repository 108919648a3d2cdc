"""GPTQ and AWQ against plain references on small tensors, and the engine that drives them."""

import copy
import warnings

import pytest
import torch

import lowbit
from lowbit.engine.capture import capture_inputs
from lowbit.engine.loop import wrap
from lowbit.engine.unit import Unit
from lowbit.formats import WeightFormat, integer
from lowbit.methods import AWQ, GPTQ, RTN, load_recipe, parse_recipe
from lowbit.methods.awq import search_scales
from lowbit.methods.gptq import gptq_quantize, inverse_hessian_cholesky
from lowbit.methods.transforms import fold_scales, foldable_pairs
from lowbit.models import adapter_for, plan


def _layer(seed=0, rows=48, cols=40, n=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 2 * mix)  # correlated inputs
    X[:, 3] *= 8  # one salient channel
    W = torch.randn(rows, cols, generator=g)
    return X, W, 2 / n * X.t() @ X


def _rtn(W, bits, group):
    s, z = integer.minmax_params(W, bits, group, False)
    return integer.fake_quantize(W, s, z, bits, group)


@pytest.mark.parametrize("bits,group", [(4, -1), (3, -1), (3, 16), (2, 16)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(bits, group, act_order):
    X, W, H = _layer()
    codes, s, z = gptq_quantize(W, H, bits, group, False, act_order=act_order, mse=False)
    Q = integer.dequantize(codes, s, z, group)
    assert s.shape[1] == integer.num_groups(40, group)  # 40 = 16 + 16 + a ragged 8
    assert (X @ (W - Q).t()).norm() < 0.9 * (X @ (W - _rtn(W, bits, group)).t()).norm()


def test_gptq_with_identity_hessian_is_rtn():
    _, W, _ = _layer(1)
    codes, s, z = gptq_quantize(W, torch.eye(40), 3, 16, False, act_order=False, mse=False)
    s_ref, z_ref = integer.minmax_params(W, 3, 16, False)
    assert torch.equal(codes, integer.quantize(W, s_ref, z_ref, 3, 16))


def test_gptq_codes_match_their_stored_parameters():
    X, W, H = _layer(2)
    qw = GPTQ(bits=3, group_size=16).quantize_linear(W, type("S", (), {"H": H, "tokens": 512})())
    codes, s, z = qw.codes(), qw.scale.float(), qw.zero.float()
    assert torch.equal(qw.dequantize(), integer.dequantize(codes, s, z, 16))


def test_dampening_escalates_with_a_warning_when_cholesky_fails():
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0)))
    eig = torch.ones(20)
    eig[0] = -0.05
    H = q @ torch.diag(eig) @ q.t()
    with pytest.warns(UserWarning, match="not positive definite"):
        _, damp = inverse_hessian_cholesky(H, 0.01)
    assert damp == pytest.approx(0.1)


def test_gptq_rejects_learned_codebook_formats_and_bad_damp():
    with pytest.raises(ValueError, match="integer grids and scaled codebooks"):
        GPTQ(format="lut")
    assert GPTQ(format="nf4").weight_format.kind == "nf4"  # a fixed table times a scale: GPTQ runs on it
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=0)


def test_awq_scale_search_beats_no_scaling_on_a_salient_channel():
    X, W, H = _layer(3)
    fmt = WeightFormat("int", 3, 16)
    s, a, ratio = search_scales([W], X.abs().mean(0), H, fmt)
    assert a > 0 and ratio < 1
    E = W - integer.fake_quantize(W * s, *integer.minmax_params(W * s, 3, 16, False), 3, 16) / s
    assert (X @ E.t()).norm() < (X @ (W - _rtn(W, 3, 16)).t()).norm()


def _tiny(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
        )
        return tf.LlamaForCausalLM(cfg).eval()
    if family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=96,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        )
        return tf.OPTForCausalLM(cfg).eval()
    cfg = tf.BertConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return tf.BertModel(cfg).eval()


def _first_block_unit(model, batches, quantizer=None):
    """The model wrapped for quantization (nothing decided yet) and the engine's ``Unit`` for
    its first block, with the block's captured calibration inputs."""
    adapter = adapter_for(model)
    adapter.prepare(model)
    todo = [t for t in plan(model, adapter=adapter) if t.skip is None]
    wrap(model, adapter, quantizer or RTN(bits=4, group_size=32), todo, None)
    spec = next(s for s in adapter.units(model) if s.name == adapter.blocks(model)[0][0])
    inputs = capture_inputs(model, model.get_submodule(spec.name), batches, torch.device("cpu"))
    return Unit(model, spec, adapter, inputs)


@pytest.mark.parametrize("family,npairs", [("llama", 4), ("opt", 4), ("bert", 1)])
def test_awq_fold_leaves_block_outputs_unchanged_before_rounding(family, npairs):
    model = _tiny(family)
    unit = _first_block_unit(model, [torch.randint(0, 96, (2, 16))])
    before = unit.outputs()
    pairs = unit.scale_pairs()
    assert len(pairs) == npairs
    assert foldable_pairs(unit) == pairs  # every adapter pair folds into its quantized modules
    for producer, consumers in pairs:
        s = torch.rand(unit.get(consumers[0]).in_features) * 3 + 0.2
        fold_scales(unit.get(producer), [unit.get(c) for c in consumers], s)
    unit.changed()
    torch.testing.assert_close(unit.outputs()[0], before[0], rtol=1e-5, atol=1e-5)


def test_awq_transform_is_exact_and_quantization_beats_rtn_on_a_tiny_llama():
    model = _tiny("llama")
    ids = torch.randint(0, 96, (8, 32))
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    scaled = copy.deepcopy(model)
    unit = _first_block_unit(scaled, [ids])
    before = unit.outputs()
    weights = {n: m.weight.clone() for n, m in unit.qmodules().items()}
    AWQ(bits=3, group_size=32).transform(unit, RTN(bits=3, group_size=32))
    assert any(not torch.equal(m.weight, weights[n]) for n, m in unit.qmodules().items())  # it did scale
    torch.testing.assert_close(unit.outputs()[0], before[0], rtol=1e-4, atol=1e-4)  # and changed nothing

    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=32, progress=False)
    awq = lowbit.quantize(copy.deepcopy(model), "awq", calib=ids, bits=3, group_size=32, progress=False)
    with torch.no_grad():
        err_rtn = (rtn(input_ids=ids).logits - ref).norm()
        err_awq = (awq(input_ids=ids).logits - ref).norm()
    assert err_awq < err_rtn


def test_execution_groups_follow_the_block_and_shared_inputs():
    model = _tiny("llama")
    unit = _first_block_unit(model, [torch.randint(0, 96, (2, 16))])
    groups = [[unit.relative(n) for n in g] for g in unit.groups()]
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert [unit.relative(n) for n in unit.qmodules()] == [n for g in groups for n in g]


def test_replayed_children_give_the_same_statistics():
    model = _tiny("llama")
    unit = _first_block_unit(model, list(torch.randint(0, 96, (4, 16)).split(2)))
    gate, down = (unit.prefix + n for n in ("mlp.gate_proj", "mlp.down_proj"))
    first = unit.stats([gate])
    assert "self_attn" in unit.replay.cache  # the attention output is now reused
    again = unit.stats([down], hessian=True)
    fresh = Unit(unit.model, unit.spec, unit.adapter, unit.inputs).stats([down], hessian=True)
    assert torch.equal(again[down].H, fresh[down].H)
    assert torch.equal(again[down].hi, fresh[down].hi)
    assert first[gate].tokens == 64
    assert first[gate].H is None and again[down].H.shape == (96, 96)  # a Hessian only when asked for


def test_recipes_from_strings_configs_and_yaml(tmp_path):
    assert [m.name for m in parse_recipe("awq+gptq", bits=3)] == ["awq", "gptq"]
    assert parse_recipe([AWQ(bits=4), GPTQ(bits=4)])[1].bits == 4
    f = tmp_path / "r.yaml"
    f.write_text("- method: awq\n  grid: 10\n- method: gptq\n  act_order: false\n")
    recipe = load_recipe(f, bits=3, group_size=32)
    assert (recipe[0].grid, recipe[1].act_order, recipe[1].bits, recipe[1].group_size) == (10, False, 3, 32)
    with pytest.raises(ValueError, match="disagree"):
        lowbit.quantize(
            torch.nn.Sequential(torch.nn.Linear(8, 8)), [AWQ(bits=4), GPTQ(bits=3)], calib=torch.randn(4, 8)
        )


def test_gptq_on_a_bare_sequential_uses_the_whole_model_as_one_block():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(256, 32) @ torch.randn(32, 32)
    ref = model(x)
    gptq = lowbit.quantize(copy.deepcopy(model), "gptq", calib=[x], bits=3, group_size=-1, progress=False)
    rtn = lowbit.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=-1, progress=False)
    assert (gptq(x) - ref).norm() < (rtn(x) - ref).norm()
    assert {r.method for r in gptq.lowbit_coverage.quantized} == {"gptq"}


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.used(x))


class _WithDeadLayers(torch.nn.Module):
    """A stem, two blocks each holding a linear the forward never calls, a head, and a linear
    outside the blocks that nothing calls either."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(16, 4)
        self.aux = torch.nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("recipe", ["gptq", "awq+gptq"])
def test_layers_calibration_never_reaches_fall_back_to_rtn_and_say_so(recipe):
    model = _WithDeadLayers()
    lowbit.quantize(model, recipe, calib=[torch.randn(64, 8)], bits=4, group_size=-1, progress=False)
    cov = model.lowbit_coverage
    dead = {"blocks.0.unused", "blocks.1.unused", "aux"}
    assert {r.name for r in cov.quantized} == dead | {"stem", "blocks.0.used", "blocks.1.used", "head"}
    for r in cov.quantized:
        expected = "rtn (fallback: gptq saw no calibration input for this layer)" if r.name in dead else "gptq"
        assert r.method == expected, r.name
    assert isinstance(model.aux, lowbit.QLinear) and torch.isfinite(model.aux.weight).all()


def test_calibrated_methods_need_data():
    with pytest.raises(ValueError, match="calibration data"):
        lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)), "gptq", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)), "rtn", progress=False)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_gptq_runs_through_every_adapter(family):
    import transformers as tf

    if family == "gpt2":
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    else:
        model = _tiny(family)
    ids = torch.randint(0, 96, (4, 16))
    lowbit.quantize(model, "awq+gptq", calib=ids, bits=4, group_size=32, progress=False)
    done, total = model.lowbit_coverage.block_counts()
    assert done == total > 0
    assert all(r.method == "gptq" for r in model.lowbit_coverage.quantized if r.in_block)
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.isfinite(out[0]).all()
