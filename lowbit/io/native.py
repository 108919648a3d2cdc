"""lowbit's native checkpoint: ``model.safetensors`` + ``config.json`` with a ``quantization_config``.

Writes go to a hidden temporary directory beside the target that is renamed into
place only when complete, so an interrupted save never leaves a directory that
loads as a model. Loading reads safetensors and JSON only; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.coverage import Coverage
from lowbit.files import make_ordinary
from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.io import model_card
from lowbit.models.adapters import set_module
from lowbit.models.loading import build_skeleton, skeleton_config
from lowbit.nn.qconv import QConv
from lowbit.nn.qlinear import QLinear
from lowbit.nn.qmodule import QSite
from lowbit.nn.quantizers import ActQuantizer
from lowbit.nn.w8a8 import W8A8Linear
from lowbit.nn.w8a8conv import W8A8Conv
from lowbit.quantized_weight import QuantizedWeight

QUANT_METHOD = "lowbit"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint (an onloaded run writes one shard per unit)
# the W8A8Linear buffers a checkpoint carries, by their names on the module
ACT_BUFFERS = ("scale", "zero", "perm", "bounds", "input_shift", "input_scale", "token_bits")
W8A8_BUFFERS = ("act_scale", "act_zero", "act_bounds", "perm", "input_shift", "input_scale")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "generation_config.json", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} exists and is not empty; choose a new path or empty it")


def _roots(model: nn.Module, tops: list[str] | None) -> list[tuple[str, nn.Module]]:
    """``(prefix, module)`` of the parts to walk: the whole model, or the modules named ``tops``."""
    return [("", model)] if not tops else [(f"{t}.", model.get_submodule(t)) for t in tops]


def plain_state(model: nn.Module, exclude: set[str], tops: list[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """The model's state (or that of its modules ``tops``) except the keys in ``exclude``, with
    tied tensors written once.

    Returns the tensors and ``{alias: source}`` for the tied ones.
    """
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    state = {k: v for prefix, root in _roots(model, tops) for k, v in root.state_dict(prefix=prefix).items()}
    for key, t in state.items():
        if key in exclude:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, tied


def _named_modules(model: nn.Module, tops: list[str] | None):
    for prefix, root in _roots(model, tops):
        yield from root.named_modules(prefix=prefix.rstrip("."))


def qlinear_state_keys(model: nn.Module, tops: list[str] | None = None) -> set[str]:
    """State keys of the packed layers (written from their ``QuantizedWeight`` instead)."""
    keys = set()
    for name, mod in _named_modules(model, tops):
        if isinstance(mod, (QLinear, QConv)):
            keys.update(f"{name}.{k}" for k, _ in mod.named_parameters(recurse=False))
            keys.update(f"{name}.{k}" for k, _ in mod.named_buffers(recurse=False))
    return keys


def collect(model: nn.Module, tops: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Tensors to write, the quantized layers' descriptions, and tied aliases (of the whole model,
    or of its modules ``tops``)."""
    tensors, tied = plain_state(model, qlinear_state_keys(model, tops), tops)
    layers = {}
    for name, mod in _named_modules(model, tops):
        if isinstance(mod, QLinear):
            qw = mod.quantized_weight
            tensors.update({k: v.contiguous() for k, v in qw.to_tensors(name).items()})
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            layers[name] = {"format": qw.fmt.to_dict(), "shape": list(qw.shape), "bias": mod.bias is not None}
            if mod.in_perm is not None:  # act-order: the codes are stored in this input order
                tensors[f"{name}.in_perm"] = mod.in_perm.detach().cpu().contiguous()
                layers[name]["in_perm"] = True
            if isinstance(mod, W8A8Linear):
                layers[name]["act"] = {**mod.act.to_dict(), "outlier_threshold": mod.outlier_threshold}
                for extra in W8A8_BUFFERS:
                    if getattr(mod, extra) is not None:
                        tensors[f"{name}.{extra}"] = getattr(mod, extra).detach().cpu().reshape(-1).contiguous()
            if isinstance(mod, W8A8Conv):
                layers[name].update(shape=list(mod.weight_shape), conv=mod.conv_config())
        elif isinstance(mod, QConv):
            qw = mod.quantized_weight
            tensors.update({k: v.contiguous() for k, v in qw.to_tensors(name).items()})
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            layers[name] = {"format": qw.fmt.to_dict(), "shape": list(qw.shape), "bias": mod.bias is not None,
                            "conv": mod.conv_config()}  # fmt: skip
    return tensors, layers, tied


