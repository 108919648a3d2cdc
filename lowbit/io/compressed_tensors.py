"""The compressed-tensors layout (what llm-compressor writes and vLLM serves).

Per quantized linear ``[N, K]`` with ``G`` groups:

- weight-only, and integer activations with sub-8-bit weights (``pack-quantized``):
  ``weight_packed`` int32, the codes of each row as a dense little-endian bit
  stream (the ``compressed_tensors`` package's ``pack_to_int32``);
  ``weight_scale`` ``[N, G]`` in the model's dtype; ``weight_zero_point``
  (asymmetric only) ``[N, G]`` signed, packed along the rows; ``weight_shape``;
- 8-bit weights with integer activations (``int-quantized``, W8A8): ``weight``
  int8 ``[N, K]``, ``weight_scale`` ``[N, G]`` fp32, ``weight_zero_point`` int8
  (asymmetric only);
- integer activations: the config group's ``input_activations`` (per token and
  dynamic, or per tensor, static with ``input_scale`` ``[1]`` fp32 and, if
  asymmetric, ``input_zero_point`` int8, or dynamic).

compressed-tensors' own fake-quantization of *dynamic* symmetric activations
divides the absolute maximum by 127.5; lowbit, and vLLM's int8 kernels, divide
by 127, so transformers' reading of a dynamic W8A8 export differs from lowbit's
by up to about half an activation step. Static scales are written as they are.
What the layout cannot carry is refused, by layer: per-group activation scales
(PEG, RPTQ), input shifts and scales applied inside the layer (SmoothQuant and
OS+ in post-LayerNorm encoders), LLM.int8()'s mixed-precision decomposition, and
act-order layers (a permuted input, from GPTQ ``desc_act`` checkpoints): the
layout's one form for them, ``actorder: group`` with ``weight_g_idx``, has been
removed from compressed-tensors (0.20 rejects the config), so nothing could read it.

Codes and zero points are signed there (``q - 2**(bits-1)``); lowbit's are
unsigned, so both shift by the same offset and ``(q - z) * s`` is unchanged.
``config.json`` holds a ``quantization_config`` with ``quant_method:
compressed-tensors``, ``format: pack-quantized`` and one config group per scheme.
Packing uses the installed ``compressed_tensors`` package, so a checkpoint
matches the version that will read it. Known upstream limit: transformers
5.18+ rejects the packed zero points of *asymmetric* pack-quantized checkpoints
(llm-compressor's own included) with a size mismatch; transformers 5.17 loads them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.formats import integer
from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.io import model_card
from lowbit.io.native import WEIGHTS, atomic_directory, copy_tokenizer, hf_config, plain_state, qlinear_state_keys
from lowbit.models.adapters import is_linear, set_module
from lowbit.nn.qconv import QConv
from lowbit.nn.qlinear import QLinear
from lowbit.nn.w8a8 import W8A8Linear
from lowbit.nn.w8a8conv import W8A8Conv
from lowbit.quantized_weight import QuantizedWeight

READABLE = ("pack-quantized", "int-quantized", "mixed-precision")


def _library():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        raise ImportError(
            "the compressed-tensors layout needs the compressed-tensors package: pip install compressed-tensors"
        ) from None
    return compressed_tensors.__version__, pack_to_int32, unpack_from_int32


def _scheme(fmt: WeightFormat, in_features: int) -> dict:
    grouped = integer.num_groups(in_features, fmt.group_size) > 1
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "group" if grouped else "channel",
        "group_size": fmt.group_size if grouped else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _act_scheme(act) -> dict:
    return {
        "num_bits": act.bits,
        "type": "int",
        "symmetric": act.symmetric,
        "strategy": "token" if act.granularity == "token" else "tensor",
        "group_size": None,
        "dynamic": act.dynamic,
        "actorder": None,
        "observer": None if act.dynamic else "minmax",
        "observer_kwargs": {},
    }


def _act_problem(name: str, m: W8A8Linear) -> str | None:
    if m.perm is not None or m.act.granularity == "group":
        return f"{name}: per-group activation scales (PEG/RPTQ) have no compressed-tensors form"
    if m.input_shift is not None or m.input_scale is not None:
        return (
            f"{name}: applies an input shift/scale itself (a migration no neighbouring layer could absorb); "
            "compressed-tensors cannot carry it"
        )
    if m.outlier_threshold is not None:
        return f"{name}: LLM.int8()'s mixed-precision decomposition has no compressed-tensors form"
    if not m.act.dynamic and not bool(torch.isfinite(m.act_scale).all() and (m.act_scale > 0).all()):
        return f"{name}: NaN, Inf or zero activation scales"
    return None


# transformers architectures whose linears are GPT-2's Conv1D
HF_CONV1D_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


def _layer_problems(name: str, m: QLinear) -> list[str]:
    """Why one quantized linear cannot be written to this layout (nothing if it can)."""
    problems = []
    fmt, k = m.fmt, m.in_features
    if m.has_terms:
        problems.append(f"{name}: terms beside the codes (fp16 outliers, a low-rank or a residual term), which the "
                        "layout has no tensor for (keep lowbit's own checkpoint)")  # fmt: skip
    if fmt.kind != "int":
        problems.append(f"{name}: {fmt.describe()} (only integer weights are written to this layout)")
    elif integer.num_groups(k, fmt.group_size) > 1 and k % fmt.group_size:
        sizes = [d for d in range(8, k) if k % d == 0][-3:]
        fits = f"a group size that divides {k} ({', '.join(map(str, sizes))}), " if sizes else ""
        problems.append(f"{name}: a ragged last group ({k} inputs, group {fmt.group_size}); the layout has none "
                        f"(quantize with {fits}per-channel --group-size -1, or keep it unquantized with "
                        f"--skip '{name}')")  # fmt: skip
    scale = m.scales.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        problems.append(f"{name}: NaN, Inf or zero scales")
    if isinstance(m, W8A8Linear):
        problem = _act_problem(name, m)
        if problem:
            problems.append(problem)
    return problems


def check_exportable(model: nn.Module) -> list[tuple[str, QLinear]]:
    convs = [n for n, m in model.named_modules() if isinstance(m, (QConv, W8A8Conv))]
    if convs:
        raise ValueError(f"compressed-tensors holds linear layers only; these are quantized convs: {', '.join(convs[:5])}"
                         "; save the model in lowbit's native format (lowbit.save)")  # fmt: skip
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers; quantize it before exporting")
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in HF_CONV1D_TYPES:
        raise ValueError(f"compressed-tensors cannot carry {kind}'s linears: transformers stores them as Conv1D "
                         "([in, out]) and its compressed-tensors loader replaces nn.Linear only, so they would load "
                         "with random weights; keep lowbit's native format (lowbit.save / lowbit.load)")  # fmt: skip
    problems = []
    permuted = [name for name, m in layers if m.in_perm is not None]
    if permuted:
        problems.append(f"act-order (permuted input) layers {', '.join(permuted)}: the layout's g_idx form "
                        "(actorder 'group') is no longer read by compressed-tensors; export them to the GPTQ "
                        "layout instead")  # fmt: skip
    problems += [p for name, m in layers for p in _layer_problems(name, m)]
    if problems:
        raise ValueError("cannot write the compressed-tensors layout: " + "; ".join(problems))
    return layers


def _layer_tensors(name: str, m: QLinear, dtype: torch.dtype, pack_to_int32) -> tuple[dict[str, torch.Tensor], dict]:
    """The layout's tensors of one quantized linear, and its scheme."""
    out: dict[str, torch.Tensor] = {}
    qw = m.quantized_weight
    fmt, offset = qw.fmt, 1 << (qw.fmt.bits - 1)
    act = m.act if isinstance(m, W8A8Linear) else None
    layout = "int-quantized" if act is not None and fmt.bits == 8 else "pack-quantized"
    codes = (qw.codes().to(torch.int16) - offset).to(torch.int8)
    zp = (qw.zero_or_default().to(torch.int16) - offset).to(torch.int8)
    if layout == "int-quantized":
        out[f"{name}.weight"] = codes.contiguous()
        out[f"{name}.weight_scale"] = qw.scale.float().contiguous()
        if not fmt.symmetric:
            out[f"{name}.weight_zero_point"] = zp.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_to_int32(codes, fmt.bits).contiguous()
        out[f"{name}.weight_scale"] = qw.scale.to(dtype).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor(qw.shape, dtype=torch.int64)
        if not fmt.symmetric:
            out[f"{name}.weight_zero_point"] = pack_to_int32(zp, fmt.bits, packed_dim=0).contiguous()
    if act is not None and not act.dynamic:
        out[f"{name}.input_scale"] = m.act_scale.float().reshape(1).contiguous()
        if not act.symmetric:  # lowbit's unsigned zero point, in the signed int8 range
            out[f"{name}.input_zero_point"] = (m.act_zero.reshape(1) - 128).to(torch.int8).contiguous()
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().to(dtype).contiguous()
    scheme = {"weights": _scheme(fmt, qw.shape[1]), "input_activations": _act_scheme(act) if act else None,
              "format": layout}  # fmt: skip
    return out, scheme


