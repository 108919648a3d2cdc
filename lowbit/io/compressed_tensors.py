"""The compressed-tensors layout (what llm-compressor writes and vLLM serves), weight-only integers.

Per quantized linear ``[N, K]`` with ``G`` groups:

- ``weight_packed`` int32: the codes of each row as a dense little-endian bit
  stream (the ``compressed_tensors`` package's ``pack_to_int32``);
- ``weight_scale`` ``[N, G]`` in the model's dtype; ``weight_zero_point``
  (asymmetric only) ``[N, G]`` signed, packed along the rows; ``weight_shape``.

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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.formats import integer
from lowbit.formats.spec import WeightFormat
from lowbit.io.native import WEIGHTS, atomic_directory, copy_tokenizer, hf_config, plain_state, qlinear_state_keys
from lowbit.models.adapters import is_linear, set_module
from lowbit.nn.qlinear import QLinear
from lowbit.quantized_weight import QuantizedWeight


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


def check_exportable(model: nn.Module) -> list[tuple[str, QLinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers; quantize it before exporting")
    problems = []
    for name, m in layers:
        fmt, k = m.fmt, m.in_features
        if fmt.kind != "int":
            problems.append(f"{name}: {fmt.describe()} (only integer weights are written to this layout)")
        elif integer.num_groups(k, fmt.group_size) > 1 and k % fmt.group_size:
            problems.append(f"{name}: a ragged last group ({k} inputs, group {fmt.group_size}); the layout has none")
        scale = m.scales.float()
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            problems.append(f"{name}: NaN, Inf or zero scales")
    if problems:
        raise ValueError("cannot write the compressed-tensors layout: " + "; ".join(problems))
    return layers


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    version, pack_to_int32, _ = _library()
    layers = check_exportable(model)
    tensors, _ = plain_state(model, qlinear_state_keys(model))  # tied copies are re-tied on load
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    groups: dict[str, dict] = {}
    for name, m in layers:
        qw = m.quantized_weight
        fmt, offset = qw.fmt, 1 << (qw.fmt.bits - 1)
        codes = (qw.codes().to(torch.int16) - offset).to(torch.int8)
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes, fmt.bits).contiguous()
        tensors[f"{name}.weight_scale"] = qw.scale.to(dtype).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(qw.shape, dtype=torch.int64)
        if not fmt.symmetric:
            zp = (qw.zero_or_default().to(torch.int16) - offset).to(torch.int8)
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(zp, fmt.bits, packed_dim=0).contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(dtype).contiguous()
        key = json.dumps(_scheme(fmt, qw.shape[1]), sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": json.loads(key)})["targets"].append(name)
    quantized = {n for n, _ in layers}
    ignore = [n for n, mod in model.named_modules() if is_linear(mod) and n not in quantized]
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {**g, "format": "pack-quantized", "input_activations": None, "output_activations": None}
            for i, g in enumerate(groups.values())
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(model)
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_tokenizer(model, tokenizer, tmp)
    return Path(out_dir)


def _module_scheme(qc: dict, name: str) -> dict | None:
    for group in qc.get("config_groups", {}).values():
        targets = group.get("targets", [])
        if name in targets or "Linear" in targets:
            return group.get("weights")
    return None


def load_compressed_tensors(path: str | os.PathLike, model: nn.Module | None = None, kernel: str = "auto") -> nn.Module:
    """Read a weight-only ``pack-quantized`` checkpoint (lowbit's or another toolkit's)."""
    from lowbit.io.native import _skeleton

    _, _, unpack_from_int32 = _library()
    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("format") != "pack-quantized":
        raise ValueError(
            f"{path}: compressed-tensors format {qc.get('format')!r} is not read by lowbit (pack-quantized)"
        )
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    model = model or _skeleton(path)
    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    used = set()
    for name in names:
        w = _module_scheme(qc, name)
        if w is None or w.get("type") != "int" or w.get("actorder"):
            raise ValueError(f"{path}: {name} uses a scheme lowbit does not read ({w})")
        bits, offset = int(w["num_bits"]), 1 << (int(w["num_bits"]) - 1)
        shape = tuple(int(x) for x in tensors[f"{name}.weight_shape"].tolist())
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, torch.Size(shape)).to(torch.int16) + offset
        scale = tensors[f"{name}.weight_scale"].float()
        zero = None
        if not w.get("symmetric", True):
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits, scale.shape, packed_dim=0)
            zero = (zp.to(torch.int16) + offset).to(torch.uint8)
        group = int(w["group_size"]) if w.get("strategy") == "group" else -1
        fmt = WeightFormat("int", bits, group, bool(w.get("symmetric", True)))
        qw = QuantizedWeight.from_codes(codes.to(torch.uint8), scale, zero, fmt)
        bias = tensors.get(f"{name}.bias")
        set_module(model, name, QLinear(qw, bias.float() if bias is not None else None, kernel))
        used.update(
            f"{name}.{p}" for p in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "bias")
        )
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
