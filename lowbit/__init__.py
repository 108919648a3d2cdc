"""lowbit: quantize trained neural networks into smaller, faster models."""

from lowbit.api import quantize
from lowbit.coverage import Coverage
from lowbit.formats.spec import WeightFormat
from lowbit.io.native import load, save
from lowbit.methods import (
    AWQ,
    BRECQ,
    GPTQ,
    RTN,
    AdaRound,
    BiasCorrection,
    QDrop,
    load_recipe,
    make_method,
    parse_recipe,
)
from lowbit.nn import QConv, QLinear
from lowbit.quantized_weight import QuantizedWeight

__version__ = "0.1.0"

__all__ = [
    "AWQ",
    "AdaRound",
    "BRECQ",
    "BiasCorrection",
    "GPTQ",
    "QConv",
    "QDrop",
    "RTN",
    "Coverage",
    "QLinear",
    "QuantizedWeight",
    "WeightFormat",
    "load",
    "load_recipe",
    "make_method",
    "parse_recipe",
    "quantize",
    "save",
]
