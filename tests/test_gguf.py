"""GGUF export of stories260K: decoded with the gguf reader, and run by llama.cpp when it is installed."""

import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit.eval import token_chunks

gguf = pytest.importorskip("gguf", reason="pip install gguf sentencepiece to test GGUF export")
pytest.importorskip("sentencepiece", reason="pip install sentencepiece to test GGUF export")

from lowbit.io.gguf_export import _rope_permute, export_gguf


def _quantized(stories_dir, bits, sym):
    from lowbit.models import load_pretrained

    model, tok = load_pretrained(str(stories_dir))
    if bits:
        lowbit.quantize(model, "rtn", bits=bits, group_size=32, symmetric=sym, progress=False)
    return model, tok


@pytest.mark.parametrize(
    "bits,sym,qtype,exact", [(4, True, "q4_0", True), (8, True, "q8_0", True), (4, False, "q4_1", False)]
)
def test_lowbit_codes_are_written_as_the_matching_gguf_type(stories_dir, tmp_path, bits, sym, qtype, exact):
    model, _ = _quantized(stories_dir, bits, sym)
    report = export_gguf(model, tmp_path / "m.gguf", stories_dir, qtype)
    assert len(report["native"]) == 30 and report["requantized"] == []
    assert len(report["fallback_f32"]) == 5 and all("left in F32 (rows of 172" in r for r in report["fallback_f32"])  # down_proj
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for hf, name, heads in [
        ("self_attn.q_proj", "attn_q", 8),
        ("self_attn.k_proj", "attn_k", 4),
        ("mlp.gate_proj", "ffn_gate", None),
    ]:
        t = tensors[f"blk.2.{name}.weight"]
        assert t.tensor_type.name == qtype.upper()
        ref = model.model.layers[2].get_submodule(hf).weight
        ref = _rope_permute(ref, heads) if heads else ref
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float()
        if exact:
            assert torch.equal(got, ref)
        else:  # Q4_1 stores the minimum -z*d in fp16
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F32"


def test_other_schemes_are_requantized_and_reported(stories_dir, tmp_path):
    model, _ = _quantized(stories_dir, 3, False)
    report = export_gguf(model, tmp_path / "m.gguf", stories_dir, "q4_0")
    assert len(report["requantized"]) == 30 and "requantized to q4_0 from its dequantized weights (int3 g32 asym is not q4_0's scheme)" in report["requantized"][0]


def test_bad_requests_fail_clearly(stories_dir, tmp_path):
    model, _ = _quantized(stories_dir, 0, True)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        export_gguf(model, tmp_path / "m.gguf", stories_dir, "q5_k")
    with pytest.raises(ValueError, match=r"\.gguf"):
        export_gguf(model, tmp_path / "m.bin", stories_dir, "f32")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        export_gguf(model, tmp_path / "m.gguf", tmp_path, "f32")


def llama_cpp_perplexity(path, chunks):
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'lowbit[llamacpp]' (compiles llama.cpp)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=chunks.shape[1], logits_all=True, verbose=False, n_threads=2)
    losses = []
    for chunk in chunks.tolist():
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        losses.append(-np.mean(logp[np.arange(len(chunk) - 1), chunk[1:]]))
    return math.exp(float(np.mean(losses)))


def lowbit_perplexity(model, chunks):
    from lowbit.eval.perplexity import chunk_losses

    for m in model.modules():
        if isinstance(m, lowbit.QLinear):
            m.kernel, m._cache = "dequant", {}
    return math.exp(chunk_losses(model, chunks, progress=False).mean().item())


@pytest.mark.llamacpp
@pytest.mark.parametrize("bits,sym,qtype", [(0, True, "f32"), (0, True, "q8_0"), (4, True, "q4_0"), (4, False, "q4_1")])
def test_llama_cpp_perplexity_matches_lowbit(stories_dir, tinystories_halves, tmp_path, bits, sym, qtype):
    model, tok = _quantized(stories_dir, bits, sym)
    chunks = token_chunks(tok, tinystories_halves[1][:120_000], 512)[:24]
    export_gguf(model, tmp_path / "m.gguf", stories_dir, qtype)
    theirs = llama_cpp_perplexity(tmp_path / "m.gguf", chunks)
    ours = lowbit_perplexity(model, chunks)
    print(f"{qtype}: llama.cpp {theirs:.4f}, lowbit {ours:.4f}")
    assert abs(theirs - ours) / ours < 0.01


