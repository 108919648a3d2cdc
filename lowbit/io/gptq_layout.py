"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel, ``checkpoint_format: gptq``).

Per quantized linear with ``K`` inputs, ``N`` outputs, ``b`` bits and ``G`` groups:

- ``qweight`` int32 ``[K * b / 32, N]``: codes packed along the input dimension,
  ``32 / b`` per word, the first in the lowest bits;
- ``qzeros`` int32 ``[G, N * b / 32]``: zero points minus one (the format's
  historical offset), packed along the output dimension;
- ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input.

``config.json`` carries one global ``quantization_config`` (``quant_method: gptq``,
``bits``, ``group_size``, ``sym``, ``desc_act``). lowbit writes 2-, 4- and 8-bit
weights whose dimensions fill whole words, and reads any such checkpoint whose
groups all hold ``group_size`` inputs (the last may hold fewer).

Act-order checkpoints (``desc_act: true``, most GPTQ checkpoints on the Hub)
scatter each group over the inputs: input ``c`` belongs to group ``g_idx[c]``.
Sorting the inputs by group (a stable sort) gathers every group into one run,
which is an ordinary grouped weight; lowbit stores the codes in that order and
gives the ``QLinear`` the sort as ``in_perm``, which it applies to the input,
so the layer computes exactly what the checkpoint describes. Export reverses
it: the codes go back to input order and ``g_idx`` names each input's group.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.formats import integer
from lowbit.formats.spec import WeightFormat
from lowbit.io import model_card
from lowbit.io.native import WEIGHTS, atomic_directory, copy_tokenizer, hf_config, plain_state, qlinear_state_keys
from lowbit.models.adapters import set_module
from lowbit.nn.qconv import QConv
from lowbit.nn.qlinear import QLinear
from lowbit.nn.w8a8conv import W8A8Conv
from lowbit.quantized_weight import QuantizedWeight

