"""Explicit attention and the CIFAR ViT: equivalence specs on small random layers, then the shipped checkpoint."""

import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.assets import asset
from lowbit.models.attention import (
    ExplicitEncoderLayer,
    ExplicitMultiheadAttention,
    activation_module,
    make_explicit,
)
from lowbit.models.vit_cifar import NORMALIZE, ViTCifar, is_vit_cifar_checkpoint, load_vit_cifar
from lowbit.nn.ops import Add, MatMul

E, H, N, L, S = 16, 4, 3, 5, 6  # embed dim, heads, batch, query length, key length
TOL = 1e-6


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} is absent; set LOWBIT_ASSETS to the shared assets folder")
    return path


def _layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:  # x: [N, T, E] -> the module's layout
    return x if batch_first else x.transpose(0, 1).contiguous()


def _masks(kind: str, tgt: int = L, src: int = S) -> dict[str, torch.Tensor]:
    """Masks that never hide every key from a query (a fully masked row is NaN in PyTorch too)."""
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)  # True = may not attend
    padding = torch.zeros(N, src, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    per_head = torch.rand(N * H, tgt, src) < 0.3
    per_head[..., 0] = False
    return {
        "none": {},
        "key_padding": {"key_padding_mask": padding},
        "causal": {"attn_mask": causal},
        "causal+key_padding": {"attn_mask": causal, "key_padding_mask": padding},
        "float": {"attn_mask": torch.randn(tgt, src)},
        "per_head": {"attn_mask": per_head},
    }[kind]


MASKS = ["none", "key_padding", "causal", "causal+key_padding", "float", "per_head"]


# ---- ops -----------------------------------------------------------------------------------------


def test_matmul_and_add_are_parameter_free_modules_computing_matmul_and_sum():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert torch.equal(MatMul()(a, b), torch.matmul(a, b))
    assert torch.equal(Add()(a, a), a + a)
    assert not list(MatMul().parameters()) and not list(Add().parameters())


# ---- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_explicit_attention_matches_multihead_attention_to_1e6(batch_first, masks, need_weights, average):
    mha = nn.MultiheadAttention(E, H, dropout=0.2, batch_first=batch_first).eval()
    explicit = ExplicitMultiheadAttention.from_mha(mha)
    q, kv = _layout(torch.randn(N, L, E), batch_first), _layout(torch.randn(N, S, E), batch_first)
    kwargs = dict(_masks(masks), need_weights=need_weights, average_attn_weights=average)
    out, weights = mha(q, kv, kv, **kwargs)
    out_x, weights_x = explicit(q, kv, kv, **kwargs)
    assert out_x.shape == out.shape
    torch.testing.assert_close(out_x, out, atol=TOL, rtol=0)
    if need_weights:
        assert weights_x.shape == weights.shape
        torch.testing.assert_close(weights_x, weights, atol=TOL, rtol=0)
    else:
        assert weights is None and weights_x is None


def test_explicit_attention_has_one_module_per_op_and_splits_the_packed_projection():
    mha = nn.MultiheadAttention(E, H)
    explicit = ExplicitMultiheadAttention.from_mha(mha)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert type(getattr(explicit, name)) is nn.Linear
    assert isinstance(explicit.qk, MatMul) and isinstance(explicit.av, MatMul)
    assert isinstance(explicit.softmax, nn.Softmax) and explicit.softmax.dim == -1
    packed = torch.cat([explicit.q_proj.weight, explicit.k_proj.weight, explicit.v_proj.weight])
    assert torch.equal(packed, mha.in_proj_weight)
    assert explicit.q_proj.weight.data_ptr() != mha.in_proj_weight.data_ptr()  # a copy, not a view


def test_qk_sees_q_scaled_by_one_over_sqrt_head_dim():
    explicit = ExplicitMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, batch_first=True)).eval()
    seen = {}
    explicit.qk.register_forward_hook(lambda m, args, out: seen.update(q=args[0]))
    x = torch.randn(N, L, E)
    explicit(x, x, x)
    q = explicit.q_proj(x).view(N, L, H, E // H).transpose(1, 2)
    torch.testing.assert_close(seen["q"], q / (E // H) ** 0.5)


def test_explicit_attention_matches_unbatched_input():
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    explicit = ExplicitMultiheadAttention.from_mha(mha)
    q, kv = torch.randn(L, E), torch.randn(S, E)
    per_head = torch.rand(H, L, S) < 0.3
    per_head[..., 0] = False
    kwargs = {"key_padding_mask": torch.tensor([False] * (S - 1) + [True]), "attn_mask": per_head}
    for ours, theirs in zip(explicit(q, kv, kv, **kwargs), mha(q, kv, kv, **kwargs)):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_explicit_attention_takes_separate_kdim_vdim_projections(bias):
    mha = nn.MultiheadAttention(E, H, bias=bias, kdim=10, vdim=7, batch_first=True).eval()
    assert not mha._qkv_same_embed_dim
    explicit = ExplicitMultiheadAttention.from_mha(mha)
    assert explicit.k_proj.in_features == 10 and explicit.v_proj.in_features == 7
    assert (explicit.q_proj.bias is None) == (not bias) and (explicit.out_proj.bias is None) == (not bias)
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, 10), torch.randn(N, S, 7)
    for ours, theirs in zip(explicit(q, k, v), mha(q, k, v)):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def test_explicit_attention_dropout_draws_the_same_mask_in_training_and_is_off_in_eval():
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).train()
    explicit = ExplicitMultiheadAttention.from_mha(mha)
    assert explicit.training
    x = torch.randn(N, L, E)
    torch.manual_seed(1)
    out, weights = mha(x, x, x, average_attn_weights=False)
    torch.manual_seed(1)
    out_x, weights_x = explicit(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(weights_x, weights, atol=TOL, rtol=0)
    torch.testing.assert_close(out_x, out, atol=TOL, rtol=0)
    assert (weights_x == 0).any()
    explicit.eval()
    torch.testing.assert_close(explicit(x, x, x)[0], explicit(x, x, x)[0], atol=0, rtol=0)


def test_explicit_attention_passes_gradients_to_every_projection():
    explicit = ExplicitMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, batch_first=True))
    x = torch.randn(N, L, E)
    explicit(x, x, x)[0].square().sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert getattr(explicit, name).weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs,match", [({"add_bias_kv": True}, "add_bias_kv"), ({"add_zero_attn": True}, "add_zero_attn")]
)
def test_explicit_attention_refuses_options_it_cannot_express(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplicitMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, **kwargs))


