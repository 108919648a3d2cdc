"""Reading GGUF files (llama.cpp's format) without the ``gguf`` package or transformers' converter.

``GGUFFile(path)`` parses the header, the metadata and the tensor table from a
memory map, checking every count, length and offset against the file's size
before it allocates anything, so a truncated or corrupted file gives one
``GGUFError`` naming the file and what is wrong. ``tensor(name)`` dequantizes
one tensor to float32 (in PyTorch's dimension order) straight from the map;
the block formats follow ggml's definitions:

- F32, F16, BF16;
- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: blocks of 32 along a row with an fp16 scale
  (and minimum);
- Q4_K, Q5_K, Q6_K: super-blocks of 256 with 8 (16 for Q6_K) sub-block scales.

``load_gguf_model(path)`` builds the transformers model a Llama-architecture
GGUF file describes (q/k rows brought back from llama.cpp's interleaved rotary
order to Hugging Face's rotate-half order), so any GGUF model is a starting
point for lowbit's methods and exports. ``gguf_to_hf_name`` maps the tensor names.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# metadata value types: struct code and size of the fixed-size ones
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}  # fmt: skip
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class QType:
    name: str
    block: int  # elements per block
    nbytes: int  # bytes per block


QTYPES = {
    0: QType("F32", 1, 4),
    1: QType("F16", 1, 2),
    2: QType("Q4_0", 32, 18),
    3: QType("Q4_1", 32, 20),
    6: QType("Q5_0", 32, 22),
    7: QType("Q5_1", 32, 24),
    8: QType("Q8_0", 32, 34),
    12: QType("Q4_K", 256, 144),
    13: QType("Q5_K", 256, 176),
    14: QType("Q6_K", 256, 210),
    30: QType("BF16", 1, 2),
}
# ggml types lowbit knows by name but cannot dequantize (a clear error, not a wrong tensor)
OTHER_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
               19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
               27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}  # fmt: skip


class GGUFError(ValueError):
    """A GGUF file lowbit cannot read, with the file and the reason."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (ggml's ne reversed): rows first
    qtype: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return QTYPES[self.qtype].name if self.qtype in QTYPES else OTHER_TYPES.get(self.qtype, f"type {self.qtype}")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has {self.size}")

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            code, size = _SCALARS[vtype]
            return self.scalar(code, size, f"the value of {key}")
        if vtype == STRING:
            return self.string(f"the value of {key}")
        if vtype == ARRAY:
            if depth > 2:
                self.fail(f"{key}: arrays nested more than 3 deep")
            itype = self.u32(f"the item type of {key}")
            count = self.u64(f"the length of {key}")
            if itype in _SCALARS:
                size = _SCALARS[itype][1]
                self.need(count * size, f"the {count} items of {key}")
                out = np.frombuffer(self.buf, _NUMPY[itype], count, self.pos).copy()
                self.pos += count * size
                return out.astype(bool) if itype == 7 else out
            if itype not in (STRING, ARRAY):
                self.fail(f"{key}: unknown array item type {itype}")
            self.need(count * 8, f"the {count} items of {key}")  # every item is at least 8 bytes
            return [self.value(itype, key, depth + 1) for _ in range(count)]
        self.fail(f"{key}: unknown metadata value type {vtype}")


