"""Reading text and images for calibration and evaluation."""

from lowbit.data.calib import calibration_windows
from lowbit.data.cifar10 import load_cifar10
from lowbit.data.text import read_text, sentences, split_halves

__all__ = ["calibration_windows", "load_cifar10", "read_text", "sentences", "split_halves"]