PACKABLE_BITS = (2, 4, 8)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``codes`` (values in ``[0, 2**bits)``) along ``dim``, ``32 // bits`` per int32 word."""
    per = 32 // bits
    x = codes.to(torch.int64).movedim(dim, 0)
    x = x.reshape(x.shape[0] // per, per, *x.shape[1:])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *([1] * (x.dim() - 2)))
    words = (x << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    x = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *([1] * (x.dim() - 1)))
    out = (x.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return out.reshape(-1, *x.shape[1:]).movedim(0, dim).to(torch.uint8)


def check_exportable(model: nn.Module) -> tuple[list[tuple[str, QLinear]], WeightFormat]:
    """The quantized layers and their one shared format, or an error listing what cannot be written."""
    convs = [n for n, m in model.named_modules() if isinstance(m, (QConv, W8A8Conv))]
    if convs:
        raise ValueError(f"the GPTQ layout holds linear layers only; these are quantized convs: {', '.join(convs[:5])}"
                         "; save the model in lowbit's native format (lowbit.save)")  # fmt: skip
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers; quantize it before exporting to the GPTQ layout")
    problems = []
    formats = {}
    for name, m in layers:
        fmt, (n, k) = m.fmt, (m.out_features, m.in_features)
        per = 32 // fmt.bits if fmt.bits in PACKABLE_BITS else None
        if fmt.kind != "int" or fmt.bits not in PACKABLE_BITS:
            problems.append(f"{name}: {fmt.describe()} (the layout holds 2-, 4- or 8-bit integers)")
        elif k % per or n % per:
            problems.append(f"{name}: shape {n}x{k} does not fill whole int32 words of {per} codes")
        if m.has_terms:
            problems.append(f"{name}: terms beside the codes (fp16 outliers, a low-rank or a residual term), which "
                            "the layout cannot hold")  # fmt: skip
        scale = m.scales.float()
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            problems.append(f"{name}: NaN, Inf or zero scales")
        elif m.scales.dtype != torch.float16:
            problems.append(f"{name}: scales outside the fp16 range the layout stores")
        if m.zeros is not None and bool((m.zeros == 0).any()):
            problems.append(f"{name}: a zero point of 0, which the layout's zero-minus-one storage cannot hold")
        if hasattr(m, "act"):  # a W8A8Linear: the layout has no activation quantization to carry
            problems.append(f"{name}: integer activations ({m.act.describe()}); the GPTQ layout is weight-only, "
                            "export W8A8 models as compressed-tensors")  # fmt: skip
        formats[name] = (fmt.bits, integer.effective_group_size(k, fmt.group_size) if fmt.group_size != -1 else -1)
    if len(set(formats.values())) > 1:
        problems.append(f"layers disagree on bits/group size {sorted(set(formats.values()))}; the layout has one")
    if problems:
        raise ValueError("cannot write the GPTQ layout: " + "; ".join(problems))
    return layers, layers[0][1].fmt


def export_gptq(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    layers, fmt = check_exportable(model)
    tensors, _ = plain_state(model, qlinear_state_keys(model))  # tied copies are re-tied on load
    for name, m in layers:
        qw = m.quantized_weight
        n, k = qw.shape
        g = integer.effective_group_size(k, fmt.group_size)
        codes, g_idx = qw.codes(), torch.arange(k) // g  # both in stored column order
        if m.in_perm is not None:  # stored column j is input in_perm[j]: put both back in input order
            perm = m.in_perm.cpu()
            codes, g_idx = _scatter_columns(codes, perm), _scatter_columns(g_idx[None], perm)[0]
        tensors[f"{name}.qweight"] = pack_int32(codes.t(), fmt.bits, 0)
        tensors[f"{name}.qzeros"] = pack_int32(
            (qw.zero_or_default().t().to(torch.int64) - 1) % (1 << fmt.bits), fmt.bits, 1
        )
        tensors[f"{name}.scales"] = qw.scale.t().to(torch.float16).contiguous()
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32).contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(torch.float16).contiguous()
    qconfig = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": fmt.bits,
        "group_size": fmt.group_size,
        "sym": fmt.symmetric,
        "desc_act": any(m.in_perm is not None for _, m in layers),
        "true_sequential": True,
    }
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(model)
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
        copy_tokenizer(model, tokenizer, tmp)
        model_card.write(model, tmp, layout="gptq")
    return Path(out_dir)


def _scatter_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` with its column ``j`` moved to column ``perm[j]`` (the inverse of ``x[:, perm]``)."""
    out = torch.empty_like(x)
    out[:, perm] = x
    return out


def _groups_from_g_idx(g_idx: torch.Tensor, name: str, k: int, ngroups: int) -> tuple[int, torch.Tensor | None]:
    """The group size ``g_idx`` describes and, for act-order, the input order that makes groups contiguous.

    The order is the stable sort of ``g_idx``: after it, group ``i`` occupies
    inputs ``[i * g, (i + 1) * g)``, the grouping lowbit's formats express.
    ``None`` when the groups already are contiguous (no permutation to apply).
    """
    g_idx = g_idx.reshape(-1).long()
    if g_idx.numel() != k:
        raise ValueError(f"{name}.g_idx holds {g_idx.numel()} entries for {k} inputs")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= ngroups:
        raise ValueError(f"{name}.g_idx names groups outside the {ngroups} that {name}.scales holds")
    counts = torch.bincount(g_idx, minlength=ngroups)
    if ngroups == 1:
        return -1, None  # one group: per-channel, whatever the input order
    g = int(counts[0])
    if bool((counts[:-1] != g).any()) or not 0 < int(counts[-1]) <= g:
        raise ValueError(
            f"{name}.g_idx assigns groups of {sorted(set(counts.tolist()))} inputs; lowbit's formats hold "
            f"groups of one size (only the last may be smaller), so this layer cannot be read exactly"
        )
    perm = torch.argsort(g_idx, stable=True)
    return g, None if torch.equal(perm, torch.arange(k)) else perm


def load_gptq(path: str | os.PathLike, model: nn.Module | None = None, kernel: str = "auto") -> nn.Module:
    from lowbit.io.native import _skeleton

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    bits = int(qc.get("bits", 4))
    if bits not in PACKABLE_BITS:
        raise ValueError(f"{path}: {bits}-bit GPTQ checkpoints are not supported (2, 4 or 8 bits)")
    offset = 0 if qc.get("checkpoint_format") == "gptq_v2" else 1
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    model = model or _skeleton(path)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    used = set()
    for name in names:
        words, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"].float()
        codes = unpack_int32(words, bits, 0).t().contiguous()  # [N, K]
        n, k = codes.shape
        g_idx = tensors.get(f"{name}.g_idx")
        group, perm = int(qc.get("group_size", -1)), None
        if g_idx is not None:
            group, perm = _groups_from_g_idx(g_idx, name, k, scales.shape[0])
        if perm is not None:  # act-order: store the columns sorted by group, and permute the input to match
            codes = codes[:, perm].contiguous()
        zeros = (unpack_int32(tensors[f"{name}.qzeros"], bits, 1)[:, :n].t().to(torch.int64) + offset).clamp(
            0, (1 << bits) - 1
        )
        mid = 1 << (bits - 1)
        symmetric = bool((zeros == mid).all())
        fmt = WeightFormat("int", bits, group, symmetric)
        qw = QuantizedWeight.from_codes(
            codes, scales.t().contiguous(), None if symmetric else zeros.to(torch.uint8), fmt
        )
        bias = tensors.get(f"{name}.bias")
        set_module(model, name, QLinear(qw, bias.float() if bias is not None else None, kernel, in_perm=perm))
        used.update(f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias"))
    rest = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    quantized = set(names)
    missing = [m for m in missing if m.rpartition(".")[0] not in quantized]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    model.lowbit_source = str(path)
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    out = getattr(model, "get_output_embeddings", lambda: None)()
    return emb is not None and out is not None and emb.weight is out.weight and key.endswith("lm_head.weight")


def checkpoint_coverage(path: str | os.PathLike):
    """Coverage of a GPTQ-layout checkpoint read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    from lowbit.coverage import Coverage, LayerRecord

    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    bits = int(qc.get("bits", 4))
    shapes: dict[str, tuple[list[int], int]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                shapes[key] = (sl.get_shape(), 16 if sl.get_dtype() == "F16" else 32)
    coverage = Coverage()
    in_block = re.compile(r"\.\d+\.")
    for key in sorted(shapes):
        name, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            k, n = shapes[key][0][0] * 32 // bits, shapes[key][0][1]
            stored = sum(
                math.prod(shapes[f"{name}.{p}"][0]) * shapes[f"{name}.{p}"][1]
                for p in ("qweight", "qzeros", "scales")
                if f"{name}.{p}" in shapes
            )
            fmt = WeightFormat("int", bits, int(qc.get("group_size", -1)), bool(qc.get("sym", False)))
            coverage.add(
                LayerRecord(
                    name,
                    "Linear",
                    "quantized",
                    "",
                    bool(in_block.search(name + ".")),
                    fmt.describe(),
                    stored / (k * n),
                    k * n,
                    "gptq layout",
                )  # fmt: skip
            )
        elif leaf == "weight" and len(shapes[key][0]) == 2:
            coverage.add(LayerRecord(name, "tensor", "skipped", "stored unquantized in the checkpoint",
                                     bool(in_block.search(name + "."))))  # fmt: skip
    return coverage
