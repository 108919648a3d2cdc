"""GGUF for llama.cpp: Llama-architecture models with their tokenizer (SentencePiece or byte-level BPE).

Types: F32, Q8_0, Q4_0, Q4_1 (blocks of 32 along each row, one fp16 scale per block;
Q4_1 adds an fp16 minimum). lowbit's own codes are written as they are when the
scheme is the GGUF type's:

- int4, symmetric, group 32 -> Q4_0 (``(q - 8) * d``, the same formula);
- int4, group 32 -> Q4_1 (``q * d + m`` with ``m = -z * d`` rounded to fp16);
- int8, symmetric, group 32 -> Q8_0.

Any other weight is requantized from its dequantized values (in the input's
channel order) with the ``gguf`` package's reference quantizers, and tensors
whose rows are not a multiple of 32 (stories260K's 172-wide ``down_proj``) are
written as F32. Act-order layers (``QLinear.in_perm``, from GPTQ ``desc_act``
checkpoints) are among the requantized: their groups are scattered over the
row, not the type's contiguous blocks of 32; ``f32`` writes them exactly. The report returned
(and printed by ``lowbit export``) lists every tensor that was not written from
lowbit's codes and why.

Query and key rows are permuted from Hugging Face's rotate-half layout to the
interleaved rotary layout llama.cpp's ``llama`` architecture expects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.files import make_ordinary
from lowbit.nn.qlinear import QLinear
from lowbit.quantized_weight import QuantizedWeight

GGUF_TYPES = ("f32", "q8_0", "q4_0", "q4_1")
BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install gguf sentencepiece") from None
    return gguf


def _rope_permute(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or its per-row parameters) for interleaved rotary."""
    rows = x.shape[0]
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _native_blocks(qw: QuantizedWeight, qtype: str, heads: int | None) -> np.ndarray | None:
    """GGUF blocks straight from lowbit's codes when the scheme is the type's, else ``None``."""
    fmt = qw.fmt
    n, k = qw.shape
    if fmt.kind != "int" or fmt.group_size != BLOCK or k % BLOCK or qw.scale.dtype != torch.float16:
        return None
    codes, scale, zero = qw.codes(), qw.scale, qw.zero_or_default()
    if heads is not None:
        codes, scale, zero = (_rope_permute(t, heads) for t in (codes, scale, zero))
    nb = k // BLOCK
    d = scale.reshape(n * nb, 1).numpy().view(np.uint8)  # [blocks, 2]
    blocks = codes.reshape(n * nb, BLOCK).numpy()
    if qtype == "q8_0" and fmt.bits == 8 and fmt.symmetric:
        q = (blocks.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, q], axis=1).reshape(n, -1)
    if qtype in ("q4_0", "q4_1") and fmt.bits == 4 and (fmt.symmetric or qtype == "q4_1"):
        nibbles = blocks[:, :16] | (blocks[:, 16:] << 4)
        if qtype == "q4_0":
            return np.concatenate([d, nibbles], axis=1).reshape(n, -1)
        m = (-zero.float() * scale.float()).to(torch.float16).reshape(n * nb, 1).numpy().view(np.uint8)
        return np.concatenate([d, m, nibbles], axis=1).reshape(n, -1)
    return None


def _permuted_input(module: QLinear) -> bool:
    """Whether the stored code columns are a permutation of the input channels (act-order, or W8A8's ``perm``)."""
    return module.in_perm is not None or getattr(module, "perm", None) is not None


def _encode(name: str, module: nn.Module, qtype: str, heads: int | None, report: dict):
    """``(array, raw_type)`` for one weight, recording how it was written."""
    gguf = _gguf()
    types = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "q4_1": gguf.GGMLQuantizationType.Q4_1}  # fmt: skip
    permuted = isinstance(module, QLinear) and _permuted_input(module)
    if isinstance(module, QLinear):
        qw = module.quantized_weight
        # permuted codes are not in the row order GGUF blocks need; kept fp16 outliers have no GGUF block:
        # both are written from the dequantized weight (the report says which were re-quantized)
        if qtype != "f32" and not permuted and not module.has_terms:
            native = _native_blocks(qw, qtype, heads)
            if native is not None:
                report["native"].append(name)
                return native, types[qtype]
    w = module.weight.detach().float().cpu()  # a QLinear's in the input's channel order
    if heads is not None:
        w = _rope_permute(w, heads)
    if qtype == "f32":
        return w.numpy().astype(np.float32), None
    if w.shape[1] % BLOCK:
        report["fallback_f32"].append(f"{name}: left in F32 (rows of {w.shape[1]} are not a multiple of {BLOCK})")
        return w.numpy().astype(np.float32), None
    why = f"{module.fmt.describe()} is not {qtype}'s scheme" if isinstance(module, QLinear) else "unquantized"
    if permuted:
        why = f"act-order (permuted input) {module.fmt.describe()}: its groups are not contiguous blocks of {BLOCK}"
    elif isinstance(module, QLinear) and module.outlier_val is not None:
        why = f"{module.fmt.describe()} with {module.outlier_val.numel()} weights kept in fp16, which GGUF cannot hold"
    elif isinstance(module, QLinear) and module.has_terms:
        why = f"{module.fmt.describe()} with a low-rank or residual term, which GGUF cannot hold"
    report["requantized"].append(f"{name}: requantized to {qtype} from its dequantized weights ({why})")
    return gguf.quants.quantize(w.numpy().astype(np.float32), types[qtype]), types[qtype]


