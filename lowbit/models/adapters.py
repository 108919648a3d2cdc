"""Adapters: where a model keeps its repeated blocks and which layers to leave alone.

Adding an architecture is adding an adapter here, not editing methods.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

LINEAR_KINDS = ("Linear", "Conv1D")
# Weight-bearing layers that weight-only linear quantization does not handle yet:
# they are listed in every coverage report as skipped, never ignored.
OTHER_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding, nn.EmbeddingBag)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (a linear with a transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _get(model: nn.Module, path: str) -> nn.Module | None:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Adapter:
    """``block_paths``: candidate attribute paths of the ``nn.ModuleList`` of blocks."""

    name: str
    model_types: tuple[str, ...] = ()
    block_paths: tuple[str, ...] = ()
    # (producer, consumers) inside a block, names relative to the block: the producer's
    # output feeds only those linears, so an input scaling of theirs folds into it exactly.
    pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types and self.block_prefix(model) is not None

    def block_prefix(self, model: nn.Module) -> str | None:
        for path in self.block_paths:
            blocks = _get(model, path)
            if isinstance(blocks, nn.ModuleList):
                return path
        return None

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        path = self.block_prefix(model)
        if path is None:
            return []
        return [(f"{path}.{i}", block) for i, block in enumerate(_get(model, path))]

    def scale_pairs(self, block: nn.Module) -> list[tuple[str, list[str]]]:
        """The pairs present in ``block`` (a missing module drops its pair)."""
        names = {n for n, _ in block.named_modules()}
        return [(p, list(c)) for p, c in self.pairs if p in names and all(x in names for x in c)]

    def skip_reason(self, model: nn.Module, name: str, module: nn.Module) -> str | None:
        """Why ``module`` is left in full precision by default, or ``None`` to quantize it."""
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return "embedding: kept in full precision by default"
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        if out is module:
            get_in = getattr(model, "get_input_embeddings", None)
            inp = get_in() if callable(get_in) else None
            tied = inp is not None and getattr(inp, "weight", None) is module.weight
            return (
                "output projection (lm_head)"
                + (", tied to the input embedding" if tied else "")
                + (": kept in full precision by default")
            )
        if not is_linear(module):
            return f"{type(module).__name__} is not supported by weight-only linear quantization"
        return None


LLAMA_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
OPT_PAIRS = (
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("final_layer_norm", ("fc1",)),
    ("fc1", ("fc2",)),  # ReLU between them commutes with positive scales
)
# Post-LayerNorm encoders: a LayerNorm's output also feeds the residual, so only
# value -> attention output folds exactly.
BERT_PAIRS = (("attention.self.value", ("attention.output.dense",)),)

ADAPTERS = [
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), ("model.layers",), LLAMA_PAIRS),
    Adapter("opt", ("opt",), ("model.decoder.layers", "decoder.layers"), OPT_PAIRS),
    Adapter("gpt2", ("gpt2",), ("transformer.h", "h")),
    Adapter("bert", ("bert", "roberta"), ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"), BERT_PAIRS),
]


class GenericAdapter(Adapter):
    """Any ``nn.Module``: the largest ``nn.ModuleList`` counts as the blocks, if any."""

    def __init__(self):
        super().__init__("generic")

    def matches(self, model: nn.Module) -> bool:
        return True

    def block_prefix(self, model: nn.Module) -> str | None:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            return None
        return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))[0]


def adapter_for(model: nn.Module) -> Adapter:
    return next((a for a in ADAPTERS if a.matches(model)), GenericAdapter())


@dataclass
class Target:
    name: str
    module: nn.Module
    in_block: bool
    skip: str | None  # reason, or None to quantize


def plan(
    model: nn.Module,
    skip: list[str] | tuple[str, ...] = (),
    include_lm_head: bool = False,
) -> list[Target]:
    """Every weight-bearing leaf of ``model`` with the decision to quantize it or why not.

    ``skip``: glob patterns of module names to keep in full precision.
    """
    adapter = adapter_for(model)
    prefix = adapter.block_prefix(model)
    targets = []
    from lowbit.nn.qlinear import QLinear

    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            in_block = prefix is not None and name.startswith(prefix + ".")
            targets.append(Target(name, module, in_block, "already quantized"))
            continue
        if not (is_linear(module) or isinstance(module, OTHER_WEIGHTED)):
            continue
        reason = adapter.skip_reason(model, name, module)
        if include_lm_head and reason and reason.startswith("output projection") and is_linear(module):
            reason = None
        if reason is None and any(fnmatch.fnmatch(name, pat) for pat in skip):
            reason = "matched a --skip pattern"
        in_block = prefix is not None and name.startswith(prefix + ".") and is_linear(module)
        targets.append(Target(name, module, in_block, reason))
    return targets


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
