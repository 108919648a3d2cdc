"""The small CIFAR-10 Vision Transformer of ``shared/assets/vit_cifar`` (Dosovitskiy et al. 2021, scaled down).

4x4 patches of a 32x32 image become 64 tokens of width 128, a learned class
token is put in front, a learned position embedding is added, six post-norm
``nn.TransformerEncoderLayer``s run on the 65 tokens, and a LayerNorm + Linear
head reads the class token. Module names follow the checkpoint's keys, so its
state dict loads with ``strict=True``.

The encoder layers are PyTorch's own, so the model is what was trained; the
quantization adapter calls ``lowbit.models.attention.make_explicit`` to give
every op inside attention its own module.

Checkpoints are read with ``torch.load(weights_only=True)`` only: PyTorch's
restricted unpickler, which cannot run code a full unpickle could.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

# The checkpoint was trained on inputs normalised with these CIFAR-10 statistics.
NORMALIZE: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.4914, 0.4822, 0.4465),
    (0.2023, 0.1994, 0.2010),
)

ARCHITECTURE = "vit_cifar"
SUFFIXES = (".pth", ".pt")
PROBE_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "mlp_head.1.weight")
LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.")


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches, each projected to ``dim`` by one strided conv."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W] -> [N, (H/p)*(W/p), dim]
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
    """The encoder layers in order; a plain loop rather than ``nn.TransformerEncoder``, whose
    nested-tensor fast path and mask checks would stand between the layers and their hooks."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, dim]
        for layer in self.layers:
            x = layer(x)
        return x


class ViTCifar(nn.Module):
    """ViT for ``image_size``-square images: class token + ``(image_size / patch)²`` patch tokens.

    ``dropout`` only acts in training mode; the checkpoint does not record the
    rate it was trained with, so it defaults to none.
    """

    def __init__(
        self,
        dim: int = 128,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 256,
        patch: int = 4,
        image_size: int = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}; patches must tile the image")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.config = {
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_dim": mlp_dim,
            "patch": patch,
            "image_size": image_size,
            "in_chans": in_chans,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        self.image_size = image_size
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        layer = {"d_model": dim, "nhead": heads, "dim_feedforward": mlp_dim, "dropout": dropout, "activation": "relu"}
        self.transformer = Encoder(
            [nn.TransformerEncoderLayer(**layer, batch_first=True, norm_first=False) for _ in range(depth)]
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W], normalised -> logits [N, classes]
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViTCifar takes [N, C, {self.image_size}, {self.image_size}] images; got shape {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x)  # [N, P, dim]
        cls = self.cls_token.expand(len(tokens), -1, -1)  # [N, 1, dim]
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed  # [N, P + 1, dim]
        tokens = self.transformer(tokens)
        return self.mlp_head(tokens[:, 0])


def config_from_state(state: dict[str, torch.Tensor], heads: int = 8) -> dict[str, int]:
    """``ViTCifar`` keyword arguments read off the tensor shapes; ``heads`` leaves no trace in them."""
    missing = [k for k in (*PROBE_KEYS, "transformer.layers.0.linear1.weight") if k not in state]
    if missing:
        raise ValueError(f"not a CIFAR ViT state dict: keys {missing} are missing (keys start {sorted(state)[:5]})")
    dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape  # [dim, C, p, p]
    tokens = state["pos_embed"].shape[1]  # pos_embed: [1, P + 1, dim]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ValueError(f"pos_embed holds {tokens} tokens; a square grid of patches plus a class token needs n² + 1")
    return {
        "dim": dim,
        "depth": max(int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))) + 1,
        "heads": heads,
        "mlp_dim": state["transformer.layers.0.linear1.weight"].shape[0],  # linear1: [mlp_dim, dim]
        "patch": patch,
        "image_size": side * patch,
        "in_chans": in_chans,
        "num_classes": state["mlp_head.1.weight"].shape[0],  # [classes, dim]
    }


def model_from_state(state: dict[str, torch.Tensor], heads: int = 8) -> ViTCifar:
    """A ``ViTCifar`` in eval mode holding exactly ``state``; any missing, unexpected or misshapen key is an error."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ViTCifar(**config_from_state(state, heads))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"state dict does not fit a ViTCifar{model.config}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shapes (file vs model) {misshapen}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or the one ``.pth``/``.pt`` file in the directory ``path``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not p.is_dir():
        return p
    found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(f.name for f in found)})"
        raise FileNotFoundError(f"{path} holds {what} {'/'.join(SUFFIXES)} files; pass the checkpoint file itself")
    return found[0]


def read_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a saved state dict (bare, or under ``'state_dict'``), through the restricted unpickler."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(
            f"{path} is not a state dict that loads with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); save it with torch.save(model.state_dict(), path)"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")
    return state


def load_vit_cifar(path: str | os.PathLike, heads: int = 8) -> ViTCifar:
    """A ``ViTCifar`` in eval mode from a ``.pth`` state dict, or a directory holding exactly one.

    Every size but ``heads`` is read from the weights.
    """
    model = model_from_state(read_state(checkpoint_file(path)), heads)
    model.lowbit_source = str(path)
    return model


def is_vit_cifar_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap guess whether ``load_vit_cifar`` takes ``path``: its keys are read, its tensors memory-mapped, not read."""
    try:
        state = read_state(checkpoint_file(path), mmap=True)
    except (FileNotFoundError, ValueError, OSError):
        return False
    keys = {k.removeprefix("module.") for k in state}
    return all(k in keys for k in PROBE_KEYS) and any(LAYER_KEY.match(k) for k in keys)
