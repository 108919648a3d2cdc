"""lowbit: quantize trained neural networks into smaller, faster models."""

from lowbit.api import quantize
from lowbit.coverage import Coverage
from lowbit.engine.cnn import quantize_cnn
from lowbit.formats.spec import WeightFormat
from lowbit.io.native import load, save
from lowbit.methods import AWQ, GPTQ, RTN, load_recipe, make_method, parse_recipe
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight

__version__ = "0.1.0"

__all__ = [
    "AWQ",
    "GPTQ",
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
    "quantize_cnn",
    "save",
]
