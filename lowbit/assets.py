"""Where the shared real models and data live (``LOWBIT_ASSETS``, default ``../shared/assets``)."""

from __future__ import annotations

import os
from pathlib import Path


def assets_dir() -> Path:
    env = os.environ.get("LOWBIT_ASSETS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / ".." / "shared" / "assets"
    if here.exists():
        return here.resolve()
    return (Path.cwd() / ".." / "shared" / "assets").resolve()


def asset(*parts: str) -> Path:
    return assets_dir().joinpath(*parts)
