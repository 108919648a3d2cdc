"""The bitsandbytes 4-bit layout (what transformers writes for ``load_in_4bit`` models, and loads).

Per quantized linear ``[N, K]``, its ``N * K`` weights flattened row by row and cut into
blocks of ``B`` (bitsandbytes reads ``B`` of 32, 64, ..., 4096):

- ``weight`` uint8 ``[N * K / 2, 1]``: two codes a byte, the earlier weight in the high nibble;
- ``weight.absmax`` fp32 ``[N * K / B]``: each block's multiplier, ``w = quant_map[code] * absmax``;
- ``weight.quant_map`` fp32 ``[16]``: the value of each code, the largest magnitude 1;
- ``weight.quant_state.bitsandbytes__nf4`` uint8: the bytes of the JSON object
  ``{"quant_type": "nf4", "blocksize": B, "dtype": "float32", "shape": [N, K]}``.

``config.json`` carries ``quantization_config`` with ``quant_method: bitsandbytes``,
``load_in_4bit``, ``bnb_4bit_quant_type: nf4`` and, in ``llm_int8_skip_modules``, every
linear left unquantized (transformers would otherwise turn them into 4-bit layers too).

The export is exact: what transformers + bitsandbytes load computes with lowbit's weights.

- NF4's 16 levels are bitsandbytes' table, in the same code order, largest 1: the codes go
  over unchanged and ``absmax`` is lowbit's scale. bitsandbytes' kernels read that fixed
  table (not the stored ``quant_map``), so the levels must be exactly QLoRA's, and are.
- lowbit's groups run along each row; when the group size divides ``K``, row ``n``'s group
  ``j`` is flattened block ``n * K / B + j``, so ``absmax`` is the ``[N, K / B]`` scales
  read row by row. A ragged last group has no such block and is refused.
- Double-quantized scales (``formats.double``) sit on a log2 grid that bitsandbytes' nested
  quantization (8-bit blockwise codes of ``absmax - mean``) cannot represent; they are
  written decoded, as fp32 ``absmax`` without nesting (``bnb_4bit_use_double_quant:
  false``): 32 bits per block where lowbit stores about 8.
- bitsandbytes' ``fp4`` is not E2M1: its levels are ``{0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3,
  1}`` of the absmax, where E2M1 (lowbit's fp4) has ``1/12`` and no ``1/192``; lowbit's fp4
  layers are refused, since no absmax maps one grid onto the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.formats import integer
from lowbit.formats.floating import NF4_LEVELS
from lowbit.io import model_card
from lowbit.io.native import (
    WEIGHTS,
    _structure,
    atomic_directory,
    copy_tokenizer,
    hf_config,
    plain_state,
    qlinear_state_keys,
)
from lowbit.models.adapters import is_linear
from lowbit.nn.qconv import QConv
from lowbit.nn.qlinear import QLinear
from lowbit.nn.w8a8conv import W8A8Conv

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
# transformers architectures whose linears are GPT-2's Conv1D ([in, out] weights)
HF_CONV1D_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


def blocksize(name: str, m: QLinear) -> tuple[int | None, str | None]:
    """The bitsandbytes block size of a layer's groups, or why there is none."""
    k, g = m.in_features, m.fmt.group_size
    if g is None:
        return None, f"{name}: one scale for the whole tensor; bitsandbytes' blocks hold at most {BLOCKSIZES[-1]}"
    b = integer.effective_group_size(k, g)
    fits = [s for s in BLOCKSIZES if k % s == 0]
    if fits:
        way_out = f"quantize with --group-size {fits[-1] if b > fits[-1] else fits[0]}, or keep it unquantized"
    else:
        way_out = f"no block size bitsandbytes reads divides {k}: keep the layer unquantized"
    way_out += f" with --skip '{name}'"
    if k % b:
        return None, (f"{name}: a ragged last group ({k} inputs, group {b}); bitsandbytes' blocks tile the "
                      f"flattened weight, so a group must divide the row ({way_out})")  # fmt: skip
    if b not in BLOCKSIZES:
        what = "per-channel groups" if b == k else "groups"
        return None, (f"{name}: {what} of {b} inputs; bitsandbytes reads blocks of "
                      f"{', '.join(map(str, BLOCKSIZES))} ({way_out})")  # fmt: skip
    return b, None


