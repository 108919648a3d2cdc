"""Real int8 execution of a W8A8-quantized CIFAR ResNet with PyTorch's quantized CPU
kernels (x86/FBGEMM on CPUs with VNNI, QNNPACK otherwise: see ``pick_engine``): uint8
activations, 8-bit per-channel weights, int32 accumulation.

The fake-quantized model is the specification; this runs it with integers. Each conv
takes lowbit's codes as they are (``codes - 128`` as int8 with per-channel zero points
``zero - 128``), each activation lowbit's static scale and zero point. PyTorch's
quantized conv requantizes its output to 8 bits, so a conv followed by a ReLU site
writes straight into that site's grid (zero point 0: the clamp at 0 is the ReLU), the
residual add uses ``add_relu`` into the block-output site's grid, and the second conv
of each block, whose output the float model adds to the shortcut unquantized, gets
one more 8-bit point calibrated here: the only place the integer model differs from
the simulated one. The classifier head (average pool and the 64x10 linear) stays in
the simulation.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.fakequant import ActQuantizer, ActSite, QuantLayer


def has_vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 with 32-bit sums (AVX-512 VNNI or AVX-VNNI)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


def pick_engine() -> str:
    """x86/FBGEMM where it is exact; QNNPACK otherwise.

    Without VNNI, FBGEMM sums pairs of uint8 x int8 products in 16 bits with saturation
    (``vpmaddubsw``), which is why PyTorch's own x86 recipes reduce activations to 7 bits;
    with lowbit's full 8-bit activations it gets about a quarter of the output codes wrong
    (measured on an AVX2 machine without VNNI that this project ran on). QNNPACK computes
    uint8 x uint8 exactly.
    """
    engines = torch.backends.quantized.supported_engines
    if has_vnni():
        for name in ("x86", "fbgemm"):
            if name in engines:
                return name
    if "qnnpack" in engines:
        return "qnnpack"
    raise NotImplementedError(f"no exact quantized engine here (PyTorch offers {engines})")


def _qparams(q: ActQuantizer) -> tuple[float, int]:
    return float(q.scale), int(q.zero)


def _observe(obs: ActQuantizer, value: torch.Tensor) -> None:
    obs(value)


class _QConv(nn.Module):
    """One QuantLayer conv as a quantized conv writing into ``(scale, zero)``."""

    def __init__(self, layer: QuantLayer, out_scale: float, out_zero: int):
        super().__init__()
        if layer.conv is None or layer.bits != 8:
            raise ValueError("int8 execution needs 8-bit conv weights")
        codes = layer.codes().to(torch.int16) - 128
        zeros = layer.zero.reshape(-1).to(torch.int64) - 128
        weight = torch._make_per_channel_quantized_tensor(
            codes.to(torch.int8), layer.scale.reshape(-1).double(), zeros, 0
        )
        self.conv = torch.ao.nn.quantized.Conv2d(
            weight.shape[1] * layer.conv["groups"], weight.shape[0], tuple(weight.shape[2:]), **layer.conv
        )
        self.conv.set_weight_bias(weight, layer.bias.detach().float())
        self.conv.scale, self.conv.zero_point = out_scale, out_zero

    def forward(self, x):
        return self.conv(x)


class Int8Block(nn.Module):
    def __init__(self, block, out2: ActQuantizer):
        super().__init__()
        relu1, relu2 = block.relu1.quant, block.relu2.quant
        self.conv1 = _QConv(block.conv1, *_qparams(relu1))
        self.conv2 = _QConv(block.conv2, *_qparams(out2))
        self.out2 = out2  # the extra 8-bit point, kept so the simulation can be given it too
        self.shortcut = block.shortcut
        self.out_scale, self.out_zero = _qparams(relu2)

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        if isinstance(self.shortcut, nn.Identity):
            s = x
        else:  # parameter-free subsample and zero-pad: exact on the grid (its zero point is 0)
            s = torch.quantize_per_tensor(self.shortcut(x.dequantize()), x.q_scale(), x.q_zero_point(), torch.quint8)
        return torch.ops.quantized.add_relu(y, s, self.out_scale, self.out_zero)


class Int8ResNet(nn.Module):
    """The integer form of a ResNetCifar that ``quantize_cnn(..., bits=8, act_bits=8)`` returned."""

    def __init__(self, q: nn.Module, images: torch.Tensor):
        super().__init__()
        self.engine = pick_engine()
        torch.backends.quantized.engine = self.engine
        for name, m in q.named_modules():
            if isinstance(m, QuantLayer) and m.kind == "Conv2d" and m.bits != 8:
                raise ValueError(f"{name}: int{m.bits} weights; int8 execution needs W8A8 (bits=8)")
            if isinstance(m, ActQuantizer) and (m.bits != 8 or not m.enabled):
                raise ValueError(f"{name}: activations must be 8-bit and calibrated")
            if isinstance(m, ActSite) and float(m.quant.zero) != 0:
                raise ValueError(f"{name}: a ReLU site with a non-zero zero point")
        self.in_scale, self.in_zero = _qparams(q.conv1.input_quant)
        self.stem = _QConv(q.conv1, *_qparams(q.relu.quant))
        outs = self._calibrate_block_convs(q, images)
        self.blocks = nn.Sequential(*[Int8Block(b, outs[id(b)]) for s in (q.layer1, q.layer2, q.layer3) for b in s])
        self.pool, self.linear = q.pool, q.linear

    @staticmethod
    def _calibrate_block_convs(q: nn.Module, images: torch.Tensor) -> dict[int, ActQuantizer]:
        """An 8-bit range for each block's second conv output (min-max observer), on ``images``."""
        observers, hooks = {}, []
        for stage in (q.layer1, q.layer2, q.layer3):
            for block in stage:
                obs = ActQuantizer(8, "minmax")
                obs.observe()
                observers[id(block)] = obs
                hooks.append(block.conv2.register_forward_hook(lambda m, a, o, obs=obs: _observe(obs, o)))
        try:
            with torch.no_grad():
                for i in range(0, images.shape[0], 256):
                    q(images[i : i + 256])
        finally:
            for h in hooks:
                h.remove()
        for obs in observers.values():
            obs.finish_observing()
        return observers

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.backends.quantized.engine != self.engine:
            raise RuntimeError(f"the quantized engine changed to {torch.backends.quantized.engine} after packing")
        qx = torch.quantize_per_tensor(x.float(), self.in_scale, self.in_zero, torch.quint8)
        y = self.blocks(self.stem(qx)).dequantize()
        return self.linear(torch.flatten(self.pool(y), 1))
