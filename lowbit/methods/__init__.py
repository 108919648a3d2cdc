"""Quantization methods, one file per algorithm, registered by name."""

from lowbit.methods.base import REGISTRY, MethodConfig, make_method, parse_recipe, register
from lowbit.methods.rtn import RTN

__all__ = ["REGISTRY", "RTN", "MethodConfig", "make_method", "parse_recipe", "register"]