def _quantization_config(groups: dict[str, dict], ignore: list[str], version: str) -> dict:
    """The ``quantization_config`` of the layout for these config groups and unquantized linears."""
    layouts = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": layouts.pop() if len(layouts) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": {**g, "output_activations": None} for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    version, pack_to_int32, _ = _library()
    layers = check_exportable(model)
    tensors, _ = plain_state(model, qlinear_state_keys(model))  # tied copies are re-tied on load
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    groups: dict[str, dict] = {}
    for name, m in layers:
        layer_tensors, scheme = _layer_tensors(name, m, dtype, pack_to_int32)
        tensors.update(layer_tensors)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], **scheme})["targets"].append(name)
    quantized = {n for n, _ in layers}
    ignore = [n for n, mod in model.named_modules() if is_linear(mod) and n not in quantized]
    qconfig = _quantization_config(groups, ignore, version)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(model)
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_tokenizer(model, tokenizer, tmp)
        model_card.write(model, tmp, layout="compressed-tensors")
    return Path(out_dir)


def _module_group(qc: dict, name: str) -> dict | None:
    """The config group whose targets name module ``name`` (by name, ``re:`` pattern, or ``Linear``)."""
    for group in qc.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if target in (name, "Linear") or (target.startswith("re:") and re.match(target[3:], name)):
                return group
    return None


