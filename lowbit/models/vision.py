"""Vision transformers as a family: the CIFAR ViT's adapter.

``prepare`` turns every ``nn.TransformerEncoderLayer`` into explicit modules
(q/k/v/out linears, ``q @ k^T`` and ``attn @ v`` as op modules, the softmax, the
MLP activation and both residual adds as modules), so a quantizer can sit on
each. Units: the patch embedding, each encoder layer, the head. With quantized
activations every linear's and conv's input is quantized, and so are the
softmax output, the MLP activation output, both operands of ``q @ k^T`` and
both residual sums. The patch embedding and the head keep 8 bits by default.
"""

from __future__ import annotations

from torch import nn

from lowbit.models.adapters import Adapter, SiteSpec, UnitSpec


class ViTCifarAdapter(Adapter):
    def __init__(self):
        super().__init__("vit_cifar", block_paths=("transformer.layers",), family="vit")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "ViTCifar"

    def units(self, model: nn.Module) -> list[UnitSpec]:
        blocks = [UnitSpec(n, [n], follows=i > 0) for i, (n, _) in enumerate(self.blocks(model))]
        return [UnitSpec("patch_embed", ["patch_embed"]), *blocks, UnitSpec("mlp_head", ["mlp_head"])]

    def scale_pairs(self, block: nn.Module) -> list[tuple[str, list[str]]]:
        # attention mixes positions, not channels, and ReLU commutes with positive scales: both exact
        pairs = [("self_attn.v_proj", ["self_attn.out_proj"]), ("linear1", ["linear2"])]
        if getattr(block, "norm_first", False):  # pre-norm: each LayerNorm feeds only its linears
            pairs += [("norm1", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]), ("norm2", ["linear1"])]
        names = {n for n, _ in block.named_modules()}
        return [(p, c) for p, c in pairs if p in names and all(x in names for x in c)]

    def norm_consumers(self, model: nn.Module) -> list[tuple[str, list[str]]]:
        out, prev = [], None
        for name, block in self.blocks(model):
            qkv = [f"{name}.self_attn.{p}_proj" for p in "qkv"]
            if getattr(block, "norm_first", False):
                out += [(f"{name}.norm1", qkv), (f"{name}.norm2", [f"{name}.linear1"])]
            else:  # post-norm: norm1 feeds linear1 (and the residual), norm2 the next layer's q/k/v
                out.append((f"{name}.norm1", [f"{name}.linear1"]))
                if prev is not None:
                    out.append((f"{prev}.norm2", qkv))
            prev = name
        return out

    def quantizes_input(self, name: str) -> bool:
        return not name.endswith(".linear2")  # it reads the MLP activation's site

    def input_sites(self, model: nn.Module) -> dict[str, str]:
        """Each layer's ``linear2`` reads the MLP activation's output (dropout between is off at inference)."""
        return {f"{name}.linear2": f"{name}.activation" for name, _ in self.blocks(model)}

    def sites(self, model: nn.Module) -> list[SiteSpec]:
        out = []
        for name, _ in self.blocks(model):
            out += [SiteSpec(f"{name}.self_attn.qk", inputs=2, role="qk"),
                    SiteSpec(f"{name}.self_attn.softmax", output=True, role="softmax"),
                    SiteSpec(f"{name}.activation", output=True, role="mlp_act"),
                    SiteSpec(f"{name}.add1", output=True, role="residual"),
                    SiteSpec(f"{name}.add2", output=True, role="residual")]  # fmt: skip
        return out
