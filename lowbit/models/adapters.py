"""Adapters: what the one engine needs to know of a model family.

- ``prepare``: make the model quantizable without changing what it computes
  (fold BatchNorms into convs; split ``nn.MultiheadAttention`` into explicit
  q/k/v/out linears and op modules), checked on an example input;
- ``units``: the pieces the engine calibrates one after another, in execution
  order: the stem, each block, the head, and any weighted layer outside them;
- ``scale_pairs``: (producer, consumers) inside a block whose input scaling folds
  exactly into the producer (AWQ, SmoothQuant, OS+);
- ``sites``: activation quantization points besides the inputs of the weighted
  layers (a ReLU's output, the softmax, the q.k^T operands, residual adds), and
  which weighted layers quantize their own input;
- ``skip_reason``: which weighted layers stay in full precision by default.

Adding an architecture is adding an adapter here, not editing methods.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from lowbit.nn.qmodule import QModule, QSite, is_hf_conv1d, op_kind


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (a linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class UnitSpec:
    """Modules run one after another (flattening before a linear) on the unit's input.

    ``follows``: the unit's input is the previous unit's output, so it needs no
    capture pass of its own."""

    name: str
    modules: list[str]
    follows: bool = False


@dataclass
class SiteSpec:
    """An activation quantization point on a module: its ``inputs`` (how many operands)
    or its ``output``. ``role`` says what the module computes, for methods that pick a
    quantizer by it: ``softmax``, ``mlp_act`` (GELU), ``residual`` (a sum a LayerNorm
    reads), ``qk`` (the ``q @ k^T`` operands), ``relu``."""

    name: str
    inputs: int = 0
    output: bool = False
    role: str = ""


@dataclass
class Adapter:
    """``block_paths``: candidate attribute paths of the ``nn.ModuleList`` of blocks."""

    name: str
    model_types: tuple[str, ...] = ()
    block_paths: tuple[str, ...] = ()
    # (producer, consumers) inside a block, names relative to the block: the producer's
    # output feeds only those linears, so an input scaling of theirs folds into it exactly.
    pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    family: str = "llm"  # llm, encoder, vit, cnn, generic: picks defaults (activation scheme, ends at 8 bits)

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types and self.block_prefix(model) is not None

    def prepare(self, model: nn.Module, example=None) -> list[str]:
        """Rewrite ``model`` in place into a quantizable form; returns what was done."""
        from lowbit.models.attention import make_explicit
        from lowbit.models.cnn import fold_all_batchnorms
        from lowbit.models.moe import unfuse_experts

        n = make_explicit(model)
        notes = [f"split {n} attention layers into explicit q/k/v/out linears"] if n else []
        moe = unfuse_experts(model)
        if moe:
            notes.append(f"split the fused experts of {len(moe)} MoE layers into one linear per expert projection")
        return notes + fold_all_batchnorms(model, example)

    def block_prefix(self, model: nn.Module) -> str | None:
        for path in self.block_paths:
            blocks = _get(model, path)
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                return path
        return None

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        path = self.block_prefix(model)
        if path is None:
            return []
        return [(f"{path}.{i}", block) for i, block in enumerate(_get(model, path))]

    def units(self, model: nn.Module) -> list[UnitSpec]:
        """Blocks in order; every weighted layer outside them its own unit, before or after
        the blocks as the model registers it."""
        blocks = self.blocks(model)
        prefixes = [n + "." for n, _ in blocks]
        names = [n for n, _ in model.named_modules()]
        first_block = names.index(blocks[0][0]) if blocks else len(names)
        stem, head = [], []
        for i, (name, m) in enumerate(model.named_modules()):
            if not (is_weighted(m)) or any(name.startswith(p) for p in prefixes):
                continue
            (stem if i < first_block else head).append(UnitSpec(name, [name]))
        return stem + [UnitSpec(n, [n], follows=i > 0) for i, (n, _) in enumerate(blocks)] + head

    def scale_pairs(self, block: nn.Module) -> list[tuple[str, list[str]]]:
        """The pairs present in ``block`` (a missing module drops its pair)."""
        names = {n for n, _ in block.named_modules()}
        return [(p, list(c)) for p, c in self.pairs if p in names and all(x in names for x in c)]

    def sites(self, model: nn.Module) -> list[SiteSpec]:
        """Activation points besides the weighted layers' inputs (none for language models: their
        integer activations are the linears' inputs)."""
        return []

    def norm_consumers(self, model: nn.Module) -> list[tuple[str, list[str]]]:
        """(LayerNorm, the linears that read its output) by full name, where the adapter knows them:
        what post-LayerNorm methods (RepQ-ViT) act on. A pre-norm block's pairs are also scale
        pairs (the norm feeds nothing else); a post-norm block's norm also feeds the residual."""
        return []

    def quantizes_input(self, name: str) -> bool:
        """Whether the weighted layer ``name`` quantizes its own input when activations are quantized."""
        return True

    def input_sites(self, model: nn.Module) -> dict[str, str]:
        """Layer -> the activation site whose output is that layer's whole input (so the layer's
        input is already on the site's grid), where the adapter knows the graph."""
        return {}

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
        if op_kind(module) is None:
            if type(module).__name__.lower().endswith("router"):
                return "MoE router: kept in full precision by default (it picks the experts; tiny)"
            return f"{type(module).__name__}: no quantized module for this layer type yet"
        return None