def _read_weight(tensors: dict, name: str, w: dict, unpack_from_int32) -> QuantizedWeight:
    bits, offset = int(w["num_bits"]), 1 << (int(w["num_bits"]) - 1)
    scale = tensors[f"{name}.weight_scale"].float()
    packed = f"{name}.weight_packed" in tensors
    if packed:
        shape = tuple(int(x) for x in tensors[f"{name}.weight_shape"].tolist())
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, torch.Size(shape)).to(torch.int16) + offset
    else:  # int-quantized: one int8 per weight
        codes = tensors[f"{name}.weight"].to(torch.int16) + offset
    zero = None
    if not w.get("symmetric", True):
        zp = tensors[f"{name}.weight_zero_point"]
        if packed:
            zp = unpack_from_int32(zp, bits, scale.shape, packed_dim=0)
        zero = (zp.reshape(scale.shape).to(torch.int16) + offset).to(torch.uint8)
    group = int(w["group_size"]) if w.get("strategy") == "group" else -1
    fmt = WeightFormat("int", bits, group, bool(w.get("symmetric", True)))
    return QuantizedWeight.from_codes(codes.to(torch.uint8), scale, zero, fmt)


def _read_activations(tensors: dict, name: str, a: dict) -> dict:
    """``W8A8Linear`` arguments for a group's ``input_activations``."""
    if a.get("type") != "int" or a.get("strategy") not in ("token", "tensor"):
        raise ValueError(f"{name}: input activations {a} are not read by lowbit (integer, per token or per tensor)")
    dynamic = bool(a.get("dynamic"))
    fmt = ActFormat(int(a["num_bits"]), a["strategy"], dynamic, bool(a.get("symmetric", True)))
    if dynamic:
        return {"act": fmt}
    zero = tensors.get(f"{name}.input_zero_point")
    zero = zero.float().reshape(1) + 128 if zero is not None else torch.zeros(1)  # signed int8 -> lowbit's unsigned
    return {"act": fmt, "act_scale": tensors[f"{name}.input_scale"].float().reshape(1), "act_zero": zero}


