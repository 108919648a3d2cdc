"""Image-classification accuracy, in batches so that the full CIFAR-10 test set fits any device."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live; CPU for a model without parameters or buffers."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``[N, classes]`` logits on the CPU, in eval mode (BatchNorm must use its running statistics)."""
    if len(images) == 0:
        raise ValueError("no images to evaluate; pass a non-empty [N, C, H, W] tensor")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is invalid; use a positive number")
    device = torch.device(device) if device is not None else model_device(model)
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="top-1", disable=not progress, unit="batch"):
        out.append(model(images[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def top1(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """Top-1 accuracy in percent (0-100)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels; they must pair up")
    logits = predict_logits(model, images, batch_size, device, progress)
    return (logits.argmax(-1) == labels.cpu()).float().mean().item() * 100
