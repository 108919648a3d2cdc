"""Model adapters and loading."""

from lowbit.models.adapters import Adapter, Target, adapter_for, is_linear, plan, set_module
from lowbit.models.loading import load_pretrained, resolve_model_path

__all__ = [
    "Adapter",
    "Target",
    "adapter_for",
    "is_linear",
    "load_pretrained",
    "plan",
    "resolve_model_path",
    "set_module",
]