def _structure(model: nn.Module) -> dict:
    """How the quantized model's structure differs from its architecture's: activation sites, and
    what preparation replaced (folded BatchNorms, explicit attention)."""
    from lowbit.models.attention import ExplicitEncoderLayer, ExplicitMultiheadAttention
    from lowbit.models.hf_vit import ExplicitHFAttention, ExplicitHFLayer
    from lowbit.models.moe import Experts, expert_names

    explicit = (ExplicitEncoderLayer, ExplicitMultiheadAttention, ExplicitHFAttention, ExplicitHFLayer)
    return {
        "sites": {n: m.to_config() for n, m in model.named_modules() if isinstance(m, QSite)},
        "identity": [n for n, m in model.named_modules() if isinstance(m, nn.Identity) and n],
        "explicit_attention": any(isinstance(m, explicit) for m in model.modules()),
        "unfused_experts": {n: expert_names(m) for n, m in model.named_modules() if isinstance(m, Experts)},
    }


@contextmanager
def atomic_directory(out_dir: str | os.PathLike):
    """Yield a hidden temporary directory beside ``out_dir``; rename it into place only on success."""
    out = Path(out_dir)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        make_ordinary(tmp)
        try:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError:  # another process put a directory there meanwhile: keep its, write nothing
            raise FileExistsError(f"{out} was written by another process while this one ran; nothing of this "
                                  "run was written") from None  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hf_config(model: nn.Module) -> dict:
    config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    if config:
        config["architectures"] = [type(model).__name__]
        config.pop("quantization_config", None)
    return config


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (quantized or not) to ``out_dir`` atomically; returns the path."""
    with atomic_directory(out_dir) as tmp:
        tensors, layers, tied = collect(model)
        # a single metadata key: safetensors writes metadata in hash order, and same input must give same bytes
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(model) or skeleton_config(model) or {}
        coverage = getattr(model, "lowbit_coverage", None)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "recipe": getattr(model, "lowbit_recipe", []),
            "family": getattr(model, "lowbit_family", None),
            "layers": layers,
            "structure": _structure(model),
            "tied": tied,
            "coverage": coverage.to_dict() if coverage else None,
            "provenance": getattr(model, "lowbit_provenance", None),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_tokenizer(model, tokenizer, tmp)
        model_card.write(model, tmp)
    return Path(out_dir)


def copy_tokenizer(model: nn.Module, tokenizer, dest: Path) -> None:
    """The tokenizer beside the weights: ``save_pretrained``'s files, and every tokenizer file of
    the source directory it did not write (a fast tokenizer drops SentencePiece's
    ``tokenizer.model``, which GGUF export needs)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    source = getattr(model, "lowbit_source", None)
    if source and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists() and not (dest / name).exists():
                shutil.copy2(Path(source) / name, dest / name)


def read_quantization_config(path: str | os.PathLike) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a model directory?")
    return json.loads(cfg_path.read_text()).get("quantization_config") or {}


def _skeleton(path: Path) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from lowbit.models.loading import is_causal_lm

    config = AutoConfig.from_pretrained(str(path))
    # the class that wrote the checkpoint (a classification head included), else the auto class
    named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])[:1]]
    if named and named[0] is not None and hasattr(named[0], "_from_config"):
        return named[0]._from_config(config, dtype=torch.float32)
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    return cls.from_config(config, dtype=torch.float32)


def _restore_structure(model: nn.Module, structure: dict, tensors: dict) -> set[str]:
    """Put back what preparation and wrapping changed, and the activation quantizers' parameters;
    returns the tensor keys used."""
    from lowbit.models.attention import make_explicit

    if structure.get("explicit_attention"):
        make_explicit(model)
    if structure.get("unfused_experts"):
        from lowbit.models.moe import unfuse

        for name, names in structure["unfused_experts"].items():
            set_module(model, name, unfuse(model.get_submodule(name), names))
    for name in structure.get("identity", []):
        set_module(model, name, nn.Identity())
    for name, cfg in structure.get("sites", {}).items():
        set_module(model, name, QSite.from_config(model.get_submodule(name), cfg))
    used = set()
    for qname, q in model.named_modules():
        if isinstance(q, ActQuantizer):
            for buf in ACT_BUFFERS:
                key = f"{qname}.{buf}"
                if key in tensors:
                    setattr(q, buf, tensors[key])
                    used.add(key)
            if q.static and q.scale is None:
                raise ValueError(f"{qname}: the checkpoint holds no activation scale for this static quantizer")
    return used


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: ``model.safetensors``, or the shards its index names (what an
    onloaded run writes, one per unit)."""
    if (path / WEIGHTS).exists():
        return load_file(str(path / WEIGHTS))
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        if "/" in name or not (path / name).exists():
            raise FileNotFoundError(f"{path}: the shard {name} named in {INDEX} is missing")
        tensors.update(load_file(str(path / name)))
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise ValueError(f"{path}: {len(absent)} tensors named in {INDEX} are in no shard (e.g. {absent[0]})")
    return tensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with the directory and the problem."""