def is_weighted(module: nn.Module) -> bool:
    """A module holding a parameter of two or more dimensions itself (not in a child)."""
    return any(p.dim() >= 2 for p in module.parameters(recurse=False)) or isinstance(module, (QModule,))


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


class GenericAdapter(Adapter):
    """Any ``nn.Module``: the largest ``nn.ModuleList`` counts as the blocks, if any; every
    other weighted layer is its own unit and quantizes its own input."""

    def __init__(self):
        super().__init__("generic", family="generic")

    def matches(self, model: nn.Module) -> bool:
        return True

    def block_prefix(self, model: nn.Module) -> str | None:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            return None
        return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))[0]


def _resnet_adapter():
    from lowbit.models.cnn import ResNetCifarAdapter

    return ResNetCifarAdapter()


def _vit_adapter():
    from lowbit.models.vision import ViTCifarAdapter

    return ViTCifarAdapter()


ADAPTERS = [
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), ("model.layers",), LLAMA_PAIRS),
    Adapter("opt", ("opt",), ("model.decoder.layers", "decoder.layers"), OPT_PAIRS),
    Adapter("gpt2", ("gpt2",), ("transformer.h", "h")),
    Adapter("bert", ("bert", "roberta"), ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"), BERT_PAIRS,
            family="encoder"),  # fmt: skip
]
FAMILY_ADAPTERS = {"ResNetCifar": _resnet_adapter, "ViTCifar": _vit_adapter}


def _hf_vit_adapter():
    from lowbit.models.hf_vit import HFViTAdapter

    return HFViTAdapter()


# adapters defined in their own modules, by ``config.model_type``, built when a model asks
MODEL_TYPE_ADAPTERS = {"vit": _hf_vit_adapter, "deit": _hf_vit_adapter}


def adapter_for(model: nn.Module) -> Adapter:
    make = FAMILY_ADAPTERS.get(type(model).__name__)
    if make is not None:
        return make()
    lazy = MODEL_TYPE_ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    return next((a for a in [*([lazy()] if lazy else []), *ADAPTERS] if a.matches(model)), GenericAdapter())


@dataclass
class Target:
    name: str  # the module's name; ``module.param`` for a loose parameter (a class token)
    module: nn.Module
    in_block: bool
    skip: str | None  # reason, or None to quantize
    numel: int = 0  # weights it accounts for (parameters of two or more dimensions)


def _numel(module: nn.Module, param: str | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters(recurse=False) if p.dim() >= 2 and param in (None, n))


def plan(
    model: nn.Module,
    skip: list[str] | tuple[str, ...] = (),
    include_lm_head: bool = False,
    adapter: Adapter | None = None,
) -> list[Target]:
    """Every parameter of two or more dimensions, by the module holding it, with the decision to
    quantize it or why not (``skip``: glob patterns of module names to keep in full precision)."""
    from lowbit.nn.qconv import QConv
    from lowbit.nn.qlinear import QLinear

    adapter = adapter or adapter_for(model)
    prefix = adapter.block_prefix(model)
    targets = []
    for name, module in model.named_modules():
        in_block = prefix is not None and name.startswith(prefix + ".")
        if isinstance(module, (QLinear, QConv)):
            targets.append(Target(name, module, in_block, "already quantized", module.quantized_weight.numel))
            continue
        if isinstance(module, (QModule, QSite)) or not is_weighted(module):
            continue
        if op_kind(module) is None:
            params = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
            reason = adapter.skip_reason(model, name, module)
            if params == ["weight"]:
                targets.append(Target(name, module, in_block, reason, _numel(module)))
            else:
                for p in params:
                    full = f"{name}.{p}" if name else p
                    why = f"{type(module).__name__}.{p}: not a layer weight; kept in full precision"
                    targets.append(Target(full, module, in_block, why, _numel(module, p)))
            continue
        reason = adapter.skip_reason(model, name, module)
        if include_lm_head and reason and reason.startswith("output projection"):
            reason = None
        if reason is None and any(fnmatch.fnmatch(name, pat) for pat in skip):
            reason = "matched a --skip pattern"
        targets.append(Target(name, module, in_block, reason, _numel(module)))
    return targets