class GGUFFile:
    """A GGUF file's metadata and tensor table, its tensor data memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header (24 bytes)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise FileNotFoundError(f"GGUF file {self.path} does not exist") from None
        self.size = size
        self._parse()

    def close(self) -> None:
        self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _parse(self) -> None:
        c = _Cursor(self._map, self.path)
        if bytes(self._map[:4]) != MAGIC:
            c.fail(f"not a GGUF file (starts with {bytes(self._map[:4])!r}, not {MAGIC!r})")
        c.pos = 4
        self.version = c.u32("the version")
        if self.version not in (2, 3):
            c.fail(f"GGUF version {self.version} is not supported (versions 2 and 3 are)")
        n_tensors = c.u64("the tensor count")
        n_kv = c.u64("the metadata count")
        # every entry takes some bytes: a count beyond what the file can hold is corruption
        if n_kv * 13 > self.size or n_tensors * 24 > self.size:
            c.fail(f"declares {n_kv} metadata entries and {n_tensors} tensors, more than its {self.size} bytes hold")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = c.string("a metadata key")
            if key in self.metadata:
                c.fail(f"metadata key {key} appears twice")
            self.metadata[key] = c.value(c.u32(f"the type of {key}"), key)
        infos = []
        for _ in range(n_tensors):
            name = c.string("a tensor name")
            ndim = c.u32(f"the dimension count of {name}")
            if not 1 <= ndim <= MAX_DIMS:
                c.fail(f"tensor {name} declares {ndim} dimensions (1 to {MAX_DIMS} allowed)")
            ne = [c.u64(f"the dimensions of {name}") for _ in range(ndim)]
            qtype = c.u32(f"the type of {name}")
            offset = c.u64(f"the offset of {name}")
            infos.append((name, ne, qtype, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            c.fail(f"general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_offset = -(-c.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, qtype, offset in infos:
            if name in self.tensors:
                c.fail(f"tensor {name} appears twice")
            if any(d == 0 or d > 1 << 40 for d in ne):
                c.fail(f"tensor {name} has dimensions {ne}")
            numel = 1
            for d in ne:
                numel *= d
            if qtype not in QTYPES and qtype not in OTHER_TYPES:
                c.fail(f"tensor {name} has unknown type {qtype}")
            if qtype in QTYPES:
                qt = QTYPES[qtype]
                if ne[0] % qt.block:
                    c.fail(f"tensor {name}: rows of {ne[0]} are not whole {qt.name} blocks of {qt.block}")
                nbytes = numel // qt.block * qt.nbytes
            else:
                nbytes = 0  # unknown to lowbit: its size is not checked, reading it fails clearly
            if offset % align:
                c.fail(f"tensor {name}: offset {offset} is not a multiple of the alignment {align}")
            start = self.data_offset + offset
            if start + nbytes > self.size:
                c.fail(
                    f"tensor {name} ({QTYPES[qtype].name} {list(reversed(ne))}) needs bytes {start}..{start + nbytes}"
                    f" but the file has {self.size}: truncated or corrupted"
                )
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes)

    # --- tensors --------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a read-only view on the map)."""
        t = self.info(name)
        return np.frombuffer(self._map, np.uint8, t.nbytes, t.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, shaped in PyTorch's order."""
        t = self.info(name)
        if t.qtype not in QTYPES:
            raise GGUFError(f"{self.path}: tensor {name} is {t.type_name}, which lowbit cannot dequantize yet "
                            f"(it reads {', '.join(q.name for q in QTYPES.values())})")  # fmt: skip
        blocks = torch.from_numpy(self.raw(name).copy())
        return dequantize(blocks, t.qtype, t.numel).reshape(t.shape)


# --- dequantization (ggml's block formats) ----------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from the last dimension's 2 bytes, as float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles first, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[..., 4] bytes of a little-endian bit mask -> [..., count] bits as uint8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(*qh.shape[:-1], -1)[..., :count]


def dequantize(data: torch.Tensor, qtype: int, numel: int) -> torch.Tensor:
    """``numel`` float32 values from ``data`` (uint8) in the ggml type ``qtype``."""
    qt = QTYPES[qtype]
    if data.numel() != numel // qt.block * qt.nbytes:
        raise ValueError(f"{qt.name}: {data.numel()} bytes do not hold {numel} values")
    if qt.name == "F32":
        return data.view(torch.float32).clone()
    if qt.name == "F16":
        return data.view(torch.float16).float()
    if qt.name == "BF16":
        return data.view(torch.bfloat16).float()
    b = data.reshape(-1, qt.nbytes)
    if qt.name == "Q8_0":
        return (_f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()).reshape(-1)
    if qt.name == "Q4_0":
        return (_f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)).reshape(-1)
    if qt.name == "Q4_1":
        return (_f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])).reshape(-1)
    if qt.name == "Q5_0":
        q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
        return (_f16(b[:, :2]) * (q.float() - 16)).reshape(-1)
    if qt.name == "Q5_1":
        q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
        return (_f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])).reshape(-1)
    if qt.name in ("Q4_K", "Q5_K"):
        return _dequant_q45k(b, five=qt.name == "Q5_K")
    if qt.name == "Q6_K":
        return _dequant_q6k(b)
    raise AssertionError(qt.name)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> 8 six-bit scales and 8 six-bit minimums."""
    s = s.to(torch.int32)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _dequant_q45k(b: torch.Tensor, five: bool) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 48:176] if five else b[:, 16:144]
    qs = qs.reshape(n, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)  # sub-block 2c: low nibbles of chunk c
    if five:
        high = (b[:, 16:48].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1  # [n, 8, 32]
        q = q | (high << 4)
    y = (d * sc).unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)
    return y.reshape(-1)


def _dequant_q6k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].view(torch.int8).float().reshape(n, 2, 8)
    d = _f16(b[:, 208:210]).reshape(n, 1, 1)
    lo = torch.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], dim=2)
    hi = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    q = (lo | (hi << 4)).float() - 32  # [n, half, quarter, 32]
    scale = sc.reshape(n, 2, 4, 2).repeat_interleave(16, dim=3)  # 16 values per scale
    return (d.unsqueeze(-1) * scale * q).reshape(-1)


# --- Llama-architecture models ----------------------------------------------------------------------

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED_ARCHS = ("llama",)


def gguf_to_hf_name(name: str) -> str | None:
    """The transformers Llama parameter name of a GGUF tensor, or ``None`` for one it has no place for."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        part = _BLOCK_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary row order back to Hugging Face's rotate-half order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_config_from_gguf(g: GGUFFile):
    """A transformers ``LlamaConfig`` from a GGUF file's ``llama.*`` metadata."""
    from transformers import LlamaConfig

    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{g.path}: architecture {arch!r} is not supported yet (lowbit reads {SUPPORTED_ARCHS})")

    def get(key, default=None):
        v = md.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"{g.path}: metadata {arch}.{key} is missing")
        return v

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else g.info("token_embd.weight").shape[0]
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        architectures=["LlamaForCausalLM"],
    )