def test_explicit_attention_says_what_a_bad_call_should_be():
    explicit = ExplicitMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, batch_first=True))
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match=r"use \(L, S\)"):
        explicit(x, x, x, attn_mask=torch.zeros(L + 1, L, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"use \(N, S\)"):
        explicit(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        explicit(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="pass the mask too"):
        explicit(x, x, x, is_causal=True)


# ---- encoder layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "key_padding", "causal+key_padding"])
def test_explicit_encoder_layer_matches_transformer_encoder_layer_to_1e6(batch_first, norm_first, activation, masks):
    layer = nn.TransformerEncoderLayer(
        E, H, dim_feedforward=24, activation=activation, batch_first=batch_first, norm_first=norm_first
    ).eval()
    explicit = ExplicitEncoderLayer.from_layer(layer)
    x = _layout(torch.randn(N, L, E), batch_first)
    m = _masks(masks, L, L)
    kwargs = {"src_mask": m.get("attn_mask"), "src_key_padding_mask": m.get("key_padding_mask")}
    ours = explicit(x, **kwargs)
    torch.testing.assert_close(ours, layer(x, **kwargs), atol=TOL, rtol=0)  # PyTorch's reference path
    with torch.inference_mode():  # and its fused fast path, where it applies
        torch.testing.assert_close(ours.detach(), layer(x, **kwargs), atol=TOL, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_encoder_layer_takes_is_causal_as_a_hint_about_src_mask_like_pytorch(batch_first):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=batch_first).eval()
    explicit = ExplicitEncoderLayer.from_layer(layer)
    x = _layout(torch.randn(N, L, E), batch_first)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    ours = explicit(x, src_mask=causal, is_causal=True)
    torch.testing.assert_close(ours, layer(x, src_mask=causal, is_causal=True), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="pass the mask too"):
        explicit(x, is_causal=True)


def test_explicit_encoder_layer_names_every_op():
    explicit = ExplicitEncoderLayer.from_layer(nn.TransformerEncoderLayer(E, H, dim_feedforward=24))
    names = dict(explicit.named_children())
    assert isinstance(names["self_attn"], ExplicitMultiheadAttention)
    assert isinstance(names["activation"], nn.ReLU)
    assert isinstance(names["add1"], Add) and isinstance(names["add2"], Add)
    assert {"linear1", "linear2", "norm1", "norm2", "dropout", "dropout1", "dropout2"} <= set(names)


def test_activation_functions_become_modules_and_modules_are_kept():
    assert type(activation_module(F.relu)) is nn.ReLU
    assert type(activation_module(F.gelu)) is nn.GELU
    tanh_gelu = nn.GELU(approximate="tanh")
    kept = activation_module(tanh_gelu)
    assert isinstance(kept, nn.GELU) and kept.approximate == "tanh" and kept is not tanh_gelu
    with pytest.raises(ValueError, match="as a module"):
        activation_module(lambda x: x.clamp(min=0))


def test_explicit_encoder_layer_keeps_the_mode_and_dropout_rates():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=0.3).train()
    explicit = ExplicitEncoderLayer.from_layer(layer)
    assert explicit.training and explicit.self_attn.training
    assert explicit.dropout.p == explicit.dropout1.p == explicit.dropout2.p == explicit.self_attn.dropout.p == 0.3
    x = torch.randn(L, N, E)
    assert not torch.equal(explicit(x), explicit(x))  # dropout acts in training mode


# ---- make_explicit -------------------------------------------------------------------------------


class _Mixed(nn.Module):
    """An encoder stack (with its nested-tensor fast path on), a decoder layer and a bare attention."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
        self.decoder = nn.TransformerDecoderLayer(E, H, dim_feedforward=24, batch_first=True)
        self.pool = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(x, src_key_padding_mask=padding)
        y = self.decoder(x, memory, memory_key_padding_mask=padding)
        return self.pool(y, memory, memory, key_padding_mask=padding)[0]


def test_make_explicit_swaps_every_encoder_layer_and_leftover_attention_keeping_outputs():
    model = _Mixed().eval()
    x = torch.randn(N, L, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.inference_mode():
        before = model(x, padding)
    assert make_explicit(model) == 2 + 2 + 1  # encoder layers, the decoder's two attentions, the bare one
    assert not any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in model.modules())
    with torch.inference_mode():
        after = model(x, padding)
    keep = ~padding.unsqueeze(-1).expand_as(after)  # PyTorch's nested-tensor path leaves padded rows undefined
    torch.testing.assert_close(after[keep], before[keep], atol=TOL, rtol=0)
    assert make_explicit(model) == 0


def test_make_explicit_keeps_a_shared_layer_shared():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24)
    model = nn.ModuleDict({"a": layer, "b": layer})
    assert make_explicit(model) == 1
    assert isinstance(model["a"], ExplicitEncoderLayer) and model["a"] is model["b"]


def test_make_explicit_cannot_swap_the_model_itself():
    with pytest.raises(ValueError, match="from_layer"):
        make_explicit(nn.TransformerEncoderLayer(E, H))


# ---- ViTCifar ------------------------------------------------------------------------------------


def _tiny_vit() -> ViTCifar:
    return ViTCifar(dim=32, depth=2, heads=4, mlp_dim=48, patch=8, image_size=32, num_classes=5).eval()


def test_vit_module_names_are_the_checkpoint_keys():
    keys = set(ViTCifar().state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "mlp_head.0.weight", "mlp_head.1.bias"} <= keys
    assert "transformer.layers.5.self_attn.in_proj_weight" in keys
    assert "transformer.layers.6.norm1.weight" not in keys
    assert ViTCifar().pos_embed.shape == (1, 65, 128)


def test_vit_forward_uses_patch_embedding_class_token_and_position_embedding():
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        assert base.shape == (2, 5)
        for param in (model.cls_token, model.pos_embed, model.patch_embed.proj.weight):
            saved = param.clone()
            param.add_(0.5)
            assert not torch.allclose(model(x), base), "output ignores a parameter it should depend on"
            param.copy_(saved)
    with pytest.raises(ValueError, match=r"\[N, C, 32, 32\]"):
        model(torch.randn(2, 3, 28, 28))


def test_vit_is_the_same_after_make_explicit():
    model = _tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
    assert make_explicit(model) == 2
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before, atol=TOL, rtol=0)


def test_load_vit_cifar_infers_every_size_from_the_weights(tmp_path):
    model = _tiny_vit()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    for path in (tmp_path / "vit.pth", tmp_path):
        loaded = load_vit_cifar(path, heads=4)
        assert loaded.config == model.config and not loaded.training
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
        assert is_vit_cifar_checkpoint(path)


def test_load_vit_cifar_says_what_is_wrong_with_a_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vit_cifar(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_vit_cifar(tmp_path)
    state = _tiny_vit().state_dict()
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected keys"):
        load_vit_cifar(tmp_path / "extra.pth", heads=4)
    torch.save({**state, "transformer.layers.1.linear1.weight": torch.zeros(50, 32)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"transformer.layers.1.linear1.weight: \(50, 32\) vs \(48, 32\)"):
        load_vit_cifar(tmp_path / "bad.pth", heads=4)
    (tmp_path / "bad.pth").unlink()
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a CIFAR ViT"):
        load_vit_cifar(tmp_path / "resnet.pth")
    with pytest.raises(FileNotFoundError, match="2 "):
        load_vit_cifar(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_vit_cifar(tmp_path / "junk.pth")


def test_load_vit_cifar_never_runs_a_full_unpickle(tmp_path):
    torch.save({"model": _Mixed()}, tmp_path / "pickled_module.pth")  # loading it fully would import and build code
    with pytest.raises(ValueError, match="weights_only"):
        load_vit_cifar(tmp_path / "pickled_module.pth")
    assert not is_vit_cifar_checkpoint(tmp_path / "pickled_module.pth")


def test_is_vit_cifar_checkpoint_rejects_other_files(tmp_path):
    torch.save({"layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert not is_vit_cifar_checkpoint(tmp_path / "resnet.pth")
    assert not is_vit_cifar_checkpoint(tmp_path / "junk.pth")
    assert not is_vit_cifar_checkpoint(tmp_path / "absent.pth")


# ---- the shipped checkpoint ----------------------------------------------------------------------


def test_shipped_vit_scores_over_60_percent_on_500_test_images_and_explicit_form_agrees_exactly():
    pytest.importorskip("PIL.Image", reason="pip install pillow to read CIFAR-10 JPEGs")
    from lowbit.data.cifar10 import load_cifar10
    from lowbit.eval.classification import predict_logits

    checkpoint = _need(asset("vit_cifar", "vit_cifar10.pth"))
    images, labels = load_cifar10(
        _need(asset("cifar10", "cifar10_test_jpeg.tar.gz")), split="test", limit=500, normalize=NORMALIZE
    )
    assert is_vit_cifar_checkpoint(checkpoint)
    model = load_vit_cifar(checkpoint)
    assert model.config["depth"] == 6 and model.config["dim"] == 128 and model.config["mlp_dim"] == 256
    logits = predict_logits(model, images)
    assert make_explicit(model) == 6
    logits_x = predict_logits(model, images)
    accuracy = (logits.argmax(-1) == labels).float().mean().item() * 100
    assert torch.equal(logits_x.argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(logits_x, logits, atol=1e-4, rtol=0)
    assert accuracy > 60, f"fp32 top-1 {accuracy:.1f}% on 500 test images; the full test set gives 71.72%"
