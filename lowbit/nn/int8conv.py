"""Real int8 execution of a W8A8-quantized CIFAR ResNet with PyTorch's quantized CPU
kernels (x86/FBGEMM on CPUs with VNNI, QNNPACK otherwise: see ``pick_engine``): uint8
activations, 8-bit per-channel weights, int32 accumulation.

The frozen model that ``lowbit.quantize(resnet, "rtn", bits=8, act_bits=8, calib=...)``
returns is the specification; this runs it with integers. Each ``QConv`` gives its
stored codes as they are (``codes - 128`` as int8 with per-channel zero points
``zero - 128``, and the stored fp16 scales, which a double holds exactly), each static
``ActQuantizer`` its scale and zero point. PyTorch's quantized conv requantizes its
output to 8 bits, so a conv followed by a ReLU site writes straight into that site's
grid (zero point 0: the clamp at 0 is the ReLU), the residual add uses ``add_relu``
into the block-output site's grid, and the second conv of each block, whose output
the float model adds to the shortcut unquantized, gets one more 8-bit point
calibrated here: the only place the integer model differs from the simulated one.
The classifier head (average pool and the ``W8A8Linear``) runs as frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.activation import ActFormat
from lowbit.nn.qconv import QConv
from lowbit.nn.qmodule import QModule, QSite
from lowbit.nn.quantizers import ActQuantizer

# the extra point after each block's second conv: 8-bit, one static range, signed values
BLOCK_OUTPUT_FORMAT = ActFormat(8, "tensor", dynamic=False, symmetric=False)


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


def uint8_params(q: ActQuantizer) -> tuple[float, int]:
    """``(scale, zero point)`` of ``q``'s grid as PyTorch's ``quint8`` holds it.

    An asymmetric grid is already ``[0, 255]``; a symmetric one ``[-128, 127]`` with zero 0
    is the same grid shifted by 128 codes."""
    zero = int(q.zero.reshape(()))
    return float(q.scale.reshape(())), zero + (128 if q.fmt.symmetric else 0)


def check_act(name: str, q: ActQuantizer) -> None:
    """Refuse an activation point that PyTorch's per-tensor uint8 kernels cannot reproduce."""
    f = q.fmt
    if f is None or f.bits != 8 or f.dynamic or f.granularity != "tensor" or q.scale is None:
        how = "float" if f is None else f.describe()
        raise ValueError(f"{name}: activations must be 8-bit, static, per-tensor and calibrated, not {how}")
    if any(getattr(q, t) is not None for t in ("input_shift", "input_scale", "perm")) or q.outlier_threshold:
        raise ValueError(f"{name}: an activation transform or outlier split has no int8 conv equivalent")


def relu_grid(name: str, site: nn.Module) -> tuple[float, int]:
    """The grid a conv writes into when a ReLU site follows it: zero point 0, so the clamp is the ReLU."""
    if not isinstance(site, QSite) or site.output_q is None:
        raise ValueError(f"{name}: expected a ReLU site quantizing its output (quantize with act_bits=8)")
    check_act(name, site.output_q)
    scale, zero = uint8_params(site.output_q)
    if zero != 0:
        raise ValueError(f"{name}: a ReLU site with a non-zero zero point ({zero}); the clamp would not be a ReLU")
    return scale, zero


def int8_weight(name: str, conv: QConv) -> torch.Tensor:
    """The conv's stored codes as PyTorch's per-channel ``qint8`` weight (same values exactly)."""
    f = conv.fmt
    if f.kind != "int" or f.bits != 8 or f.group_size != -1:
        raise ValueError(f"{name}: {f.describe()} weights; int8 execution needs W8A8 (bits=8, per channel)")
    if conv.dims != 2 or isinstance(conv.padding, str):
        raise ValueError(f"{name}: int8 execution runs 2-D convs with numeric padding")
    qw = conv.quantized_weight
    codes = qw.codes().reshape(qw.shape).to(torch.int16) - 128
    zeros = qw.zero_or_default().reshape(-1).to(torch.int64) - 128
    return torch._make_per_channel_quantized_tensor(codes.to(torch.int8), qw.scale.reshape(-1).double(), zeros, 0)


