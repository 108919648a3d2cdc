"""Text files: whole-file reading with clear errors, paragraph halves, sentence lists."""

from __future__ import annotations

import os
from pathlib import Path


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {path} is empty; give a file with text to calibrate or evaluate on")
    return text


def split_halves(text: str) -> tuple[str, str]:
    """First and second half of the paragraphs (separated by blank lines).

    The convention for the TinyStories file: calibrate on the first half,
    evaluate on the second.
    """
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    mid = len(paragraphs) // 2
    return "\n\n".join(paragraphs[:mid]), "\n\n".join(paragraphs[mid:])


def sentences(text: str, limit: int | None = None, min_words: int = 4) -> list[str]:
    """Non-empty lines that are not WikiText headings, up to ``limit``."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if len(line.split()) < min_words or line.startswith("="):
            continue
        out.append(line)
        if limit is not None and len(out) >= limit:
            break
    return out
