"""QLinear: a weight-only quantized ``nn.Linear`` that holds packed weights."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.sparse import Outliers
from lowbit.formats.spec import WeightFormat
from lowbit.kernels import avx512, cpu, lut, triton_w4a16, vq, wq
from lowbit.quantized_weight import EXTRAS, QuantizedWeight

KERNELS = ("auto", "native", "lut", "vq", "triton_w4a16", "int4_avx512", "int4_cpu", "int8_cpu", "dequant")
BF16_KERNELS = ("int4_avx512", "int4_cpu", "int8_cpu")  # round activations to bf16: opt-in only


def input_permutation(perm, in_features: int) -> torch.Tensor | None:
    """``perm`` as a ``long [in_features]`` permutation, ``None`` for none or the identity.

    The identity is dropped so that a layer whose groups happen to be contiguous
    is an ordinary layer (no gather in forward, nothing extra saved or refused).
    """
    if perm is None:
        return None
    perm = torch.as_tensor(perm).detach().to(torch.long).reshape(-1).cpu().clone()
    if perm.numel() != in_features or not torch.equal(perm.sort().values, torch.arange(in_features)):
        raise ValueError(f"in_perm must be a permutation of the {in_features} input channels")
    return None if torch.equal(perm, torch.arange(in_features)) else perm


class QLinear(nn.Module):
    """``y = x[..., in_perm] @ dequantize(W).T + b`` computed by the fastest kernel for the device.

    The packed codes, scales and zero points are the module's state (what is
    saved). Kernels (``kernel``):

    - ``native`` (what ``auto`` picks on CPU for 4- and 8-bit integer weights):
      lowbit's kernels of ``kernels/wq.py``, AVX-512 / AVX2 / portable chosen at
      run time, fp32 activations and accumulation: the result equals
      dequantize-then-matmul to fp32 rounding on every CPU. They read the codes
      as stored; a few rows run a GEMV, more rows dequantized tiles and BLAS.
    - ``int4_avx512``, ``int4_cpu``, ``int8_cpu``: bf16 modes, only when asked
      for (activations rounded to bf16, so results move by ~1e-3): lowbit's
      AVX-512 BF16 GEMV and PyTorch's packed int4 / int8 kernels, whose layouts
      are derived on first use and cached (not saved).
    - ``triton_w4a16`` (what ``auto`` picks on a CUDA GPU, Ampere or newer, for
      4-bit integer weights whose group is a multiple of 8 codes, when triton is
      installed): lowbit's Triton kernel of ``kernels/triton_w4a16.py``, fp32
      accumulation. fp16 / bf16 inputs run on tensor cores (from 16 rows; the
      dequantized weight rounded to the input's dtype); fp32 inputs are not cast
      down but multiplied in fp32 (no tf32), so an fp32 model gets the same
      results as dequantize-then-matmul to fp32 rounding, as on CPU. Its layout
      (the stored words, transposed) is built on first use per device.
    - ``lut`` (what ``auto`` picks on CPU for table formats: ``lut``, ``nf4``, ``fp4``): lowbit's
      look-up-table kernel of ``kernels/lut.py``, each code looked up in its group's table held in
      registers, fp32 activations and accumulation (equal to dequantize-then-matmul to fp32
      rounding); kept outliers are added by the kernel in the same pass.
    - ``vq`` (what ``auto`` picks on CPU for vector-quantized weights, GPTVQ's ``vq``): lowbit's kernel of
      ``kernels/vq.py``, each index looked up in its block's codebook across 16 or 64 rows at once (for one
      row, the dot products of each vector with all codewords, formed once per block), fp32 activations and
      accumulation (equal to dequantize-then-matmul to fp32 rounding).
    - ``dequant``: dequantize, then ``x @ W.T`` (every other format, and GPUs
      without triton).

    Weights kept in fp16 beside the codes (``QuantizedWeight.outliers``: OWQ's weak columns)
    are added by PyTorch's sparse CSR matmul after the dense kernel, ``y += x @ S^T`` (by the
    ``lut`` kernel itself in the same pass), a low-rank term (``QuantizedWeight.lowrank``: LoRC)
    by two thin matmuls, ``y += (x V^T) U^T``, and REx's residual rows by their own QLinear.

    ``in_perm`` (optional) carries act-order checkpoints (GPTQ ``desc_act``):
    their groups are scattered over the input channels, and sorting the columns
    by group makes them an ordinary grouped weight. The stored weight keeps that
    sorted column order and the input is gathered to match before any kernel
    runs, so every kernel sees a plain grouped weight. ``weight`` (and
    ``dequantized_weight()``) return the columns in the input's own order.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        kernel: str = "auto",
        in_perm: torch.Tensor | None = None,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.out_features, self.in_features = qw.shape
        self.fmt = qw.fmt
        self.kernel = kernel
        self.register_buffer("qweight", qw.packed)
        self.register_buffer("scales", qw.scale)
        self.register_buffer("zeros", qw.zero if qw.zero is not None else None)
        self.register_buffer("in_perm", input_permutation(in_perm, self.in_features))
        for name, t in qw.extras().items():  # kept outliers, low-rank factors, second-level scales
            self.register_buffer(name, t)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._cache: dict = {}

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: WeightFormat, kernel: str = "auto") -> QLinear:
        return cls(QuantizedWeight.quantize(linear_weight(linear), fmt), linear.bias, kernel)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            packed=self.qweight.cpu(),
            scale=self.scales.cpu(),
            zero=None if self.zeros is None else self.zeros.cpu(),
            fmt=self.fmt,
            shape=(self.out_features, self.in_features),
        ).with_extras({n: None if getattr(self, n) is None else getattr(self, n).cpu() for n in EXTRAS})

    @property
    def outliers(self) -> Outliers | None:
        if self.outlier_val is None:
            return None
        return Outliers(self.outlier_crow.cpu(), self.outlier_col.cpu(), self.outlier_val.cpu())

    @property
    def has_terms(self) -> bool:
        """Whether terms beside the codes are added after the dense kernel (kept outliers, a low-rank
        term, REx's residual rows)."""
        return self.outlier_val is not None or self.lowrank_u is not None or self.rex_rows is not None

    def _add_outliers(self, y: torch.Tensor, x: torch.Tensor, sparse: bool = True) -> torch.Tensor:
        """``y + x @ S^T`` for the kept fp16 weights ``S``, ``+ (x @ V^T) @ U^T`` for a low-rank term and
        REx's residual rows on their own kernel (``x`` in stored column order)."""
        x2 = x.reshape(-1, x.shape[-1])
        if sparse and self.outlier_val is not None:  # sparse=False: the kernel added them
            key = ("outliers", x.device)
            if key not in self._cache:
                self._cache[key] = self.outliers.to_sparse(self.in_features, x.device)
            s = self._cache[key]
            y = y + torch.mm(s, x2.to(s.dtype).t()).t().reshape(y.shape).to(y.dtype)
        if self.lowrank_u is not None:
            key = ("lowrank", x.device)
            if key not in self._cache:
                f32 = torch.float32
                self._cache[key] = (self.lowrank_u.to(x.device, f32), self.lowrank_v.to(x.device, f32))
            u, v = self._cache[key]
            y = y + ((x2.float() @ v.t()) @ u.t()).reshape(y.shape).to(y.dtype)
        if self.rex_rows is not None:  # REx: a quantized residual of some rows, on its own layer's kernel
            key = ("rex", x.device)
            if key not in self._cache:
                rx = self.quantized_weight.residual
                self._cache[key] = (rx.rows.long().to(x.device), QLinear(rx.weight).to(x.device))
            rows, layer = self._cache[key]
            flat = y.reshape(-1, y.shape[-1])
            flat = flat.index_add(1, rows, layer(x2).to(flat.dtype))
            y = flat.reshape(y.shape)
        return y

    @property
    def act_order(self) -> bool:
        """Whether the stored columns are a permutation of the input channels (an act-order layer)."""
        return self.in_perm is not None

    def stored_weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in stored column order: what multiplies ``x[..., in_perm]``."""
        return self.quantized_weight.dequantize().to(self.scales.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in the input's channel order, so ``y = x @ weight.T + b``."""
        w = self.stored_weight()
        if self.in_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.in_perm.to(w.device)] = w  # stored column j is input channel in_perm[j]
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The dequantized weight in the input's channel order (the ``weight`` of the layer's subclass too)."""
        return self.weight

    def describe(self) -> str:
        """The weight format, marked ``act-order`` when the input is permuted before the kernel."""
        return self.fmt.describe() + (" act-order" if self.act_order else "")

    def select_kernel(self, device: torch.device, rows: int = 1) -> str:
        """The kernel a forward pass of ``rows`` rows on ``device`` uses."""
        if self.kernel != "auto":
            return self.kernel
        if device.type == "cpu" and wq.supported(self.quantized_weight) and wq.extension() is not None:
            return "native"
        if device.type == "cpu" and lut.supported(self.quantized_weight) and lut.extension() is not None:
            return "lut"
        if device.type == "cpu" and vq.supported(self.quantized_weight) and vq.extension() is not None:
            return "vq"
        if device.type == "cuda" and triton_w4a16.supported(self.quantized_weight) and triton_w4a16.available(device):
            return "triton_w4a16"
        return "dequant"

    def _prepare(self, kernel: str, device: torch.device):
        """The packed layout ``kernel`` runs on, built once per device and cached."""
        key = (kernel, device)
        if key not in self._cache:
            qw = self.quantized_weight
            if kernel == "native":
                self._cache[key] = wq.Packed(qw, device)
            elif kernel == "lut":
                self._cache[key] = lut.Packed(qw, device)
            elif kernel == "vq":
                self._cache[key] = vq.Packed(qw, device)
            elif kernel == "triton_w4a16":
                self._cache[key] = triton_w4a16.Packed(qw, device)
            elif kernel == "int4_avx512":
                if avx512.kernel_group(qw) is None or avx512.extension() is None:
                    raise ValueError(f"int4_avx512 cannot run {qw.fmt.describe()} with shape {qw.shape} here")
                self._cache[key] = (qw, qw.zero_or_default())
            elif kernel == "int4_cpu":
                self._cache[key] = cpu.pack_int4(qw, device)
            elif kernel == "int8_cpu":
                if not cpu.int8_supported(qw):
                    raise ValueError(f"int8_cpu needs 8-bit per-channel weights, not {qw.fmt.describe()}")
                self._cache[key] = cpu.pack_int8(qw, device)
            else:
                self._cache[key] = None
        return self._cache[key]

    def __getstate__(self):
        # caches hold kernel-specific packings (some not even copyable): rebuilt on first use
        return {**self.__dict__, "_cache": {}}

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._cache.get(x.device)
        if run is None:
            run = self._cache[x.device] = self._plan(x.device, x.numel() // max(x.shape[-1], 1))
        return run(x)

    def _plan(self, device: torch.device, rows: int):
        """The forward function of the kernel for ``device``, its layout bound once (a decode
        step calls every linear once per token, so the per-call Python stays small)."""
        kernel = self.select_kernel(device, rows)
        if kernel == "lut":
            packed = self._prepare(kernel, device)

            def run_lut(x):
                if self.in_perm is not None:
                    x = x.index_select(-1, self.in_perm)
                y = packed.matmul(x, bias=self.bias)  # kept outliers added in the kernel
                extra = self.lowrank_u is not None or self.rex_rows is not None
                return self._add_outliers(y, x, sparse=False) if extra else y

            return run_lut
        if kernel in ("native", "vq", "triton_w4a16"):
            packed = self._prepare(kernel, device)

            def run(x):
                if self.in_perm is not None:
                    x = x.index_select(-1, self.in_perm)  # every kernel sees a plain grouped weight
                y = packed.matmul(x, bias=self.bias)
                return self._add_outliers(y, x) if self.has_terms else y

            return run

        def run_other(x):
            if self.in_perm is not None:
                x = x.index_select(-1, self.in_perm)
            rows = x.numel() // max(x.shape[-1], 1)
            if kernel == "int4_avx512":
                if rows > avx512.MAX_ROWS:
                    raise ValueError(f"int4_avx512 takes at most {avx512.MAX_ROWS} rows, got {rows}; use kernel='auto'")
                qw, zero = self._prepare(kernel, x.device)
                y = avx512.int4_gemv(x, qw, zero, use_bf16=True)
            elif kernel == "int4_cpu":
                y = cpu.int4_mm(x, self._prepare(kernel, x.device))
            elif kernel == "int8_cpu":
                y = cpu.int8_mm(x, self._prepare(kernel, x.device))
            else:
                y = x @ self.stored_weight().to(x.dtype).t()  # outliers included
                return y if self.bias is None else y + self.bias.to(y.dtype)
            if self.has_terms:
                y = self._add_outliers(y, x)
            return y if self.bias is None else y + self.bias.to(y.dtype)

        return run_other

    def extra_repr(self) -> str:
        bpw = self.quantized_weight.bits_per_weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.describe()}, bits_per_weight={bpw:.3f}, kernel={self.kernel}"
        )


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as ``[out, in]`` (transformers' GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t()
    return module.weight.detach()
