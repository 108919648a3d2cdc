"""Reading text for calibration and evaluation."""

from lowbit.data.text import read_text, sentences, split_halves

__all__ = ["read_text", "sentences", "split_halves"]
