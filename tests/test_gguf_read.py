"""lowbit's own GGUF reader: bit-identical to the gguf package's dequantization, models equal to the
weights written, SmolLM2-135M loaded as transformers loads it, and hostile files refused clearly."""

import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.models import load_pretrained
from lowbit.models.gguf import QTYPES, GGUFError, GGUFFile, dequantize, load_gguf_model

gguf = pytest.importorskip("gguf", reason="pip install gguf: the reference dequantization")
FUZZ_EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "300"))  # raise it for a longer hunt


def _random_blocks(rng, qt, nb):
    """Random blocks of type ``qt`` whose fp16 scale fields hold ordinary numbers."""
    if qt.name == "F32":
        return np.frombuffer(rng.normal(size=nb).astype(np.float32).tobytes(), np.uint8).copy()
    if qt.name in ("F16", "BF16"):
        return np.frombuffer(rng.normal(size=nb).astype(np.float16).tobytes(), np.uint8).copy()
    raw = rng.integers(0, 256, (nb, qt.nbytes), dtype=np.uint8)
    halves = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(qt.name, (0,))
    for off in halves:
        raw[:, off : off + 2] = np.frombuffer(rng.normal(0, 0.1, nb).astype(np.float16).tobytes(), np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("code", sorted(QTYPES))
def test_every_type_dequantizes_bit_identically_to_the_gguf_package(code):
    qt = QTYPES[code]
    rng = np.random.default_rng(code)
    raw = _random_blocks(rng, qt, 40)
    numel = raw.size // qt.nbytes * qt.block
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qt.name]).reshape(-1).astype(np.float32)
    got = dequantize(torch.from_numpy(raw.copy()), code, numel).numpy()
    assert got.shape == ref.shape and np.array_equal(got, ref)


def test_a_written_model_reads_back_exactly(stories_dir, tmp_path):
    """lowbit's GGUF export (F32) then lowbit's reader: every parameter as it was, q/k rows included
    (the export permutes them to llama.cpp's rotary order, the reader permutes them back)."""
    pytest.importorskip("sentencepiece")
    from lowbit.io.gguf_export import export_gguf

    model, _ = load_pretrained(str(stories_dir))
    export_gguf(model, tmp_path / "m.gguf", stories_dir, "f32")
    back = load_gguf_model(tmp_path / "m.gguf")  # the config from the file's metadata
    want, got = model.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)