def load_compressed_tensors(path: str | os.PathLike, model: nn.Module | None = None, kernel: str = "auto") -> nn.Module:
    """Read a ``pack-quantized``, ``int-quantized`` or mixed checkpoint (lowbit's or another toolkit's)."""
    from lowbit.io.native import _skeleton

    _, _, unpack_from_int32 = _library()
    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("format") not in READABLE:
        raise ValueError(
            f"{path}: compressed-tensors format {qc.get('format')!r} is not read by lowbit ({', '.join(READABLE)})"
        )
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if model is None:
        model = _skeleton(path)
        if any(re.search(r"\.experts\.\d+\.", k) for k in tensors):  # per-expert layers: transformers fuses them
            from lowbit.models.moe import unfuse_experts

            unfuse_experts(model)
    names = sorted(
        {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
        & {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight_packed", ".weight"))}
    )
    used = set()
    for name in names:
        group = _module_group(qc, name)
        w = (group or {}).get("weights")
        if w is None or w.get("type") != "int" or w.get("actorder"):
            raise ValueError(f"{path}: {name} uses a scheme lowbit does not read ({w})")
        qw = _read_weight(tensors, name, w, unpack_from_int32)
        bias = tensors.get(f"{name}.bias")
        bias = bias.float() if bias is not None else None
        if group.get("input_activations"):
            module = W8A8Linear(qw, bias, **_read_activations(tensors, name, group["input_activations"]))
        else:
            module = QLinear(qw, bias, kernel)
        set_module(model, name, module)
        used.update(f"{name}.{p}" for p in ("weight", "weight_packed", "weight_scale", "weight_shape",
                                            "weight_zero_point", "input_scale", "input_zero_point", "bias"))  # fmt: skip
    rest = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [m for m in missing if m.rpartition(".")[0] not in set(names)]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        if emb is not None and out is not None and emb.weight is out.weight:
            missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    model.lowbit_source = str(path)
    return model


def export_compressed_tensors_streamed(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``export_compressed_tensors`` of a lowbit checkpoint larger than memory: each block is built
    from the checkpoint's files, converted and written to its own shard, then freed; what lies
    outside the blocks is copied tensor by tensor. The same tensors as the in-memory export."""
    from tqdm.auto import tqdm

    from lowbit.io.native import build_layer
    from lowbit.io.onload import INDEX, REST_SHARD_BYTES, StreamedModel

    version, pack_to_int32, _ = _library()
    streamed = StreamedModel(path)
    model, qc = streamed.model, streamed.qc
    layers_info = qc.get("layers", {})
    if not layers_info:
        raise ValueError(f"{path} has no quantized layers; quantize it before exporting")
    kind = getattr(getattr(model, "config", None), "model_type", None)
    convs = [n for n, info in layers_info.items() if info.get("conv")]
    if convs or kind in HF_CONV1D_TYPES:
        raise ValueError(f"compressed-tensors cannot carry {', '.join(convs[:3]) or kind + ' Conv1D linears'}; "
                         "keep lowbit's native format")  # fmt: skip
    groups: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    problems: list[str] = []

    def convert(name: str, m: QLinear, out: dict) -> None:
        if m.in_perm is not None:
            problems.append(f"act-order (permuted input) layers {name}: export it to the GPTQ layout instead")
        problems.extend(_layer_problems(name, m))
        layer_tensors, scheme = _layer_tensors(name, m, torch.float32, pack_to_int32)
        out.update(layer_tensors)
        groups.setdefault(json.dumps(scheme, sort_keys=True), {"targets": [], **scheme})["targets"].append(name)

    def shard(tmp: Path, tensors: dict) -> None:
        if tensors:
            name = f"model-{len(set(weight_map.values())):05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))

    with atomic_directory(out_dir) as tmp:
        for block_name in tqdm(streamed.blocks, desc="export", unit="block"):
            streamed.load_block(block_name)
            tensors, _ = plain_state(model, qlinear_state_keys(model, [block_name]), [block_name])
            for name, m in model.get_submodule(block_name).named_modules(prefix=block_name):
                if isinstance(m, QLinear):
                    convert(name, m, tensors)
            if problems:
                raise ValueError("cannot write the compressed-tensors layout: " + "; ".join(problems))
            shard(tmp, tensors)
            streamed.free_block(block_name)
        inside = tuple(n + "." for n in streamed.blocks)
        seen: set[int] = set()
        batch: dict[str, torch.Tensor] = {}
        for key, t in model.state_dict(keep_vars=True).items():
            owner = key.rpartition(".")[0]
            if key.startswith(inside) or id(t) in seen:  # tied copies are re-tied on load
                continue
            seen.add(id(t))
            if owner in layers_info:  # a quantized layer outside the blocks (an output projection)
                if f"{owner}.weight_scale" not in batch:
                    convert(owner, build_layer(streamed.tensors, owner, layers_info[owner]), batch)
                continue
            batch[key] = streamed._read(key, t).cpu().contiguous() if t.device.type == "meta" else t.detach()
            if sum(v.nbytes for v in batch.values()) >= REST_SHARD_BYTES:
                shard(tmp, batch)
                batch = {}
        if problems:
            raise ValueError("cannot write the compressed-tensors layout: " + "; ".join(problems))
        shard(tmp, batch)
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        ignore = [n for n, mod in model.named_modules() if is_linear(mod) and n not in layers_info]
        config = hf_config(model)
        config["quantization_config"] = _quantization_config(groups, ignore, version)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_tokenizer(model, None, tmp)
        model_card.write(model, tmp, layout="compressed-tensors")
    return Path(out_dir)
