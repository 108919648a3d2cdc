"""One verb, one engine, one module family: every registered method on every model family
(a Llama decoder, a BERT encoder, a ViT, a CIFAR ResNet, a plain nn.Sequential), each
running or refusing in one line; coverage that lists every parameter of two or more
dimensions with the method that really decided its codes."""

import pytest
import torch
import transformers as tf
from torch import nn

import lowbit
from lowbit.methods import REGISTRY
from lowbit.models.resnet_cifar import ResNetCifar
from lowbit.models.vit_cifar import ViTCifar
from lowbit.nn import QConv, QLinear, W8A8Linear
from lowbit.nn.qmodule import QSite

QUANTIZERS = ["rtn", "gptq", "awq", "adaround", "brecq", "qdrop", "signround", "owq", "squeezellm", "spqr", "lorc",
              "gptvq", "bcq", "nf4", "rex", "gobo", "deep_compression", "hqq", "bias_correction",
              "llmint8", "zeroquant", "repq_vit", "fq_vit", "ptq4vit", "apq_vit", "ptq_for_vit", "p2_vit", "cpt_v",
              "noisyquant", "oas_vit", "pmq"]
TRANSFORMS = ["smoothquant", "osplus", "rptq", "peg"]


def tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (4, 16))


def tiny_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    return tf.BertModel(cfg).eval(), torch.randint(0, 64, (4, 16))


def tiny_vit():
    torch.manual_seed(0)
    return ViTCifar(dim=32, depth=2, heads=4, mlp_dim=48, patch=8).eval(), torch.randn(8, 3, 32, 32)


def tiny_resnet():
    torch.manual_seed(0)
    model = ResNetCifar(8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(8, 3, 32, 32)


def tiny_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))  # fmt: skip
    return model.eval(), torch.randn(8, 3, 16, 16)


FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit, "resnet": tiny_resnet, "sequential": tiny_sequential}


def recipe_for(method: str) -> tuple[str, dict]:
    kw = {"bits": 4, "group_size": 16 if method in ("rtn", "gptq", "awq") else -1}
    if method in ("adaround", "brecq", "qdrop", "oas_vit", "signround"):
        kw["iters"] = 2
    if method == "owq":  # two weak columns per layer: the tiny layers' budget would keep none
        kw["columns"] = 2
    if method in TRANSFORMS:
        return f"{method}+rtn", {"bits": 8, "group_size": -1, "act_bits": 8, "act_granularity": "tensor",
                                 "act_dynamic": False}  # fmt: skip
    if method in ("llmint8", "zeroquant"):
        return method, {}
    if method in ("repq_vit", "fq_vit", "ptq4vit", "apq_vit", "ptq_for_vit", "p2_vit", "cpt_v", "noisyquant", "pmq"):  # static activations by definition
        return method, {"bits": 4, "group_size": -1, "act_bits": 8, "act_granularity": "tensor", "act_dynamic": False}
    return method, kw


def weight_params(model: nn.Module) -> set[str]:
    """Names the coverage must account for: every module with a >= 2-D parameter of its own, or
    the parameter itself when its module is no layer (class tokens)."""
    return {n for n, m in model.named_modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False))}