@pytest.fixture(scope="module")
def smollm2_file(request):
    from lowbit.assets import asset

    path = asset("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path.exists():
        pytest.skip(f"{path} is absent (set LOWBIT_ASSETS)")
    return path


def test_smollm2_loads_with_the_packages_dequantized_weights(smollm2_file):
    """The real 135M model: parsed in well under a second, each stored type (Q8_0 embedding, Q4_1
    linears, F32 norms) equal to the gguf package's reader, q/k rows in transformers' order."""
    from lowbit.io.gguf_export import _rope_permute

    model, tok = load_pretrained(str(smollm2_file.parent))
    assert tok is not None and model.config.num_hidden_layers == 30
    reader = gguf.GGUFReader(str(smollm2_file))
    stored = {t.name: t for t in reader.tensors}
    layer = model.model.layers[7]
    for name, param, heads in [
        ("token_embd.weight", model.model.embed_tokens.weight, None),
        ("blk.7.attn_q.weight", layer.self_attn.q_proj.weight, 9),
        ("blk.7.attn_k.weight", layer.self_attn.k_proj.weight, 3),
        ("blk.7.ffn_down.weight", layer.mlp.down_proj.weight, None),
        ("blk.7.attn_norm.weight", layer.input_layernorm.weight, None),
    ]:
        t = stored[name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        mine = _rope_permute(param.detach(), heads) if heads else param.detach()
        assert torch.equal(mine.reshape(ref.shape), ref), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the config says
    with GGUFFile(smollm2_file) as g:
        assert {t.type_name for t in g.tensors.values()} == {"Q4_1", "Q8_0", "F32"} and len(g.tensors) == len(stored)


# --- hostile files ---------------------------------------------------------------------------------


def _tiny_file(tmp_path) -> bytes:
    """A small valid GGUF file written by the gguf package: metadata of several kinds, three tensors."""
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b.weight", np.ones((4, 32), dtype=np.float16))
    blocks = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("c.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    return _tiny_file(tmp_path_factory.mktemp("gguf"))


def _read_all(path):
    with GGUFFile(path) as g:
        return {n: g.tensor(n) for n in g.tensors}


def test_the_tiny_file_reads(tiny_bytes, tmp_path):
    (tmp_path / "ok.gguf").write_bytes(tiny_bytes)
    got = _read_all(tmp_path / "ok.gguf")
    assert torch.equal(got["a.weight"], torch.arange(64.0).reshape(2, 32))
    assert torch.equal(got["b.weight"], torch.ones(4, 32))
    torch.testing.assert_close(got["c.weight"], torch.linspace(-1, 1, 64).reshape(2, 32), atol=0.07, rtol=0)


def _only_clear_errors(path):
    """Reading ``path`` either works or raises ``GGUFError`` naming the file."""
    try:
        _read_all(path)
    except GGUFError as e:
        assert str(path) in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_files_fail_clearly(tiny_bytes, tmp_path, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_bytes)
    with GGUFFile(path) as g:  # the end of the last tensor's data (what follows is padding)
        end = max(t.offset + t.nbytes for t in g.tensors.values())
    path.write_bytes(tiny_bytes[: cut % end])
    with pytest.raises(GGUFError, match="cut.gguf"):
        _read_all(path)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_headers_fail_clearly_or_read(tiny_bytes, tmp_path, data):
    """Bytes of the header, metadata and tensor table overwritten at random (including absurd counts,
    lengths, dimensions and offsets): a clear error or a successful read, nothing else."""
    raw = bytearray(tiny_bytes)
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny_bytes)
    with GGUFFile(path) as g:
        header_end = g.data_offset  # only the header, metadata and tensor table are fuzzed
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 1))
        value = data.draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f", b"\x80", struct.pack("<Q", 1 << 62)]))
        raw[at : at + len(value)] = value[: max(0, header_end - at)]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    _only_clear_errors(bad)


@pytest.mark.parametrize(
    "patch,message",
    [
        (lambda b: b"GGML" + b[4:], "not a GGUF file"),
        (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "version 1 is not supported"),
        (lambda b: b[:8] + struct.pack("<Q", 1 << 60) + b[16:], "more than its"),
        (lambda b: b[:16] + struct.pack("<Q", 1 << 60) + b[24:], "more than its"),
        (lambda b: b[:-64], "truncated or corrupted"),
        (lambda b: b"", "too short"),
    ],
)
def test_each_corruption_names_the_problem(tiny_bytes, tmp_path, patch, message):
    path = tmp_path / "x.gguf"
    path.write_bytes(patch(tiny_bytes))
    with pytest.raises(GGUFError, match=message):
        _read_all(path)


def test_a_missing_file_and_an_unknown_tensor_are_named(tiny_bytes, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        GGUFFile(tmp_path / "nope.gguf")
    (tmp_path / "ok.gguf").write_bytes(tiny_bytes)
    with GGUFFile(tmp_path / "ok.gguf") as g, pytest.raises(KeyError, match="no tensor d.weight"):
        g.tensor("d.weight")


def test_a_file_that_is_not_a_llama_model_is_refused(tiny_bytes, tmp_path):
    (tmp_path / "ok.gguf").write_bytes(tiny_bytes)
    with pytest.raises(GGUFError, match="metadata llama.embedding_length is missing"):
        load_gguf_model(tmp_path / "ok.gguf")
