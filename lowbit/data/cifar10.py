"""CIFAR-10 from JPEG files, read straight from a ``.tar.gz`` or from a folder of class folders.

Labels come from each file's parent folder (one of ``CLASSES``) and the split
from the folder above it (``train``/``test``) when there is one. Files are
ordered by name so that a given archive always yields the same tensors, and a
``limit`` picks a class-balanced subset with a seeded generator so calibration
sets are reproducible. Nothing is written to disk.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.assets import asset

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIZE = 32


@dataclass(frozen=True)
class Entry:
    name: str  # path inside the archive or folder, for ordering and error messages
    label: int
    split: str | None
    data: bytes | Path  # encoded image bytes (archive) or a file to open (folder)


def parse(parts: Sequence[str]) -> tuple[int, str | None] | None:
    """``(label, split)`` of a file path split into parts, or ``None`` if it is not a CIFAR image."""
    if len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-2] not in CLASSES:
        return None
    split = parts[-3] if len(parts) >= 3 and parts[-3] in SPLITS else None
    return CLASSES.index(parts[-2]), split


def archive_entries(path: Path) -> Iterator[Entry]:
    # Streaming mode ("r|*") decompresses once, front to back, instead of seeking in the gzip.
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parsed = parse(Path(member.name).parts)
            if parsed is None:
                continue
            f = tar.extractfile(member)
            if f is not None:
                yield Entry(member.name, *parsed, f.read())


def folder_entries(path: Path) -> Iterator[Entry]:
    # The folder's own name counts as a part, so ".../test" holding class folders reads as the test split.
    for file in path.rglob("*"):
        parsed = parse((path.name, *file.relative_to(path).parts))
        if parsed is not None and file.is_file():
            yield Entry(file.relative_to(path).as_posix(), *parsed, file)


def select_split(entries: list[Entry], split: str | None, path: Path) -> list[Entry]:
    present = sorted({e.split for e in entries if e.split is not None})
    if split is None:
        if len(present) > 1:
            raise ValueError(f"{path} holds several splits {present}; pass split='train' or split='test'")
        return entries
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use 'train' or 'test'")
    if not present:
        return entries
    chosen = [e for e in entries if e.split == split]
    if not chosen:
        raise ValueError(f"{path} has no {split!r} images, only {present}")
    return chosen


def balanced_subset(labels: list[int], limit: int, seed: int) -> list[int]:
    """Indices of ``limit`` items with the classes as even as their counts allow, in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    pools = [[idx[j] for j in torch.randperm(len(idx), generator=g).tolist()] for _, idx in sorted(by_class.items())]
    chosen: list[int] = []
    # Round-robin over the shuffled classes; a class that runs out simply stops contributing.
    for rank in range(max(len(p) for p in pools)):
        for pool in pools:
            if rank < len(pool):
                chosen.append(pool[rank])
        if len(chosen) >= limit:
            break
    chosen = chosen[:limit]
    return [chosen[j] for j in torch.randperm(len(chosen), generator=g).tolist()]


def pillow():
    """Pillow, imported on first use so the rest of lowbit works without it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading CIFAR-10 JPEGs needs Pillow: pip install pillow") from None
    return Image


def decode(entry: Entry) -> np.ndarray:  # -> [32, 32, 3] uint8
    with pillow().open(io.BytesIO(entry.data) if isinstance(entry.data, bytes) else entry.data) as im:
        if im.size != (SIZE, SIZE):
            raise ValueError(f"{entry.name} is {im.size[0]}x{im.size[1]}, not {SIZE}x{SIZE}; CIFAR-10 images are 32x32")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_cifar10(
    path: str | os.PathLike,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 3, 32, 32] float32 in [0, 1] or normalised, labels [N] int64)``.

    ``path`` is a ``.tar.gz`` of ``<split>/<class>/*.jpg`` or a folder of the
    same layout (or of class folders only). ``limit`` keeps a class-balanced
    subset in a random order fixed by ``seed``; without it the order is by file
    name. ``normalize=(mean, std)`` standardises each channel.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"CIFAR-10 path {path} does not exist")
    if p.is_dir():
        entries = list(folder_entries(p))
    elif tarfile.is_tarfile(p):
        entries = list(archive_entries(p))
    else:
        raise ValueError(f"{path} is neither a folder nor a tar archive of CIFAR-10 images")
    if not entries:
        raise ValueError(f"{path} holds no .jpg/.png images in folders named after the classes {CLASSES}")
    entries = sorted(select_split(entries, split, p), key=lambda e: e.name)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit {limit} is invalid; use a positive number of images or None for all")
        entries = [entries[i] for i in balanced_subset([e.label for e in entries], limit, seed)]
    pixels = torch.from_numpy(np.stack([decode(e) for e in entries]))  # [N, 32, 32, 3] uint8
    images = pixels.permute(0, 3, 1, 2).float().div_(255).contiguous()
    if normalize is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalize)
        images = images.sub_(mean).div_(std)
    labels = torch.tensor([e.label for e in entries], dtype=torch.int64)
    return images, labels


def default_cifar10(split: str) -> Path:
    """The shared JPEG archive of ``split`` (``train`` or ``test``), under ``LOWBIT_ASSETS``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use 'train' or 'test'")
    return asset("cifar10", f"cifar10_{split}_jpeg.tar.gz")
