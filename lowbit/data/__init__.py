"""Reading text for calibration and evaluation."""

from lowbit.data.calib import calibration_windows
from lowbit.data.text import read_text, sentences, split_halves

__all__ = ["calibration_windows", "read_text", "sentences", "split_halves"]
