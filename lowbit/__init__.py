"""lowbit: quantize trained neural networks into smaller, faster models.

The names below are imported on first use, so that ``import lowbit`` (and the
command line's ``--help`` and argument errors) do not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "quantize": "lowbit.api",
    "quantize_to_disk": "lowbit.api",
    "Coverage": "lowbit.coverage",
    "WeightFormat": "lowbit.formats.spec",
    "load": "lowbit.io.native",
    "save": "lowbit.io.native",
    "QuantizedWeight": "lowbit.quantized_weight",
    "QConv": "lowbit.nn",
    "QLinear": "lowbit.nn",
    **{
        name: "lowbit.methods"
        for name in ("AWQ", "BRECQ", "GPTQ", "RTN", "AdaRound", "BiasCorrection", "QDrop", "load_recipe",
                     "make_method", "parse_recipe")  # fmt: skip
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