def test_every_registered_method_is_in_this_matrix():
    assert set(REGISTRY) == set(QUANTIZERS) | set(TRANSFORMS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", QUANTIZERS + TRANSFORMS)
def test_every_method_runs_on_every_family_or_refuses_in_one_line(family, method):
    model, calib = FAMILIES[family]()
    name, kw = recipe_for(method)
    try:
        lowbit.quantize(model, name, calib=calib, progress=False, **kw)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and method in msg and "cannot run on" in msg, msg
        return
    cov = model.lowbit_coverage
    assert cov.quantized, "nothing was quantized"
    expected = {method, "rtn"} if method in TRANSFORMS else {method}
    if method == "squeezellm":  # a model without logits (an encoder) has no Fisher: said in the label
        expected |= {"squeezellm (weighted by input energy: no logits for a Fisher)"}
    assert {r.method for r in cov.quantized} <= expected | {f"rtn (fallback: {method} saw no calibration input for "
                                                           "this layer)"}  # fmt: skip
    assert all(r.reason for r in cov.skipped)
    out = model(calib[:2]) if family not in ("llama", "bert") else model(input_ids=calib[:2])
    tensor = out if torch.is_tensor(out) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
    assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_lists_every_weight_bearing_parameter(family):
    model, calib = FAMILIES[family]()
    lowbit.quantize(model, "rtn", bits=4, group_size=-1, calib=calib, progress=False)
    names = {r.name for r in model.lowbit_coverage.layers}
    prepared, _ = FAMILIES[family]()
    lowbit.models.adapters.adapter_for(prepared).prepare(prepared, calib[:2] if family != "llama" else None)
    for n in weight_params(prepared):
        module = prepared.get_submodule(n) if n else prepared
        own = [p for p, t in module.named_parameters(recurse=False) if t.dim() >= 2]
        assert n in names or all(f"{n}.{p}".lstrip(".") in names for p in own), f"{n or type(module).__name__}"


def test_gptq_decides_the_codes_of_resnet_convs_from_their_unfolded_patches():
    model, calib = tiny_resnet()
    lowbit.quantize(model, "gptq", bits=3, calib=calib, progress=False)
    convs = [r for r in model.lowbit_coverage.quantized if r.kind == "Conv2d"]
    assert len(convs) == 7 and all(r.method == "gptq" for r in convs)
    assert isinstance(model.layer1[0].conv1, QConv) and model.layer1[0].conv1.fmt.bits == 3


def test_vit_attention_is_explicit_and_every_linear_is_decided_by_gptq():
    model, calib = tiny_vit()
    lowbit.quantize(model, "gptq", bits=4, calib=calib, progress=False)
    cov = model.lowbit_coverage
    names = {r.name: r for r in cov.quantized}
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert names[f"transformer.layers.0.self_attn.{part}"].method == "gptq"
    assert names["patch_embed.proj"].method == "gptq"
    assert {r.name for r in cov.skipped} == {"cls_token", "pos_embed"}
    assert not any("in_proj" in n for n, _ in model.named_parameters())


def test_vit_w8a8_quantizes_softmax_activation_qk_operands_and_residual_sums():
    model, calib = tiny_vit()
    ref = model(calib).detach()
    lowbit.quantize(model, "rtn", bits=8, act_bits=8, calib=calib, progress=False)
    layer = model.transformer.layers[0]
    for site in (layer.self_attn.softmax, layer.activation, layer.add1, layer.add2):
        assert isinstance(site, QSite) and site.output_q.scale is not None
    assert isinstance(layer.self_attn.qk, QSite) and all(q.scale is not None for q in layer.self_attn.qk.input_q)
    assert isinstance(layer.linear1, W8A8Linear) and not layer.linear1.act.dynamic
    out = model(calib)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_reconstruction_runs_on_a_decoder_layer_as_its_unit():
    model, ids = tiny_llama()
    lowbit.quantize(model, "brecq", bits=3, group_size=16, calib=ids, iters=5, progress=False)
    assert {r.method for r in model.lowbit_coverage.quantized} == {"brecq"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLinear)


def test_methods_refuse_families_their_math_does_not_cover_with_one_line():
    model, calib = tiny_resnet()
    with pytest.raises(ValueError, match=r"^smoothquant cannot run on ResNetCifar \(cnn\): .+$"):
        lowbit.quantize(model, "smoothquant+rtn", bits=8, act_bits=8, calib=calib, progress=False)


def test_an_unknown_method_names_the_registry():
    model, _ = tiny_sequential()
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*qdrop"):
        lowbit.quantize(model, "nope")