def load(path: str | os.PathLike, model: nn.Module | None = None, kernel: str = "auto") -> nn.Module:
    """Load a lowbit checkpoint, or a GPTQ-layout or compressed-tensors one another toolkit wrote.

    Transformers models are rebuilt from ``config.json``; any other module needs
    its unquantized skeleton passed as ``model``. A broken checkpoint (a truncated or
    corrupted file, a tensor missing or of the wrong shape, a config that is not JSON,
    NaN, Inf or zero scales) raises one ``CheckpointError`` naming the directory and the problem."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    try:
        loaded = _load(path, model, kernel)
    except (CheckpointError, FileNotFoundError, ImportError):
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, OSError, SafetensorError) as e:
        what = str(e).replace(str(path), "").strip(" :") or type(e).__name__
        raise CheckpointError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {what})") from e
    for name, m in loaded.named_modules():
        qw = getattr(m, "quantized_weight", None)
        if isinstance(qw, QuantizedWeight):
            scale = qw.scale.float()
            # codebooks and binary coding may hold 0 (an entry, an alpha or an offset); a scale may not
            if not bool(torch.isfinite(scale).all()) or (
                qw.fmt.kind not in ("lut", "vq", "bcq") and bool((scale == 0).any())
            ):
                raise CheckpointError(f"{path}: {name} holds NaN, Inf or zero scales; the file is corrupted")
    return loaded


def build_layer(tensors, name: str, info: dict, kernel: str = "auto", path: Path | None = None) -> nn.Module:
    """The packed module of quantized layer ``name`` from its tensors and its ``layers`` entry."""
    fmt = WeightFormat.from_dict(info["format"])
    qw = QuantizedWeight.from_tensors(tensors, name, fmt, tuple(info["shape"]))
    bias = tensors.get(f"{name}.bias") if info.get("bias") else None
    act = info.get("act")
    if info.get("conv"):
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in info["conv"].items()}
        if act:
            module = W8A8Conv(qw, bias, ActFormat.from_dict(act), act_scale=tensors.get(f"{name}.act_scale"),
                              act_zero=tensors.get(f"{name}.act_zero"), **c)  # fmt: skip
        else:
            module = QConv(qw, bias, **c)
    elif act:
        if "dynamic" not in act:  # written before static activations had their own flag
            act = {**act, "dynamic": act.get("granularity") == "token"}
        extras = {k: tensors.get(f"{name}.{k}") for k in W8A8_BUFFERS}
        module = W8A8Linear(qw, bias, ActFormat.from_dict(act), outlier_threshold=act.get("outlier_threshold"),
                            **extras)  # fmt: skip
    else:
        in_perm = tensors.get(f"{name}.in_perm")
        if info.get("in_perm") and in_perm is None:
            raise ValueError(f"{path}: {name} is an act-order layer but its {name}.in_perm is missing")
        module = QLinear(qw, bias, kernel, in_perm=in_perm)
    return module


def _load(path: Path, model: nn.Module | None, kernel: str) -> nn.Module:
    qc = read_quantization_config(path)
    if qc.get("quant_method") == "gptq":
        from lowbit.io.gptq_layout import load_gptq

        return load_gptq(path, model, kernel)
    if qc.get("quant_method") == "compressed-tensors":
        from lowbit.io.compressed_tensors import load_compressed_tensors

        return load_compressed_tensors(path, model, kernel)
    if not (path / WEIGHTS).exists() and not (path / INDEX).exists():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS}; is it a lowbit checkpoint directory?")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} is not a lowbit checkpoint (quant_method={qc.get('quant_method')!r})")
    if model is None:
        config = json.loads((path / "config.json").read_text())
        model = build_skeleton(config)
        if model is None:
            if "model_type" not in config:
                raise ValueError(f"{path} holds a model lowbit cannot rebuild by itself; pass its skeleton as model=")
            model = _skeleton(path)
    tensors = read_weights(path)
    used = _restore_structure(model, qc.get("structure") or {}, tensors)
    for name, info in qc.get("layers", {}).items():
        set_module(model, name, build_layer(tensors, name, info, kernel, path))
        used.update(k for k in tensors if k.startswith(name + ".") and k.count(".") == name.count(".") + 1)
    rest = {k: v for k, v in tensors.items() if k not in used}
    for alias, source in qc.get("tied", {}).items():
        rest.setdefault(alias, tensors[source])
    missing, unexpected = model.load_state_dict(rest, strict=False)
    quantized = set(qc.get("layers", {}))
    missing = [k for k in missing if k not in used and k.rpartition(".")[0] not in quantized]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    model.lowbit_family = qc.get("family")
    if qc.get("coverage"):
        model.lowbit_coverage = Coverage.from_dict(qc["coverage"])
    model.lowbit_recipe = qc.get("recipe", [])
    model.lowbit_provenance = qc.get("provenance")
    model.lowbit_source = str(path)
    return model
