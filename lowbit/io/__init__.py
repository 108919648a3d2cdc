"""Saving, loading and exporting quantized models."""
