"""What the CNN quantization engine needs to know of a model: its weighted layers in
execution order, which BatchNorms fold into which convs, where activations are
quantized, and the units that block-wise reconstruction (BRECQ, QDrop) optimises.

The CIFAR ResNets have an adapter (units: the stem, each BasicBlock, the head;
activations quantized after every ReLU, the one after the residual add
included). Any other module goes through the generic walker: every conv and
linear is found by running the model once, each is its own unit, and each
quantizes its own input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.models.adapters import OTHER_WEIGHTED
from lowbit.models.resnet_cifar import BasicBlock, ResNetCifar

WEIGHTED = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass
class Unit:
    """Modules run one after another (flattening before a Linear) between two capture points."""

    name: str
    modules: list[str]


@dataclass
class CnnPlan:
    adapter: str
    layers: list[str]  # convs and linears, in execution order
    skipped: dict[str, str] = field(default_factory=dict)  # weighted modules left in float, with why
    act_sites: list[str] = field(default_factory=list)  # modules whose output is quantized
    input_sites: list[str] = field(default_factory=list)  # layers whose input is quantized
    units: list[Unit] = field(default_factory=list)
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the convs and linears in the order one forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: order.append(names[mod]) and None)
             for m in model.modules() if isinstance(m, WEIGHTED)]  # fmt: skip
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    seen: list[str] = []
    for n in order:
        if n not in seen:
            seen.append(n)
    return seen


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
    from lowbit.models.adapters import set_module

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


def plan_cnn(model: nn.Module, example: torch.Tensor, skip: tuple[str, ...] = ()) -> CnnPlan:
    """The plan for ``model`` (already BatchNorm-folded)."""
    import fnmatch

    order = execution_order(model, example)
    skipped = {}
    for name, m in model.named_modules():
        if isinstance(m, WEIGHTED) and name not in order:
            skipped[name] = "never called in a forward pass"
        elif isinstance(m, OTHER_WEIGHTED) and not isinstance(m, nn.Conv2d):
            skipped[name] = f"{type(m).__name__}: no CNN quantizer for this layer type"
    layers = [n for n in order if not any(fnmatch.fnmatch(n, p) for p in skip)]
    for n in order:
        if n not in layers:
            skipped[n] = "matched --skip"
    if isinstance(model, ResNetCifar):
        sites = ["relu"]
        units = [Unit("stem", ["conv1", "bn1", "relu"])]
        for sname in ("layer1", "layer2", "layer3"):
            for i, block in enumerate(getattr(model, sname)):
                assert isinstance(block, BasicBlock)
                sites += [f"{sname}.{i}.relu1", f"{sname}.{i}.relu2"]
                units.append(Unit(f"{sname}.{i}", [f"{sname}.{i}"]))
        units.append(Unit("head", ["pool", "linear"]))
        return CnnPlan("resnet_cifar", layers, skipped, sites, ["conv1", "linear"], units)
    units = [Unit(n, [n]) for n in layers]
    return CnnPlan("generic", layers, skipped, [], list(layers), units)


def run_chain(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    """Run the modules ``names`` of ``model`` in order, flattening before a linear."""
    for n in names:
        m = model.get_submodule(n)
        if x.dim() > 2 and (isinstance(m, nn.Linear) or getattr(m, "kind", "") == "Linear"):
            x = torch.flatten(x, 1)
        x = m(x)
    return x
