"""Hugging Face ViT and DeiT made explicit: the same numbers as transformers' attention, one module per
op, then every method's view of them (sites, coverage, pairs) and a checkpoint that reloads exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from transformers.models.vit.modeling_vit import ViTLayer

import lowbit
from lowbit.models.adapters import adapter_for, plan
from lowbit.models.attention import make_explicit
from lowbit.models.hf_vit import (
    ExplicitHFAttention,
    ExplicitHFLayer,
    FloatSoftmax,
    HFViTAdapter,
    make_hf_vit_explicit,
)
from lowbit.nn import QConv, QLinear
from lowbit.nn.ops import Add, MatMul
from lowbit.nn.qmodule import QSite
from lowbit.nn.w8a8 import W8A8Linear

TOL = 1e-6
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "image_size": 32, "patch_size": 8, "num_labels": 10}  # fmt: skip
# DeiT's classes are generated copies of ViT's, not the same classes: both are swapped
MODELS = {
    "vit": (tf.ViTConfig, tf.ViTForImageClassification, "vit"),
    "vit_model": (tf.ViTConfig, tf.ViTModel, ""),
    "deit": (tf.DeiTConfig, tf.DeiTForImageClassification, "deit"),
    "deit_teacher": (tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher, "deit"),
}


def build(kind: str = "vit", attn: str = "eager", **overrides) -> nn.Module:
    """A tiny random model; ``initializer_range=0.2`` makes its logits depend on the image (at
    transformers' 0.02 the class token barely sees the patches)."""
    config_cls, model_cls, _ = MODELS[kind]
    torch.manual_seed(0)
    config = config_cls(**{**SIZES, "initializer_range": 0.2, **overrides})
    return model_cls._from_config(config, attn_implementation=attn).eval()


def output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def prefix(kind: str) -> str:
    p = MODELS[kind][2]
    return f"{p}." if p else ""


# ---- the explicit form -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_explicit_model_matches_eager_attention_to_1e6_and_sdpa_to_1e5(kind):
    eager, sdpa = build(kind, "eager"), build(kind, "sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    x = images(4)
    with torch.no_grad():
        want_eager, want_sdpa = output(eager(x)), output(sdpa(x))
        keys = {k: v.clone() for k, v in eager.state_dict().items()}
        assert make_hf_vit_explicit(eager) == 2 * 2  # two layers, each with its attention
        assert make_hf_vit_explicit(sdpa) == 4
        torch.testing.assert_close(output(eager(x)), want_eager, atol=TOL, rtol=0)
        torch.testing.assert_close(output(sdpa(x)), want_sdpa, atol=1e-5, rtol=0)
    state = eager.state_dict()
    assert list(state) == list(keys) and all(torch.equal(state[k], v) for k, v in keys.items())
    assert make_hf_vit_explicit(eager) == 0  # the explicit classes are not the exact HF ones


def test_explicit_layer_keeps_its_modules_and_names_every_op():
    model = build()
    layer, attention = model.vit.layers[0], model.vit.layers[0].attention
    parts = {n: getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    norms = (layer.layernorm_before, layer.layernorm_after, layer.mlp)
    make_hf_vit_explicit(model)
    new = model.vit.layers[0]
    assert isinstance(new, ExplicitHFLayer) and isinstance(new, type(layer))  # HF's isinstance checks still hold
    assert isinstance(new.attention, ExplicitHFAttention) and isinstance(new.attention, type(attention))
    assert all(getattr(new.attention, n) is m for n, m in parts.items())  # the same modules, not copies
    assert (new.layernorm_before, new.layernorm_after, new.mlp) == norms
    assert isinstance(new.attention.qk, MatMul) and isinstance(new.attention.av, MatMul)
    assert isinstance(new.attention.softmax, FloatSoftmax) and new.attention.softmax.dim == -1
    assert isinstance(new.attention.softmax, nn.Softmax)
    assert isinstance(new.add1, Add) and isinstance(new.add2, Add)
    assert isinstance(new.mlp.activation_fn, nn.Module)
    assert not any(p for m in (new.add1, new.attention.qk, new.attention.softmax) for p in m.parameters())
    assert type(layer).forward is not type(new).forward and not hasattr(layer, "add1")  # the original is untouched


def test_qk_sees_unscaled_q_and_k_and_its_product_is_scaled_after():
    model = build()
    make_hf_vit_explicit(model)
    attention = model.vit.layers[0].attention
    seen = {}
    attention.qk.register_forward_hook(lambda m, args, out: seen.update(q=args[0], k_t=args[1]))
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        _, weights = attention(h)
        q = attention.q_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        k = attention.k_proj(h).view(2, 17, 4, 8).transpose(1, 2)
    torch.testing.assert_close(seen["q"], q)
    torch.testing.assert_close(seen["k_t"], k.transpose(2, 3))
    torch.testing.assert_close(weights, torch.softmax(q @ k.transpose(2, 3) / 8**0.5, -1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_explicit_model_applies_the_attention_mask_transformers_builds(attn):
    reference, model = build("vit_model", "eager"), build("vit_model", attn)
    make_hf_vit_explicit(model)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, -5:] = 0
    mask[2, 3] = 0
    x = images(3)
    with torch.no_grad():
        want = reference(x, attention_mask=mask).last_hidden_state
        unmasked = reference(x).last_hidden_state
        got = model(x, attention_mask=mask).last_hidden_state
    assert not torch.allclose(want, unmasked, atol=1e-3)  # the mask changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_explicit_model_reports_attentions_and_hidden_states_like_eager():
    reference, model = build(), build()
    x = images(2)
    with torch.no_grad():
        model(x, output_attentions=True)  # transformers installs its recording hooks before the swap
        make_hf_vit_explicit(model)
        got = model(x, output_attentions=True, output_hidden_states=True)
        want = reference(x, output_attentions=True, output_hidden_states=True)
    assert len(got.attentions) == len(want.attentions) == 2
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.attentions + got.hidden_states, want.attentions + want.hidden_states):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_explicit_model_draws_the_same_dropout_in_training_and_passes_gradients():
    reference = build(attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.2)
    model = copy.deepcopy(reference)
    make_hf_vit_explicit(model)
    reference.train(), model.train()
    assert model.vit.layers[0].attention.dropout.p == 0.3 and model.vit.layers[0].attention.training
    x = images(2)
    torch.manual_seed(3)
    want = reference(x).logits
    torch.manual_seed(3)
    got = model(x).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    got.square().sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(model.vit.layers[0].attention, name).weight.grad.abs().sum() > 0, name


def test_make_explicit_also_swaps_hf_vit_and_leaves_subclasses_alone():
    model = build("deit")
    assert make_explicit(model) == 4 and make_explicit(model) == 0

    class Custom(ViTLayer):
        pass

    other = build()
    custom = Custom(other.config)
    other.vit.layers[1] = custom
    assert make_hf_vit_explicit(other) == 1 + 2  # layer 0, both attentions; the subclass stays
    assert other.vit.layers[1] is custom and isinstance(custom.attention, ExplicitHFAttention)


# ---- the adapter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_adapter_units_sites_and_pairs(kind):
    model = build(kind)
    adapter = adapter_for(model)
    assert isinstance(adapter, HFViTAdapter) and adapter.family == "vit"
    notes = adapter.prepare(model, images(2))
    assert notes and "explicit" in notes[0]
    p = prefix(kind)
    heads = {"vit": ["classifier"], "vit_model": ["pooler.dense"], "deit": ["classifier"],
             "deit_teacher": ["cls_classifier", "distillation_classifier"]}[kind]  # fmt: skip
    units = adapter.units(model)
    assert [u.name for u in units] == [f"{p}embeddings.patch_embeddings.projection", f"{p}layers.0",
                                       f"{p}layers.1", *heads]  # fmt: skip
    assert [u.follows for u in units[1:3]] == [False, True]
    sites = {s.name: s for s in adapter.sites(model)}
    for i in range(2):
        block = f"{p}layers.{i}"
        assert sites[f"{block}.attention.qk"].inputs == 2
        for name in ("attention.softmax", "mlp.activation_fn", "add1", "add2"):
            assert sites[f"{block}.{name}"].output, name
    assert len(sites) == 10 and all(model.get_submodule(n) is not None for n in sites)
    assert adapter.scale_pairs(model.get_submodule(f"{p}layers.0")) == [
        ("layernorm_before", ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),
        ("attention.v_proj", ["attention.o_proj"]),
        ("layernorm_after", ["mlp.fc1"]),
    ]


def test_scale_pairs_fold_exactly():
    """Each pair's producer can absorb a scaling of its consumers' inputs without changing the model."""
    model = build()
    make_hf_vit_explicit(model)
    x = images(4)
    with torch.no_grad():
        want = model(x).logits
        for producer, consumers in adapter_for(model).scale_pairs(model.vit.layers[0]):
            prod = model.vit.layers[0].get_submodule(producer)
            s = torch.rand(prod.weight.shape[0]) + 0.5
            prod.weight.div_(s.reshape(-1, *[1] * (prod.weight.dim() - 1)))
            prod.bias.div_(s)
            for c in consumers:
                model.vit.layers[0].get_submodule(c).weight.mul_(s)
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)


def test_plan_keeps_the_loose_tokens_in_full_precision_with_a_reason():
    model = build("deit_teacher")
    skipped = {t.name: t.skip for t in plan(model) if t.skip}
    assert set(skipped) == {f"deit.embeddings.{n}" for n in ("cls_token", "position_embeddings", "distillation_token")}
    assert all("kept in full precision" in why for why in skipped.values())


# ---- quantizing --------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("kind", ["vit", "deit_teacher"])
def test_w8a8_quantizes_every_site_and_stays_close_to_fp32(kind):
    model, x = build(kind), images(32)
    with torch.no_grad():
        ref = output(model(x))
    lowbit.quantize(model, "rtn", bits=8, act_bits=8, calib=x, progress=False)
    p = prefix(kind)
    for i in range(2):
        layer = model.get_submodule(f"{p}layers.{i}")
        qk = layer.attention.qk
        assert isinstance(qk, QSite) and isinstance(qk.module, MatMul) and len(qk.input_q) == 2
        assert all(q.scale is not None for q in qk.input_q)
        for site in (layer.attention.softmax, layer.mlp.activation_fn, layer.add1, layer.add2):
            assert isinstance(site, QSite) and site.output_q is not None and site.output_q.scale is not None
        assert isinstance(layer.attention.q_proj, W8A8Linear) and isinstance(layer.mlp.fc1, W8A8Linear)
    with torch.no_grad():
        out = output(model(x))
    assert cosine(out, ref) > 0.99
    assert cosine(out - ref.mean(0), ref - ref.mean(0)) > 0.99  # the image-dependent part too
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_gptq_decides_every_linear_and_the_patch_conv_and_reports_the_tokens():
    model, x = build(), images(16)
    weighted = {n for n, m in model.named_modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False))}
    lowbit.quantize(model, "gptq", bits=4, calib=x, progress=False)
    cov = model.lowbit_coverage
    quantized = {r.name: r for r in cov.quantized}
    skipped = {r.name: r for r in cov.skipped}
    linears = [f"vit.layers.{i}.{part}" for i in range(2)
               for part in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                            "mlp.fc1", "mlp.fc2")]  # fmt: skip
    for name in [*linears, "classifier", "vit.embeddings.patch_embeddings.projection"]:
        assert quantized[name].method == "gptq", (name, quantized[name].method)
    assert quantized["vit.layers.0.attention.q_proj"].bits_per_weight < 5  # the ends keep 8 bits
    assert set(skipped) == {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    assert all(r.reason for r in skipped.values())
    covered = set(quantized) | {n.rpartition(".")[0] for n in skipped}
    assert weighted <= covered, weighted - covered  # every parameter of two or more dimensions
    assert isinstance(model.vit.layers[0].attention.q_proj, QLinear)
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, QConv)
    assert torch.isfinite(model(x[:2]).logits).all()


