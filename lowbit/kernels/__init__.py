"""Packed matmul kernels, each tested against dequantize-then-matmul."""
