"""Interleaved timing: the only honest way to compare speeds on a noisy machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cache_flusher(megabytes: int = 128) -> Callable[[], None]:
    """A function that evicts the CPU caches by writing a buffer larger than them."""
    buf = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32)

    def flush() -> None:
        buf.fill_(1.0)

    return flush


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    burst: int = 1,
    before_each: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved round by round.

    Each round times ``burst`` back-to-back calls of every function in turn.
    ``before_each`` runs untimed before each burst (for example a cache flush).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            samples[name].append((time.perf_counter() - t0) / burst)
    return {k: statistics.median(v) for k, v in samples.items()}