def test_smoothquant_folds_into_the_layer_norms_and_value_projection():
    model, x = build(), images(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x).logits
    lowbit.quantize(model, "smoothquant+rtn", bits=8, act_bits=8, calib=x, progress=False)
    state = model.state_dict()
    for key in ("vit.layers.0.layernorm_before.weight", "vit.layers.0.layernorm_after.weight",
                "vit.layers.1.layernorm_before.weight"):  # fmt: skip
        assert not torch.equal(state[key], before[key]), f"{key}: no scale was folded in"
    with torch.no_grad():
        assert cosine(model(x).logits, ref) > 0.99


def test_native_checkpoint_reloads_the_explicit_form_with_identical_logits(tmp_path):
    model, x = build(), images(16)
    lowbit.quantize(model, "rtn", bits=8, act_bits=8, calib=x, progress=False)
    with torch.no_grad():
        want = model(x).logits
    lowbit.save(model, tmp_path / "q")
    again = lowbit.load(tmp_path / "q", model=build())
    assert isinstance(again.vit.layers[0], ExplicitHFLayer) and isinstance(again.vit.layers[1].add2, QSite)
    alone = lowbit.load(tmp_path / "q")  # rebuilt from config.json: the class it names, head included
    assert type(alone) is tf.ViTForImageClassification
    with torch.no_grad():
        assert torch.equal(again(x).logits, want) and torch.equal(alone(x).logits, want)


def test_bare_vit_model_reloads_from_its_config_alone(tmp_path):
    model, x = build("vit_model"), images(8)
    lowbit.quantize(model, "rtn", bits=8, act_bits=8, calib=x, progress=False)
    lowbit.save(model, tmp_path / "q")
    again = lowbit.load(tmp_path / "q")
    assert type(again) is tf.ViTModel and isinstance(again.layers[0].attention.softmax, QSite)
    with torch.no_grad():
        a, b = again(x), model(x)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