def _layer_problems(name: str, m: QLinear) -> list[str]:
    """Why one quantized linear cannot be written to this layout (nothing if it can)."""
    fmt = m.fmt
    if hasattr(m, "act"):  # a W8A8Linear
        return [(f"{name}: integer activations ({m.act.describe()}); bitsandbytes' 4-bit layout is weight-only, "
                 "export W8A8 models as compressed-tensors")]  # fmt: skip
    if fmt.kind == "fp4":
        return [(f"{name}: fp4 (E2M1), whose level 1/12 of the absmax bitsandbytes' fp4 table lacks (its fp4 is "
                 "not E2M1); quantize with --format nf4, or keep lowbit's own checkpoint")]  # fmt: skip
    if fmt.kind != "nf4":
        return [(f"{name}: {fmt.describe()} (bitsandbytes' 4-bit layout holds nf4 codes; export integer weights "
                 "with --format compressed-tensors, gptq or gguf)")]  # fmt: skip
    problems = []
    if m.has_terms:
        problems.append(f"{name}: terms beside the codes (fp16 outliers, a low-rank or a residual term), which the "
                        "layout has no tensor for (keep lowbit's own checkpoint)")  # fmt: skip
    if m.in_perm is not None:
        problems.append(f"{name}: an act-order layer (permuted input), which bitsandbytes cannot apply")
    _, problem = blocksize(name, m)
    if problem:
        problems.append(problem)
    if not bool(torch.isfinite(m.scales.float()).all()):
        problems.append(f"{name}: NaN or Inf scales")
    return problems


def check_exportable(model: nn.Module) -> list[tuple[str, QLinear]]:
    """The quantized layers, or an error naming every one that cannot be written."""
    convs = [n for n, m in model.named_modules() if isinstance(m, (QConv, W8A8Conv))]
    if convs:
        raise ValueError(f"bitsandbytes' 4-bit layout holds linear layers only; these are quantized convs: "
                         f"{', '.join(convs[:5])}; save the model in lowbit's native format (lowbit.save)")  # fmt: skip
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers; quantize it (--method nf4) before exporting")
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in HF_CONV1D_TYPES:
        raise ValueError(f"bitsandbytes' layout is not written for {kind}: transformers stores its linears as "
                         "Conv1D ([in, out]); keep lowbit's native format (lowbit.save / lowbit.load)")  # fmt: skip
    changed = {k: v for k, v in _structure(model).items() if v}
    if changed:
        raise ValueError(f"quantization changed the model's structure ({', '.join(changed)}: activation quantizers, "
                         "folded or rewritten modules); transformers would load the original architecture, so "
                         "export the weights of a weight-only quantization")  # fmt: skip
    problems = [p for name, m in layers for p in _layer_problems(name, m)]
    if problems:
        raise ValueError("cannot write bitsandbytes' 4-bit layout: " + "; ".join(problems))
    return layers


def layer_tensors(name: str, m: QLinear) -> dict[str, torch.Tensor]:
    """The layout's tensors of one nf4 linear (its bias aside)."""
    qw = m.quantized_weight
    n, k = qw.shape
    b, _ = blocksize(name, m)
    flat = qw.codes().reshape(-1)  # [N * K], row by row: bitsandbytes' order
    packed = (flat[0::2] << 4) | flat[1::2]
    absmax = qw.scale.float().reshape(-1)  # [N, K / B] row by row = block order; nf4's largest level is 1
    state = json.dumps({"quant_type": "nf4", "blocksize": b, "dtype": "float32", "shape": [n, k]}).encode()
    return {
        f"{name}.weight": packed.to(torch.uint8).reshape(-1, 1).contiguous(),
        f"{name}.weight.absmax": absmax.contiguous(),
        f"{name}.weight.quant_map": torch.tensor(NF4_LEVELS, dtype=torch.float32),
        f"{name}.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(state), dtype=torch.uint8),
    }


def quantization_config(skip: list[str]) -> dict:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def export_bnb(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model``'s nf4 layers in bitsandbytes' 4-bit layout, its other tensors as they are."""
    layers = check_exportable(model)
    tensors, _ = plain_state(model, qlinear_state_keys(model))  # tied copies are re-tied on load
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    for name, m in layers:
        tensors.update(layer_tensors(name, m))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(dtype).contiguous()
    quantized = {n for n, _ in layers}
    skip = [n for n, mod in model.named_modules() if is_linear(mod) and n not in quantized]
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(model)
        config["quantization_config"] = quantization_config(skip)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_tokenizer(model, tokenizer, tmp)
        model_card.write(model, tmp, layout="bitsandbytes")
    return Path(out_dir)
