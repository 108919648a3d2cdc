"""W8A8Conv: a conv with integer activations and integer weights, on the integer GEMM kernels.

A conv is a matrix product over its input patches: ``F.unfold`` lays each output
position's receptive field out as one row ``[C_in * k_h * k_w]`` (channel-major,
the order of the weight's matrix view ``[out, in * k...]``), so

    y[n, :, p] = W_matrix @ patch(x)[n, p] + b

and the patches go through ``W8A8Linear``'s kernels as they are: quantized to the
input's grid (one static scale and zero point per tensor), multiplied in int8 with
32-bit sums (``torch._int_mm`` on int8 dot-product hardware, lowbit's AVX2 kernel,
or the exact float64 reference), rescaled once. Zero padding is applied in float
before the patches are taken; 0 is a point of every grid, so a padded position
contributes exactly nothing, as in the simulation.

On CPUs with int8 dot-product instructions (VNNI, AMX) the conv runs instead on
oneDNN's int8 convolution, the one PyTorch's current x86 quantization flow lowers
to (``torch.ops.onednn.qconv2d_pointwise``: plain uint8/int8 tensors, a float32
output, no quantized tensor objects): the input quantized once to uint8 codes with
its zero point, the weight codes as int8 around their mid code, and the weight's
zero-point offset added back exactly from a box sum of the input codes. Without
VNNI oneDNN (like FBGEMM) may sum uint8 x int8 pairs in saturating 16 bits, so it is
not used there; the patches go through the GEMM kernels instead.

The simulation (``QModule``: fake-quantized input, dequantized weight, float conv)
and this module compute the same sums; they differ only in float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats.activation import ActFormat
from lowbit.kernels import int8 as int8_kernel
from lowbit.nn.qconv import QConv, _padding, _tuple
from lowbit.nn.w8a8 import W8A8Linear, int8_matmul
from lowbit.quantized_weight import QuantizedWeight


def onednn_available() -> bool:
    """oneDNN's int8 conv where it is exact: CPUs with int8 dot-product instructions."""
    return int8_kernel.has_fast_int_mm() and hasattr(torch.ops.onednn, "qconv2d_pointwise") and \
        torch.backends.mkldnn.is_available()  # fmt: skip


def fits(qw: QuantizedWeight, act: ActFormat | None, groups: int) -> str | None:
    """Why a conv with these weights and activations cannot run on the integer kernels, or ``None``."""
    if act is None:
        return "activations are not quantized"
    if not act.uniform:
        return f"{act.describe()} activations are not one uniform integer grid"
    if qw.fmt.kind != "int" or qw.fmt.group_size is None:
        return f"{qw.fmt.describe()} weights are not an integer grid"
    if groups != 1:
        return f"groups={groups}: grouped convs run as simulated"
    if act.dynamic or act.granularity != "tensor":
        return f"{act.describe()} activations: the patches repeat and pad the input, so only one static range per tensor maps onto them"
    return None


