"""Numeric formats as pure functions on tensors: no modules, no models, no calibration."""

from lowbit.formats import floating, integer, packing
from lowbit.formats.spec import WeightFormat

__all__ = ["WeightFormat", "floating", "integer", "packing"]
