"""Building lowbit's C++ kernels: compiled on first use into the torch extensions cache.

A kernel that cannot be had (the CPU lacks its instructions, no compiler, or
``LOWBIT_DISABLE_CPP=1``) yields ``None``, and the caller falls back to PyTorch's
own kernels; a failed build says why once, as a warning.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_isa(isa: str | None, isas: dict[str, int], available, what: str,
                best: tuple[str, ...] = ("auto",)) -> int:  # fmt: skip
    """``isa`` (or ``LOWBIT_ISA``, or the best available: ``-1``) as a kernel's integer code, from
    ``isas``; an unknown name or one this CPU lacks (``available()``, asked only then) is an error
    naming ``what``.
    ``best``: the names that mean "the best path" for this kernel."""
    name = isa or os.environ.get("LOWBIT_ISA") or "auto"
    if name in best:
        return -1
    if name not in isas:
        raise ValueError(f"unknown instruction set {name!r}; choose auto, {', '.join(isas)}")
    have = available()
    if name not in have:
        raise ValueError(f"this CPU cannot run lowbit's {name} {what} (it has: {', '.join(have) or 'none'})")
    return isas[name]


def build_extension(name: str, source: str, cflags: list[str], what: str):
    """Compile ``csrc/source`` as module ``name``, or return ``None`` (with a warning) if that fails."""
    if os.environ.get("LOWBIT_DISABLE_CPP") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        sys.stderr.write(f"lowbit: loading {what} (compiled once per machine, about 30 s)\n")
        return load(
            name=name,
            sources=[str(CSRC / source)],
            extra_cflags=["-O3", "-fopenmp", *cflags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja must not break inference
        warnings.warn(f"lowbit's {what} could not be built ({e}); using PyTorch's kernels", stacklevel=3)
        return None