class W8A8Conv(W8A8Linear):
    """``conv(x, W) + b`` as ``patches(x) @ W_matrixᵀ`` with integer activations and weights."""

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        act: ActFormat | None = None,
        *,
        act_scale=None,
        act_zero=None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        dims: int,
        kernel: str = "auto",
    ):
        if qw.outliers is not None or qw.lowrank is not None or qw.scale_q is not None or qw.residual is not None:
            raise ValueError(
                "a layer with weights kept in fp16 (outliers, a low-rank term) or quantized scales runs "
                "weight-only; W8A8 cannot hold them"
            )
        conv_kernel = kernel
        kernel = "auto" if kernel == "onednn" else kernel
        if dims not in (1, 2):
            raise ValueError(f"dims={dims!r} is not supported; W8A8Conv runs 1-D and 2-D convs")
        shape = tuple(int(d) for d in qw.shape)
        if len(shape) != dims + 2:
            raise ValueError(f"a {dims}-D conv weight is [out, in, {', '.join(['k'] * dims)}], got shape {shape}")
        why = fits(qw, act, groups)
        if why is not None:
            raise ValueError(f"W8A8Conv cannot run this conv: {why}")
        matrix = QuantizedWeight(packed=qw.packed, scale=qw.scale, zero=qw.zero, fmt=qw.fmt, shape=qw.matrix_shape)
        super().__init__(matrix, bias, act, act_scale=act_scale, act_zero=act_zero, kernel=kernel)
        self.dims = dims
        self.weight_shape = shape
        self.out_channels, self.in_channels = shape[0], shape[1]
        self.kernel_size = shape[2:]
        self.stride = _tuple(stride, dims, "stride")
        self.padding = _padding(padding, dims)
        self.dilation = _tuple(dilation, dims, "dilation")
        self.groups = 1
        self.conv_kernel = conv_kernel
        if conv_kernel == "onednn" and not onednn_available():
            raise ValueError("oneDNN's int8 conv is not available (or not exact) on this machine; use kernel='auto'")

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the conv's own shape ``[out, in, *kernel]``."""
        return super().weight.reshape(self.weight_shape)

    @property
    def conv_quantized_weight(self) -> QuantizedWeight:
        """The stored weight with the conv's shape (what a checkpoint records)."""
        qw = self.quantized_weight
        return QuantizedWeight(packed=qw.packed, scale=qw.scale, zero=qw.zero, fmt=qw.fmt, shape=self.weight_shape)

    conv_config = QConv.conv_config  # the same geometry attributes, recorded the same way

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded as the conv pads it (``'same'`` may pad one more on the far side)."""
        if self.padding == "valid":
            return x
        pads = []
        for i in reversed(range(self.dims)):  # F.pad takes the last dimension first
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [self.padding[i], self.padding[i]]
        return F.pad(x, pads) if any(pads) else x

    def _symmetric_padding(self) -> list[int] | None:
        """The conv's padding as one ``[pad_h, pad_w]`` a kernel can apply itself, or ``None`` when
        it is uneven (``'same'`` with an even receptive field pads one more on the far side)."""
        if self.padding == "valid":
            return [0] * self.dims
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return [t // 2 for t in totals] if all(t % 2 == 0 for t in totals) else None
        return list(self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, in, *spatial] (or unbatched [in, *spatial]) -> [batch, out, *spatial']
        unbatched = x.dim() == self.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if self.padding == "same" and any(s != 1 for s in self.stride):
            raise ValueError("padding='same' needs stride 1 (as nn.Conv2d requires)")
        which = self._conv_kernel(x.device)
        pads = self._symmetric_padding() if which == "onednn" else None
        if pads is None:
            x = self._pad(x)
            pads = [0] * self.dims
        if self.dims == 1:  # a 1-D conv is a 2-D one over a height of 1
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *self.kernel_size), (1, *self.dilation), (1, *self.stride)
            pads = [0, *pads]
        else:
            kernel, dilation, stride = self.kernel_size, self.dilation, self.stride
        n = x.shape[0]
        if which == "onednn":
            y = self._onednn_conv(x, kernel, dilation, stride, pads)  # [N, out, H', W'], channels-last
        else:
            out_hw = [(x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
            if which == "int_mm":
                y = self._int_mm_conv(x, kernel, dilation, stride)  # [N, H', W', out]
            else:
                patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C * k..., L]
                y = super().forward(patches.transpose(1, 2)).reshape(n, *out_hw, self.out_channels)
            y = y.permute(0, 3, 1, 2)  # [N, out, H', W'] (channels-last in memory)
        if self.dims == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if unbatched else y

    def _conv_kernel(self, device: torch.device) -> str:
        key = ("conv kernel", device)
        if key not in self._cache:
            if self.conv_kernel == "onednn" or (
                self.conv_kernel == "auto" and device.type == "cpu" and onednn_available()
            ):
                self._cache[key] = "onednn"
            else:
                self._cache[key] = self.select_kernel(device)
        return self._cache[key]

    def _onednn_weight(self):
        """The weight for oneDNN: int8 codes ``code - mid`` (oneDNN takes symmetric weights only),
        the per-channel scales, and the offset ``zero - mid`` left over, ``None`` when it is 0
        everywhere. ``mid`` is each channel's zero point where its codes fit int8 around it (always
        below 8 bits), otherwise the nearest value that fits."""
        key = ("onednn", "weight")
        if key not in self._cache:
            qw = self.quantized_weight
            codes = qw.codes().to(torch.int16).reshape(self.out_channels, -1)
            zero = qw.zero_or_default().reshape(-1).round().to(torch.int16)
            hi, lo = codes.amax(1), codes.amin(1)
            mid = torch.minimum(torch.maximum(zero, hi - 127), lo + 128)  # code - mid in [-128, 127]
            w = (codes - mid[:, None]).to(torch.int8).reshape(self._weight_2d())
            offset = (zero - mid).to(torch.float64)  # [out]
            w_scale = qw.scale.reshape(-1).double().contiguous()
            self._cache[key] = (w.contiguous(), w_scale, offset if bool((offset != 0).any()) else None,
                                torch.zeros(w_scale.numel(), dtype=torch.long))  # fmt: skip
        return self._cache[key]

    def _weight_2d(self) -> tuple[int, ...]:
        shape = self.weight_shape
        return shape if self.dims == 2 else (shape[0], shape[1], 1, shape[2])

    def _input_grid(self) -> tuple[float, int, int, int]:
        """The input grid as uint8 codes (a symmetric grid is the uint8 one around 128): scale,
        zero point, lowest and highest code, fixed once frozen (cached: no tensor reads per call)."""
        key = ("onednn", "grid")
        if key not in self._cache:
            shift = 128 if self.act.symmetric else 0
            lo, hi = self.act.code_range
            z = int(self.act_zero.reshape(-1)[0]) + shift
            self._cache[key] = (float(self.act_scale.reshape(-1)[0]), z, lo + shift, hi + shift)
        return self._cache[key]

    def _onednn_conv(self, x: torch.Tensor, kernel, dilation, stride, pads) -> torch.Tensor:
        """``x`` quantized once to uint8, one oneDNN int8 conv (padding with the real 0, the zero
        point), float output ``[N, out, H', W']`` in channels-last memory."""
        w, w_scale, offset, w_zeros = self._onednn_weight()
        s_a, z, lo, hi = self._input_grid()
        codes = torch.div(x.float(), s_a).round_().add_(float(z)).clamp_(lo, hi)  # float32, integer-valued
        q = codes.to(torch.uint8, memory_format=torch.channels_last)
        key = ("onednn", tuple(stride), tuple(dilation), tuple(pads))
        if key not in self._cache:
            packed = torch.ops.onednn.qconv_prepack(w, w_scale, s_a, z, list(stride), list(pads), list(dilation), 1,
                                                    None)  # fmt: skip
            bias = self.bias.float().contiguous() if self.bias is not None else None
            coef = None if offset is None else (offset * w_scale * s_a).float()  # [out]
            self._cache[key] = (packed, bias, coef, list(stride), list(pads), list(dilation))
        packed, bias, coef, st, pd, dl = self._cache[key]
        y = torch.ops.onednn.qconv2d_pointwise(q, s_a, z, packed, w_scale, w_zeros, bias, st, pd, dl, 1, 1.0, 0,
                                               torch.float32, "none", [], "")  # fmt: skip
        if coef is not None:  # the weight integer is (code - mid) - offset: take offset x sum of the inputs back
            box = _box_sum(codes, z, kernel, dilation, stride, pads)  # [N, 1, H', W'], exact integers
            y.permute(0, 2, 3, 1).addcmul_(box.permute(0, 2, 3, 1), coef, value=-1)  # in place, channels-last order
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _int_mm_conv(self, x: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
        """Quantize ``x`` once, take int8 patches as strided views of the codes, one int8 GEMM.

        The int8 code ``q'`` stands for the integer ``q' + c`` (``c = 128 - z`` for an asymmetric
        grid shifted into int8, 0 for a symmetric one); ``c`` and the weight's zero-point offset
        ``o`` are added back exactly: ``sum (q' + c)(w - o) = q'·w - o sum q' + c (sum w - K o)``.
        Padding is already in ``x`` as float zeros, which quantize to ``q' = -c`` (the real 0)."""
        w_t, w_scale, offset, w_sum = self._prepare("int_mm", x.device)
        scale = self.act_scale.to(x.device).reshape(())
        shift = 0 if self.act.symmetric else 128
        zero = 0 if self.act.symmetric else int(self.act_zero.reshape(-1)[0])
        lo, hi = self.act.code_range
        q = torch.round(x.float() / scale).add_(zero).clamp_(lo, hi).sub_(shift).to(torch.int8)
        for dim, (k, d, st) in enumerate(zip(kernel, dilation, stride)):
            q = q.unfold(2 + dim, d * (k - 1) + 1, st)  # [..., H', (W',) span]
            if d > 1:
                q = q[..., ::d]
        n, c_in, ho, wo = q.shape[:4]
        patches = q.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1)  # rows: (C, kh, kw) like the weight
        acc = int8_matmul(patches, w_t)
        if offset is not None:
            acc = acc - patches.sum(-1, keepdim=True, dtype=torch.int32) * offset
        c = shift - zero
        if c:
            acc = acc + c * (w_sum - (patches.shape[1] * offset if offset is not None else 0))
        y = acc.float().mul_(scale * w_scale)
        if self.bias is not None:
            y = y.add_(self.bias.float())
        return y.reshape(n, ho, wo, self.out_channels).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, act={self.act.describe()}, "
            f"format={self.fmt.describe()}"
        )


def _box_sum(codes: torch.Tensor, z: int, kernel, dilation, stride, pads) -> torch.Tensor:
    """``sum (q - z)`` over every patch a conv reads (all channels, the kernel window, padding
    counted as the real 0) from the float32 codes ``q``, as exact integers ``[N, 1, H', W']``
    (float32 holds every integer below 2^24; wider sums are taken in float64)."""
    wide = codes.shape[1] * 255 * kernel[0] * kernel[1] >= 1 << 24
    a = (codes.double() if wide else codes).sum(1, keepdim=True).sub_(z * codes.shape[1]).contiguous()
    if all(d == 1 for d in dilation) and all(2 * p <= k for p, k in zip(pads, kernel)):
        return F.avg_pool2d(a, kernel, stride, pads, count_include_pad=True, divisor_override=1).float()
    ones = torch.ones(1, 1, *kernel, dtype=a.dtype, device=a.device)
    return F.conv2d(a, ones, stride=stride, padding=list(pads), dilation=dilation).float()