def test_info_reads_a_gguf_file(stories_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app

    model, _ = _quantized(stories_dir, 4, True)
    export_gguf(model, tmp_path / "m.gguf", stories_dir, "q4_0")
    info = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "m.gguf"), "--json"]).stdout)
    assert info["quant_method"] == "gguf"
    assert (info["block_linears_quantized"], info["block_linears_total"]) == (30, 35)  # down_proj stays F32
    assert info["bits_per_weight"] == pytest.approx(4.5)  # Q4_0: 18 bytes per 32 weights


def test_byte_level_bpe_pre_tokenizers_are_named_or_refused():
    from lowbit.io.gguf_export import LLAMA3_SPLIT, QWEN2_SPLIT, bpe_pre_tokenizer

    assert bpe_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     {"type": "ByteLevel", "use_regex": True}]}  # fmt: skip
    assert bpe_pre_tokenizer({"pre_tokenizer": digits}) == "smollm"
    for pattern, name in ((LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2")):
        seq = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": pattern}},
                                                      {"type": "ByteLevel", "use_regex": False}]}  # fmt: skip
        assert bpe_pre_tokenizer({"pre_tokenizer": seq}) == name
    odd = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\s+"}},
                                                  {"type": "ByteLevel", "use_regex": False}]}  # fmt: skip
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        bpe_pre_tokenizer({"pre_tokenizer": odd})


def _tiny_bpe_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_byte_level_bpe_tokenizer_goes_into_the_gguf_file(tmp_path):
    import json

    from lowbit.assets import asset

    tok_dir = asset("smollm2-135m")
    if not (tok_dir / "tokenizer.json").exists():
        pytest.skip("SmolLM2's tokenizer.json is not in the assets")
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    model = _tiny_bpe_llama(49152)
    lowbit.quantize(model, "rtn", bits=4, group_size=32, symmetric=True, progress=False)
    export_gguf(model, tmp_path / "m.gguf", tok_dir, "q4_0")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields

    def text(key):
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert text("tokenizer.ggml.model") == "gpt2" and text("tokenizer.ggml.pre") == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 49152
    assert bytes(tokens.parts[tokens.data[300]]).decode() == next(t for t, i in tj["model"]["vocab"].items() if i == 300)
    assert len(fields["tokenizer.ggml.merges"].data) == len(tj["model"]["merges"])
    types = fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[0]][0]) == int(gguf.TokenType.CONTROL)  # <|endoftext|> is special
    assert int(types.parts[types.data[300]][0]) == int(gguf.TokenType.NORMAL)


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_bpe_as_transformers_does(tmp_path, tinystories_halves):
    from transformers import AutoTokenizer

    from lowbit.assets import asset

    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'lowbit[llamacpp]' (compiles llama.cpp)")
    tok_dir = asset("smollm2-135m")
    if not (tok_dir / "tokenizer.json").exists():
        pytest.skip("SmolLM2's tokenizer.json is not in the assets")
    model = _tiny_bpe_llama(49152)
    export_gguf(model, tmp_path / "m.gguf", tok_dir, "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, verbose=False, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sample = tinystories_halves[1][:4000]
    theirs = llm.tokenize(sample.encode("utf-8"), add_bos=False, special=False)
    ours = tok(sample, add_special_tokens=False).input_ids
    assert theirs == ours


def test_quantize_then_export_gguf_from_the_cli(stories_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner()
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(stories_dir), "--out", str(out), "--group-size", "32", "--sym"])
    assert res.exit_code == 0, res.output
    assert (out / "tokenizer.model").exists()  # the SentencePiece model travels with the checkpoint
    res = runner.invoke(app, ["export", str(out), "--format", "gguf", "--out", str(tmp_path / "q.gguf")])
    assert res.exit_code == 0, res.output
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
