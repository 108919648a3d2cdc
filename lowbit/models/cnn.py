"""Convolutional networks as a family: BatchNorm folding, and the adapter of the CIFAR
ResNets (units: the stem, each BasicBlock, the head; activations quantized at the
image input, after every ReLU, the one after the residual add included, and at
the classifier input; the first and last layers at 8 bits, as in the papers).

Any other module of convs and linears goes through the generic adapter: every
weighted layer is its own unit and quantizes its own input.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.adapters import Adapter, SiteSpec, UnitSpec, set_module


def _bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) pairs where the norm reads only that conv's output: adjacent in an
    ``nn.Sequential``, or ``convK``/``bnK`` siblings (the torchvision/akamaster naming)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (a, ma), (b, mb) in zip(children, children[1:]):
                if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d):
                    pairs.append((prefix + a, prefix + b))
        else:
            named = dict(children)
            for a, ma in children:
                if isinstance(ma, nn.Conv2d) and a.startswith("conv"):
                    b = "bn" + a[len("conv"):]
                    if isinstance(named.get(b), nn.BatchNorm2d):
                        pairs.append((prefix + a, prefix + b))
    return pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm (inference statistics) into the conv before it, in place:
    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``;
    the norm becomes an ``nn.Identity``. The model's output on ``example`` is checked
    to be unchanged, so a wrongly guessed pair fails loudly instead of computing
    something else."""
    pairs = _bn_pairs(model) if pairs is None else pairs
    if not pairs:
        return []
    model.eval()
    with torch.no_grad():
        before = model(example)
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            if conv.out_channels != bn.num_features:
                raise ValueError(f"{bn_name} ({bn.num_features} features) cannot follow {conv_name}")
            std = torch.sqrt(bn.running_var.float() + bn.eps)
            gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(std)
            beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(std)
            factor = gamma / std
            bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(std)
            conv.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean.float()) * factor + beta)
            set_module(model, bn_name, nn.Identity())
        after = model(example)
    err = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
    if err > 1e-3:
        raise RuntimeError(f"folding BatchNorm changed the model's output (relative {err:.2e}); pairs {pairs}")
    return pairs


def fold_all_batchnorms(model: nn.Module, example) -> list[str]:
    """Fold every foldable BatchNorm of ``model`` (in place, checked on ``example``)."""
    if example is None:
        return ["BatchNorms left unfolded: folding is checked on an example input (pass calib=)"] if _bn_pairs(model) \
            else []  # fmt: skip
    pairs = fold_batchnorm(model, example)
    return [f"folded {len(pairs)} BatchNorms into their convs"] if pairs else []


class ResNetCifarAdapter(Adapter):
    def __init__(self):
        super().__init__("resnet_cifar", family="cnn")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "ResNetCifar"

    def prepare(self, model: nn.Module, example=None) -> list[str]:
        return fold_all_batchnorms(model, example)

    def block_prefix(self, model: nn.Module) -> str | None:
        return None

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(model, s))]

    def units(self, model: nn.Module) -> list[UnitSpec]:
        units = [UnitSpec("stem", ["conv1", "bn1", "relu"])]
        units += [UnitSpec(n, [n], follows=True) for n, _ in self.blocks(model)]
        return units + [UnitSpec("head", ["pool", "linear"], follows=True)]

    def sites(self, model: nn.Module) -> list[SiteSpec]:
        names = ["relu"] + [f"{n}.{r}" for n, _ in self.blocks(model) for r in ("relu1", "relu2")]
        return [SiteSpec(n, output=True, role="relu") for n in names]

    def quantizes_input(self, name: str) -> bool:
        return name in ("conv1", "linear")  # every other conv reads a ReLU site's output

    def input_sites(self, model: nn.Module) -> dict[str, str]:
        """Each block's first conv reads the previous block's output ReLU (the stem's for the
        first), its second conv the block's inner ReLU."""
        out, prev = {}, "relu"
        for name, _ in self.blocks(model):
            out[f"{name}.conv1"], out[f"{name}.conv2"] = prev, f"{name}.relu1"
            prev = f"{name}.relu2"
        return out

    def skip_reason(self, model, name, module):
        return super().skip_reason(model, name, module)
