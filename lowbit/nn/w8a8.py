"""W8A8Linear: integer activations times integer weights, accumulated exactly.

The input is transformed and quantized on the way in:

    v = ((x - input_shift) * input_scale)[:, perm]        (each step optional)
    a = round(v / s_a) + z_a - z_a ...                    (``formats.activation``)
    y = sum over K-segments of  s_w s_a  sum_k a (w - z_w)  + bias

``input_shift`` / ``input_scale`` carry equivalent transformations that no
neighbouring layer could absorb exactly (SmoothQuant's and Outlier
Suppression+'s, in post-LayerNorm encoders); ``perm`` groups channels for
per-group activation scales (PEG, RPTQ), and the stored weight's columns are in
that permuted order. With ``outlier_threshold`` (LLM.int8(), Dettmers et al.,
2022) the feature columns holding any activation above it bypass the integer
path and multiply the dequantized weights in floating point.

Kernels: lowbit's AVX2 integer kernel (``kernels/int8.py``) on CPUs that have it;
``torch._int_mm`` where it runs on int8 dot-product hardware (CUDA, VNNI/AMX
CPUs) and the layer fits it (8-bit symmetric activations, per-channel weights,
no groups or permutation); otherwise an exact float64 reference, which is also
what every kernel is tested against.
"""

from __future__ import annotations

import torch

from lowbit.formats import activation as A
from lowbit.formats.activation import ActFormat
from lowbit.kernels import int8 as int8_kernel
from lowbit.nn.qlinear import QLinear
from lowbit.quantized_weight import QuantizedWeight

KERNELS = ("auto", "int8_avx2", "int_mm", "reference")


def _buffer(t, dtype=None) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t).detach().clone().reshape(-1)
    return t.to(dtype) if dtype is not None else t


