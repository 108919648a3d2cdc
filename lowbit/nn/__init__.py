"""Runtime modules that hold quantized weights and dispatch to fast kernels."""

from lowbit.nn.qconv import QConv
from lowbit.nn.qlinear import QLinear, linear_weight
from lowbit.nn.w8a8 import W8A8Linear

__all__ = ["QConv", "QLinear", "W8A8Linear", "linear_weight"]
