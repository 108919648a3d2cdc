"""Runtime modules that hold quantized weights and dispatch to fast kernels."""

from lowbit.nn.qlinear import QLinear, linear_weight

__all__ = ["QLinear", "linear_weight"]