class W8A8Linear(QLinear):
    """Integer weights (2-8 bits, per-channel or per-group) x integer activations (2-8 bits)."""

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        act: ActFormat | None = None,
        *,
        act_scale=None,
        act_zero=None,
        act_bounds=None,
        perm=None,
        input_shift=None,
        input_scale=None,
        outlier_threshold: float | None = None,
        kernel: str = "auto",
    ):
        if qw.outliers is not None or qw.lowrank is not None or qw.scale_q is not None or qw.residual is not None:
            raise ValueError(
                "a layer with weights kept in fp16 (outliers, a low-rank term) or quantized scales runs "
                "weight-only; W8A8 cannot hold them"
            )
        act = act or ActFormat()
        if qw.fmt.kind != "int" or qw.fmt.group_size is None:
            raise ValueError(
                f"integer activations need integer weights per channel or per group, not {qw.fmt.describe()}"
            )
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        k = qw.shape[1]
        super().__init__(qw, bias, kernel="dequant")
        self.act = act
        self.outlier_threshold = outlier_threshold
        self.w8a8_kernel = kernel
        groups = 1
        if act.granularity == "group":
            if act_bounds is None:
                raise ValueError("per-group activations need act_bounds (group boundaries over the input channels)")
            bounds = _buffer(act_bounds, torch.long)
            groups = bounds.numel() - 1
            if groups < 1 or int(bounds[0]) != 0 or int(bounds[-1]) != k or bool((bounds.diff() < 0).any()):
                raise ValueError(f"act_bounds must rise from 0 to in_features={k}")
        if not act.dynamic:
            if act_scale is None:
                raise ValueError("static activations need act_scale from calibration")
            scale = _buffer(act_scale, torch.float32)
            if scale.numel() != groups or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"act_scale must hold {groups} positive finite value(s)")
            zero = _buffer(act_zero if act_zero is not None else torch.zeros(groups), torch.float32)
        else:
            scale = zero = None
        self.register_buffer("act_scale", scale)
        self.register_buffer("act_zero", zero)
        self.register_buffer("act_bounds", _buffer(act_bounds, torch.long) if act.granularity == "group" else None)
        if perm is not None:
            perm = _buffer(perm, torch.long)
            if perm.numel() != k or not torch.equal(perm.sort().values, torch.arange(k)):
                raise ValueError(f"perm must be a permutation of the {k} input channels")
        self.register_buffer("perm", perm)
        for name, value in (("input_shift", input_shift), ("input_scale", input_scale)):
            value = _buffer(value, torch.float32)
            if value is not None and value.numel() != k:
                raise ValueError(f"{name} must hold in_features={k} values")
            self.register_buffer(name, value)
        if kernel == "int_mm" and not self._int_mm_fits():
            raise ValueError(
                "kernel='int_mm' takes 8-bit symmetric per-token or per-tensor activations and per-channel "
                f"4- or 8-bit weights, not {act.describe()} with {qw.fmt.describe()}; use kernel='auto'"
            )
        if kernel == "int8_avx2" and int8_kernel.extension() is None:
            raise ValueError("lowbit's AVX2 int8 kernel is not available on this machine; use kernel='auto'")

    # --- what the layer computes -------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in the input's channel order (applied after the input transform)."""
        w = super().weight
        return w if self.perm is None else w[:, torch.argsort(self.perm.to(w.device))]

    def transform_input(self, flat: torch.Tensor) -> torch.Tensor:
        """``(x - input_shift) * input_scale``, in the input's own channel order."""
        if self.input_shift is not None:
            flat = flat - self.input_shift.to(flat.device)
        if self.input_scale is not None:
            flat = flat * self.input_scale.to(flat.device)
        return flat

    def select_kernel(self, device: torch.device, rows: int = 1) -> str:
        if self.w8a8_kernel != "auto":
            return self.w8a8_kernel
        if self._int_mm_fits() and (device.type == "cuda" or int8_kernel.has_fast_int_mm()):
            return "int_mm"
        if device.type == "cpu" and int8_kernel.extension() is not None:
            return "int8_avx2"
        return "int_mm" if self._int_mm_fits() and device.type == "cuda" else "reference"

    def _int_mm_fits(self) -> bool:
        """8-bit activations, symmetric (per token or tensor) or static per tensor (either kind: an
        asymmetric code is shifted into int8 and the shift added back exactly), per-channel 4- or
        8-bit weights, no groups of activations or permutation."""
        a = self.act
        grid = a.symmetric and a.granularity != "group" or (not a.dynamic and a.granularity == "tensor")
        return a.bits == 8 and grid and self.perm is None and self.scales.shape[1] == 1 and self.fmt.bits in (4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        kernel = self._cache.get(("kernel", x.device))
        if kernel is None:
            kernel = self._cache[("kernel", x.device)] = self.select_kernel(x.device, flat.shape[0])
        outlier_part = None
        shift, premul = self.input_shift, self.input_scale
        if self.outlier_threshold is not None:
            # LLM.int8(): feature columns with any |v| above the threshold stay in floating point
            flat, shift, premul = self.transform_input(flat), None, None
            cols = (flat.abs() > self.outlier_threshold).any(0).nonzero().flatten()
            if cols.numel():
                outlier_part = flat[:, cols] @ self.weight.to(flat.device)[:, cols].t()
                flat = flat.index_fill(1, cols, 0.0)
        if kernel == "int8_avx2":
            y = self._run_avx2(flat, shift, premul)
        elif kernel == "int_mm":
            y = self._run_int_mm(flat, shift, premul)
        else:
            y = self.reference(flat, shift, premul)
        if outlier_part is not None:
            y = y + outlier_part
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    # --- the three paths --------------------------------------------------------

    def _prepare(self, kernel: str, device: torch.device):
        key = (kernel, device)
        if key not in self._cache:
            qw = self.quantized_weight
            if kernel == "int8_avx2":
                self._cache[key] = int8_kernel.pack(qw)
            elif kernel == "int_mm":
                mid = 1 << (qw.fmt.bits - 1)
                w = (qw.codes().to(torch.int16) - mid).to(torch.int8).to(device)  # [N, K] signed
                offset = None
                if qw.zero is not None and bool((qw.zero != mid).any()):
                    offset = (qw.zero.reshape(-1).to(torch.int32) - mid).to(device)
                w_sum = w.sum(1, dtype=torch.int32).to(device)  # per output: what a constant input shift adds
                self._cache[key] = (w.t().contiguous(), qw.scale.float().reshape(-1).to(device), offset, w_sum)
            else:
                self._cache[key] = qw.dequantize(torch.float64).to(device)
        return self._cache[key]

    def _run_avx2(self, flat, shift, premul) -> torch.Tensor:
        w = self._prepare("int8_avx2", flat.device)
        return int8_kernel.int8_linear(
            flat, w, self.act, self.bias, self.act_scale, self.act_zero, self.act_bounds, self.perm, shift, premul
        )

    def _run_int_mm(self, flat, shift, premul) -> torch.Tensor:
        w_t, w_scale, offset, w_sum = self._prepare("int_mm", flat.device)
        a = self.act
        ext = int8_kernel.extension() if flat.device.type == "cpu" else None
        # the integer input is q - z; as int8 it is q' = q - 128 (asymmetric) or q (symmetric), so
        # (q - z) = q' + c with c = 128 - z or 0, and sum (q' + c)(w - o) = q'w - o sum q' + c sum(w - o)
        c = 0
        if ext is not None and a.dynamic and a.symmetric and a.granularity == "token":
            # the usual W8A8: the codes in one C++ pass over x instead of eight tensor operations
            xq, s = ext.quantize_tokens_int8(
                flat.contiguous(), None if shift is None else shift.float(), None if premul is None else premul.float()
            )
            s = s.reshape(-1, 1)
        else:
            v = self._transform(flat, shift, premul)
            s = A.dynamic_params(v, a)[0] if a.dynamic else self.act_scale.to(v.device).reshape(1, 1)
            if not a.symmetric:
                z = self.act_zero.to(v.device).reshape(1, 1)
                q = (torch.round(v / s) + z).clamp(*a.code_range)
                xq = (q - 128).to(torch.int8)
                c = 128 - int(self.act_zero.reshape(-1)[0])
            else:
                xq = A.codes(v, s, torch.zeros_like(s), a).to(torch.int8)
        acc = int8_matmul(xq, w_t)
        if offset is not None:
            acc = acc - xq.sum(-1, keepdim=True, dtype=torch.int32) * offset
        if c:
            acc = acc + c * (w_sum - (w_t.shape[0] * offset if offset is not None else 0))
        if ext is not None:  # one pass over the output instead of four
            rows = s.float().reshape(-1).expand(acc.shape[0]).contiguous()
            bias = None if self.bias is None else self.bias.detach().float()
            return ext.rescale_int32(acc.contiguous(), rows, w_scale, bias)
        y = acc.float() * s * w_scale
        return y + self.bias.float() if self.bias is not None else y

    def reference(self, flat: torch.Tensor, shift=None, premul=None) -> torch.Tensor:
        """Exact float64 fake-quant computation of what the integer kernels compute."""
        v = self._transform(flat, shift, premul)
        if self.perm is not None:
            v = v[:, self.perm.to(v.device)]
        xq = A.fake_quantize(v, self.act, self.act_scale, self.act_zero, self.act_bounds)
        y = xq.double() @ self._prepare("reference", flat.device).t()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.float()

    @staticmethod
    def _transform(flat, shift, premul) -> torch.Tensor:
        if shift is not None:
            flat = flat - shift.to(flat.device)
        if premul is not None:
            flat = flat * premul.to(flat.device)
        return flat

    def extra_repr(self) -> str:
        extra = f", act={self.act.describe()}"
        if self.perm is not None:
            extra += ", permuted"
        if self.input_scale is not None or self.input_shift is not None:
            extra += ", input transform"
        if self.outlier_threshold is not None:
            extra += f", outlier_threshold={self.outlier_threshold}"
        return super().extra_repr() + extra


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t [K, N] int8 -> int32``; exact, with a fallback where ``_int_mm`` refuses."""
    try:
        return torch._int_mm(a, b_t)
    except RuntimeError:  # e.g. CUDA's shape rules (M > 16, K and N multiples of 8)
        return (a.double() @ b_t.double()).round().to(torch.int32)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> int8 codes and per-row scales ``[M, 1]`` (symmetric absmax)."""
    fmt = ActFormat(bits)
    scale, zero = A.dynamic_params(x.float(), fmt)
    return A.codes(x.float(), scale, zero, fmt).to(torch.int8), scale