class Int8Conv(nn.Module):
    """One frozen ``QConv`` as a quantized conv writing into ``(out_scale, out_zero)``."""

    def __init__(self, name: str, conv: QConv, out_scale: float, out_zero: int):
        super().__init__()
        weight = int8_weight(name, conv)
        self.conv = torch.ao.nn.quantized.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                                 stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                                 groups=conv.groups)  # fmt: skip
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.conv.set_weight_bias(weight, bias)
        self.conv.scale, self.conv.zero_point = out_scale, out_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _qconv(name: str, module: nn.Module) -> QConv:
    if not isinstance(module, QConv):
        raise ValueError(f"{name}: expected a frozen QConv, found {type(module).__name__}")
    return module


class Int8Block(nn.Module):
    def __init__(self, name: str, block: nn.Module, out2: ActQuantizer):
        super().__init__()
        relu1 = relu_grid(f"{name}.relu1", block.relu1)
        self.conv1 = Int8Conv(f"{name}.conv1", _qconv(f"{name}.conv1", block.conv1), *relu1)
        self.conv2 = Int8Conv(f"{name}.conv2", _qconv(f"{name}.conv2", block.conv2), *uint8_params(out2))
        self.out2 = out2  # the extra 8-bit point, kept so the simulation can be given it too
        self.shortcut = block.shortcut
        self.out_scale, self.out_zero = relu_grid(f"{name}.relu2", block.relu2)

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        if isinstance(self.shortcut, nn.Identity):
            s = x
        else:  # parameter-free subsample and zero-pad: exact on the grid (its zero point is 0)
            s = torch.quantize_per_tensor(self.shortcut(x.dequantize()), x.q_scale(), x.q_zero_point(), torch.quint8)
        return torch.ops.quantized.add_relu(y, s, self.out_scale, self.out_zero)


def block_names(q: nn.Module) -> list[str]:
    return [f"{s}.{i}" for s in ("layer1", "layer2", "layer3") for i in range(len(getattr(q, s)))]


def check_frozen(q: nn.Module) -> None:
    """Refuse a model still in simulate mode, or without quantized activations at its input."""
    if any(isinstance(m, QModule) for m in q.modules()):
        raise ValueError("the model is still in simulate mode; pass what lowbit.quantize returned (frozen)")
    stem = q.conv1
    if not (isinstance(stem, QSite) and isinstance(stem.module, QConv) and len(stem.input_q) == 1):
        raise ValueError("conv1 does not quantize its input: int8 execution needs act_bits=8")
    check_act("conv1 input", stem.input_q[0])


class Int8ResNet(nn.Module):
    """The integer form of a ResNetCifar that ``lowbit.quantize(..., bits=8, act_bits=8)`` returned."""

    def __init__(self, q: nn.Module, images: torch.Tensor):
        super().__init__()
        check_frozen(q)
        self.engine = pick_engine()
        torch.backends.quantized.engine = self.engine
        self.in_scale, self.in_zero = uint8_params(q.conv1.input_q[0])
        self.stem = Int8Conv("conv1", q.conv1.module, *relu_grid("relu", q.relu))
        outs = self._calibrate_block_convs(q, images)
        self.blocks = nn.Sequential(*[Int8Block(n, q.get_submodule(n), outs[n]) for n in block_names(q)])
        self.pool, self.linear = q.pool, q.linear

    @staticmethod
    def _calibrate_block_convs(q: nn.Module, images: torch.Tensor) -> dict[str, ActQuantizer]:
        """An 8-bit range for each block's second conv output (min-max observer), on ``images``."""
        observers, hooks = {}, []
        for name in block_names(q):
            obs = ActQuantizer(BLOCK_OUTPUT_FORMAT, "minmax", channel_dim=1)
            obs.begin_observing()
            observers[name] = obs
            conv2 = q.get_submodule(f"{name}.conv2")
            hooks.append(conv2.register_forward_hook(lambda m, a, o, obs=obs: obs.accumulate(o)))
        try:
            with torch.no_grad():
                for i in range(0, images.shape[0], 256):
                    q(images[i : i + 256])
        finally:
            for h in hooks:
                h.remove()
        for obs in observers.values():
            obs.finish_observing()
            obs.eval()
        return observers

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.backends.quantized.engine != self.engine:
            raise RuntimeError(f"the quantized engine changed to {torch.backends.quantized.engine} after packing")
        qx = torch.quantize_per_tensor(x.float(), self.in_scale, self.in_zero, torch.quint8)
        y = self.blocks(self.stem(qx)).dequantize()
        return self.linear(torch.flatten(self.pool(y), 1))
