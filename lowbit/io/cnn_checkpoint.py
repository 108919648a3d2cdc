"""The native checkpoint of a quantized CIFAR ResNet: safetensors + ``config.json``.

Each quantized conv/linear is stored as its integer codes (uint8), per-channel fp32
scale and zero point and its (BatchNorm-folded) bias; each activation quantizer as
its scale and zero point. Loading rebuilds the architecture from ``depth``, swaps in
the same quantized modules and recomputes the weights as ``(codes - zero) * scale``,
whose nearest rounding gives back exactly the stored codes: the reloaded model
computes what the quantized one did. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.io.native import atomic_directory
from lowbit.models.adapters import set_module
from lowbit.nn.fakequant import ActQuantizer, ActSite, QuantLayer

FORMAT = "lowbit-cnn"


def save_cnn(model: nn.Module, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``model`` (a ResNetCifar after ``quantize_cnn``) to ``out_dir``."""
    from lowbit.models.resnet_cifar import ResNetCifar

    if not isinstance(model, ResNetCifar):
        raise ValueError(f"the CNN checkpoint stores CIFAR ResNets, not {type(model).__name__}")
    tensors, layers, acts = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            codes = m.codes()
            if not (torch.isfinite(m.scale).all() and (m.scale > 0).all()):
                raise ValueError(f"{name}: NaN, Inf or zero weight scales")
            tensors[f"{name}.codes"] = codes.to(torch.uint8).contiguous()
            tensors[f"{name}.scale"] = m.scale.float().contiguous()
            tensors[f"{name}.zero"] = m.zero.float().contiguous()
            tensors[f"{name}.bias"] = m.bias.detach().float().contiguous()
            layers[name] = {"bits": m.bits, "kind": m.kind, "rounding": m.rounding,
                            "input_quant": m.input_quant is not None}  # fmt: skip
        elif isinstance(m, ActQuantizer):
            if not m.enabled:
                raise ValueError(f"{name}: activation quantizer was never calibrated")
            tensors[f"{name}.scale"] = m.scale.detach().float().reshape(1).contiguous()
            tensors[f"{name}.zero"] = m.zero.detach().float().reshape(1).contiguous()
            acts[name] = {"bits": m.bits, "observer": m.observer, "signed": m.signed}
    sites = [n for n, m in model.named_modules() if isinstance(m, ActSite)]
    config = {
        "architecture": "resnet_cifar",
        "depth": model.depth,
        "num_classes": model.num_classes,
        "quantization_config": {"quant_method": FORMAT, "layers": layers, "activations": acts,
                                "act_sites": sites, **(meta or {})},  # fmt: skip
    }
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def is_cnn_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def load_cnn(path: str | os.PathLike) -> nn.Module:
    from lowbit.models.resnet_cifar import ResNetCifar

    path = Path(path)
    if not is_cnn_checkpoint(path):
        raise ValueError(f"{path} is not a lowbit CNN checkpoint (no quant_method {FORMAT!r} in config.json)")
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    tensors = load_file(str(path / "model.safetensors"))
    model = ResNetCifar(int(config["depth"]), int(config.get("num_classes", 10)))
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            set_module(model, name, nn.Identity())  # folded into the convs before quantization
    for name in qc["act_sites"]:
        site_quant = ActQuantizer(qc["activations"][f"{name}.quant"]["bits"])
        set_module(model, name, ActSite(model.get_submodule(name), site_quant))
    for name, info in qc["layers"].items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d) and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_channels))
        try:
            codes, scale, zero = tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.zero"]
        except KeyError as e:
            raise ValueError(f"{path}: {name} has no {e.args[0]}") from None
        with torch.no_grad():
            layer.weight.copy_((codes.float() - zero) * scale)
            layer.bias.copy_(tensors[f"{name}.bias"])
        inq = ActQuantizer(qc["activations"][f"{name}.input_quant"]["bits"]) if info["input_quant"] else None
        q = QuantLayer(layer, int(info["bits"]), search=False, input_quant=inq)
        q.scale.copy_(scale)
        q.zero.copy_(zero)
        set_module(model, name, q)
        if not torch.equal(q.codes(), codes.float()):
            raise ValueError(f"{path}: {name}'s codes do not reproduce; the checkpoint is damaged")
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            info = qc["activations"][name]
            m.scale = tensors[f"{name}.scale"].reshape(())
            m.zero = tensors[f"{name}.zero"].reshape(())
            m.signed, m.observer, m.enabled = bool(info["signed"]), info["observer"], True
    model.lowbit_source = str(path)
    return model.eval()
