"""The CIFAR-10 ResNets (20/32/44/56) of He et al. 2016, Sec. 4.2, as trained by akamaster.

Every activation site is its own module (``relu``, ``relu1``, ``relu2``,
``shortcut``, ``pool``) rather than a functional call, so that the quantization
engine's hooks can observe and replace each one.

Checkpoints are read from safetensors. The two shipped legacy ``.th`` pickles
are converted once into a safetensors cache; other pickles are opened only with
PyTorch's restricted ``weights_only`` unpickler unless the caller vouches for
them with ``trust_pickle=True``, because a full unpickle runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.files import file_sha256, make_ordinary

# The checkpoints were trained on inputs normalised with ImageNet statistics.
NORMALIZE: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)

# SHA-256 of the legacy pickles shipped in shared/assets/resnet_cifar: the only
# ones unpickled without the caller's explicit trust.
TRUSTED_SHA256 = frozenset(
    {
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",  # resnet20-12fca82f.th
        "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",  # resnet32-d509ac18.th
    }
)

ARCHITECTURE = "resnet_cifar"
PROBE_KEY = "layer1.0.conv1.weight"


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad channels, adding no parameters."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsample = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes // 4) if downsample else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-``depth`` for 32x32 inputs: ``depth = 6n + 2`` with ``n`` blocks per stage."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth {depth} is not of the form 6n+2 (n >= 1); use 20, 32, 44, 56, 110, ...")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 32, 32], normalised
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def depth_from_keys(keys) -> int:
    """``6n + 2`` where ``n`` is the number of blocks in ``layer1``."""
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"layer1\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"no layer1.<i>.* keys: not a CIFAR ResNet state dict (keys start {sorted(keys)[:5]})")
    return 6 * (max(blocks) + 1) + 2


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that ``nn.DataParallel`` put in front of every key."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def model_from_state(state: dict[str, torch.Tensor], depth: int | None = None) -> ResNetCifar:
    """A ``ResNetCifar`` holding exactly ``state``; any missing or unexpected key is an error.

    ``num_batches_tracked`` may be absent (akamaster's checkpoints predate it):
    it only matters for training with ``momentum=None``.
    """
    state = strip_prefix(state)
    inferred = depth_from_keys(state)
    if depth is not None and depth != inferred:
        raise ValueError(f"config says depth {depth} but the weights have layer1 blocks of depth {inferred}")
    num_classes = state["linear.weight"].shape[0] if "linear.weight" in state else 10
    model = ResNetCifar(inferred, num_classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit ResNet-{inferred}: missing keys {missing}, unexpected keys {unexpected}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lowbit") / ARCHITECTURE


def save_atomic(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary file beside ``path`` and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        make_ordinary(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_from_pickle(path: Path, digest: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a legacy ``{'best_prec1', 'state_dict'}`` pickle (or a bare state dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not (trust_pickle or digest in TRUSTED_SHA256):
            raise ValueError(
                f"{path} is not a known checkpoint and holds more than tensors (or is no pickle at all), so it "
                "was not unpickled: that could run arbitrary code. If you trust it, pass "
                "trust_pickle=True once, or convert it yourself to safetensors: "
                "save_file(torch.load(path, weights_only=False)['state_dict'], 'model.safetensors')"
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")
    return strip_prefix(state)


def converted_pickle(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict of a legacy pickle, converted to safetensors once and read from the cache after."""
    digest = file_sha256(path)
    cached = cache_dir() / f"{digest[:16]}.safetensors"
    if cached.is_file():
        return load_file(cached)
    state = state_from_pickle(path, digest, trust_pickle)
    try:
        save_atomic(state, cached, {"source_sha256": digest, "source": path.name})
    except OSError:
        pass  # a read-only cache only costs a re-conversion next time
    return state


def read_config(directory: Path) -> int | None:
    """The depth named in ``config.json``, if there is one."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise ValueError(f"{cfg_path} describes architecture {cfg.get('architecture')!r}, not {ARCHITECTURE!r}")
    return cfg.get("depth")


def load_resnet_cifar(path: str | os.PathLike, trust_pickle: bool = False) -> ResNetCifar:
    """A CIFAR ResNet in eval mode from a ``.th`` pickle, a ``.safetensors`` file or a saved directory.

    The depth comes from the weights (the blocks in ``layer1``); a directory's
    ``config.json`` only cross-checks it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    depth = None
    if p.is_dir():
        depth = read_config(p)
        p = p / "model.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"{path} is a directory without model.safetensors; save with save_resnet_cifar")
    try:
        state = load_file(p) if p.suffix == ".safetensors" else converted_pickle(p, trust_pickle)
    except (ValueError, FileNotFoundError) as e:
        if str(p) in str(e):
            raise
        raise ValueError(f"{p}: {e}") from e
    except Exception as e:  # whatever a corrupted zip / pickle / safetensors file makes the parsers raise
        raise ValueError(f"{p}: cannot read this checkpoint, truncated or corrupted ({type(e).__name__}: {e})") from e
    try:
        model = model_from_state(state, depth)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e
    except (RuntimeError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"{p}: its tensors do not make a CIFAR ResNet ({type(e).__name__}: {e})") from e
    model.lowbit_source = str(path)
    return model


def save_resnet_cifar(model: ResNetCifar, directory: str | os.PathLike) -> Path:
    """``model.safetensors`` + ``config.json`` in ``directory``, which then loads with ``load_resnet_cifar``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_atomic(model.state_dict(), d / "model.safetensors")
    config = {"architecture": ARCHITECTURE, "depth": model.depth, "num_classes": model.num_classes}
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return d


def has_probe_key(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (OSError, SafetensorError):
        return False
    return PROBE_KEY in keys or f"module.{PROBE_KEY}" in keys


def is_resnet_cifar_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap guess (no tensors read) whether ``path`` is something ``load_resnet_cifar`` takes."""
    p = Path(path).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text()).get("architecture") == ARCHITECTURE
            except (json.JSONDecodeError, AttributeError):
                return False
        return has_probe_key(p / "model.safetensors")
    if p.suffix == ".th":
        return p.is_file()
    if p.suffix == ".safetensors":
        return has_probe_key(p)
    return False
