"""Files as an ordinary program writes them: temporary files and directories (created private,
0600 / 0700, by ``tempfile``) get the modes the user's umask gives a new file before they are
renamed into place, so another user, a serving container or a shared volume can read them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def make_ordinary(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the umask's default modes."""
    mask = current_umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