def export_gguf(model: nn.Module, out: str | os.PathLike, tokenizer_dir: str | os.PathLike, qtype: str = "q4_0"):
    """Write ``model`` (a transformers Llama, quantized by lowbit or not) as one GGUF file."""
    gguf = _gguf()
    qtype = qtype.lower()
    if qtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError("GGUF export supports Llama-architecture models (config.model_type == 'llama')")
    w8a8 = [n for n, m in model.named_modules() if hasattr(m, "act") and isinstance(m, QLinear)]
    if w8a8:  # llama.cpp quantizes activations its own way; the file would compute something else
        raise ValueError("GGUF holds weight-only models; these layers have integer activations: " + ", ".join(w8a8))
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "tokenizer.model").exists() and not (tok_dir / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{tokenizer_dir} has neither a SentencePiece tokenizer.model nor a tokenizer.json to put in the GGUF file"
        )
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} should name a .gguf file")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new path")

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    report: dict = {"type": qtype, "native": [], "requantized": [], "fallback_f32": []}
    tmp = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    file_types = {"f32": 0, "q4_0": 2, "q4_1": 3, "q8_0": 7}
    writer.add_file_type(file_types[qtype])
    _add_tokenizer(writer, gguf, Path(tokenizer_dir), cfg)

    body = model.model
    writer.add_tensor("token_embd.weight", body.embed_tokens.weight.detach().float().numpy())
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for i, layer in enumerate(body.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight.detach().float().numpy())
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight.detach().float().numpy())
        for hf, gg in names.items():
            permute = heads if hf.endswith("q_proj") else kv_heads if hf.endswith("k_proj") else None
            array, raw = _encode(f"model.layers.{i}.{hf}", layer.get_submodule(hf), qtype, permute, report)
            writer.add_tensor(f"blk.{i}.{gg}.weight", array, raw_dtype=raw)
    writer.add_tensor("output_norm.weight", body.norm.weight.detach().float().numpy())
    if not getattr(cfg, "tie_word_embeddings", False):
        writer.add_tensor("output.weight", model.lm_head.weight.detach().float().numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        make_ordinary(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report["out"] = str(out)
    return report


def _add_tokenizer(writer, gguf, directory: Path, cfg) -> None:
    if (directory / "tokenizer.model").exists():
        _add_sentencepiece(writer, gguf, directory, cfg)
    else:
        _add_bpe(writer, gguf, directory, cfg)


def _add_sentencepiece(writer, gguf, directory: Path, cfg) -> None:
    try:
        vocab = gguf.vocab.SentencePieceVocab(directory)
    except RuntimeError as e:
        raise ImportError(f"{e}: pip install sentencepiece") from None
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    sp = vocab.sentencepiece_tokenizer
    writer.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else sp.bos_id())
    writer.add_eos_token_id(cfg.eos_token_id if cfg.eos_token_id is not None else sp.eos_id())
    if sp.unk_id() >= 0:
        writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)


# llama.cpp's pre-tokenizer names for the byte-level splits transformers' tokenizer.json describes
_SPLIT_HEAD = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
_SPLIT_TAIL = "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
LLAMA3_SPLIT = _SPLIT_HEAD + "\\p{N}{1,3}" + _SPLIT_TAIL  # numbers in runs of up to three digits
QWEN2_SPLIT = _SPLIT_HEAD + "\\p{N}" + _SPLIT_TAIL  # digits one by one


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """The ``tokenizer.ggml.pre`` name whose split llama.cpp applies for this tokenizer.json.

    Only splits known to be the same as llama.cpp's are named; any other raises, since a wrong
    name would make llama.cpp tokenize differently from transformers without an error.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex inside ByteLevel (llama.cpp spells it with a hyphen)
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            pattern = (parts[0].get("pattern") or {}).get("Regex")
            if pattern == LLAMA3_SPLIT:
                return "llama-bpe"
            if pattern == QWEN2_SPLIT:
                return "qwen2"
    raise ValueError(
        f"this tokenizer.json's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp pre-tokenizer lowbit "
        "knows to split the same way; GGUF export would tokenize differently, so it stops"
    )


def _add_bpe(writer, gguf, directory: Path, cfg) -> None:
    tj = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            f"{directory / 'tokenizer.json'} is not a byte-level BPE tokenizer (model {model.get('type')}); "
            "GGUF export writes SentencePiece (tokenizer.model) and byte-level BPE vocabularies"
        )
    pre = bpe_pre_tokenizer(tj)
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens") or []}
    for text, tok in added.items():
        vocab.setdefault(text, tok["id"])
    size = max(cfg.vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(size):
        text = by_id.get(i)
        if text is None:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(T.CONTROL if added[text].get("special") else T.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp refuses such a file ("cannot find tokenizer merges")
        raise ValueError(
            f"{directory / 'tokenizer.json'} has no BPE merges; llama.cpp cannot load a BPE vocabulary without them"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=size)
    special.add_to_gguf(writer)  # bos / eos / unk / pad ids, add_bos_token, the chat template
    if special.special_token_ids.get("bos") is None and cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if special.special_token_ids.get("eos") is None and cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)


def gguf_coverage(path: str | os.PathLike):
    """Coverage of a GGUF file from its tensor table: block weights stored quantized or not."""
    from lowbit.coverage import Coverage, LayerRecord

    gguf = _gguf()
    coverage = Coverage()
    for t in gguf.GGUFReader(str(path)).tensors:
        if not t.name.endswith(".weight") or len(t.shape) != 2:
            continue
        numel = int(np.prod(t.shape))
        kind = t.tensor_type.name
        in_block = t.name.startswith("blk.")
        if kind in ("F32", "F16", "BF16"):
            coverage.add(LayerRecord(t.name, kind, "skipped", f"stored as {kind}", in_block, numel=numel))
        else:
            bpw = int(t.n_bytes) * 8 / numel
            coverage.add(LayerRecord(t.name, kind, "quantized", "", in_block, kind, bpw, numel, "gguf"))
    return coverage