def gguf_state_dict(g: GGUFFile, config, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama GGUF file dequantized under its transformers name (with a progress
    bar for files past 1 GiB)."""
    from tqdm.auto import tqdm

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = {}
    for name in tqdm(g.tensors, desc=f"reading {Path(g.path).name}", unit="tensor",
                     disable=not progress or g.size < 1 << 30):  # fmt: skip
        hf = gguf_to_hf_name(name)
        if hf is None:
            raise GGUFError(f"{g.path}: tensor {name} has no place in a Llama model")
        w = g.tensor(name)
        if hf.endswith("q_proj.weight"):
            w = _unpermute_rope(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = _unpermute_rope(w, kv_heads)
        out[hf] = w
    return out


def load_gguf_model(path: str | os.PathLike, config=None):
    """The transformers causal LM stored in the GGUF file ``path`` (float32, eval mode).

    ``config``: the transformers config to build (a ``config.json`` beside the file);
    by default one made from the file's metadata. Every model parameter must come from
    the file and every tensor of the file must find its parameter."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with GGUFFile(path) as g:
        config = config or llama_config_from_gguf(g)
        if getattr(config, "model_type", None) not in SUPPORTED_ARCHS:
            raise GGUFError(f"{path}: model_type {config.model_type!r} is not supported yet")
        state = gguf_state_dict(g, config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise GGUFError(f"{path}: the file does not match the config"
                        + (f"; missing {', '.join(missing[:5])}" if missing else "")
                        + (f"; unexpected {', '.join(extra[:5])}" if extra else ""))  # fmt: skip
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise GGUFError(f"{path}: {k} is {list(v.shape)} in the file, {list(expected[k].shape)} in the config")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    return model


def find_gguf(directory: str | os.PathLike) -> Path | None:
    """The one GGUF file of a model directory whose weights are only that file, else ``None``."""
    d = Path(directory)
    if not d.is_dir() or any(d.glob("*.safetensors")) or any(d.glob("*.bin")):
        return None
    found = sorted(d.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{directory} holds several GGUF files ({', '.join(f.name for f in found)}); keep one")
    return found[0] if found else None
