"""lowbit's 4-bit weight-only GPU kernel in Triton: ``y = x @ dequantize(W).T (+ bias)``.

For fp16, bf16 and fp32 activations ``x: [M, K]`` on CUDA, with 4-bit integer
weights as ``QuantizedWeight`` stores them (grouped, per-channel or per-tensor;
asymmetric with uint8 zero points or symmetric with zero 8; a ragged last group
when the group does not divide K). Products accumulate in fp32. Triton is an
optional dependency: this module imports it only on first use, and
``available()`` says whether it can run here.

GPU layout, built once per device from the stored weight (the checkpoint keeps
lowbit's own layout):

- ``qweight``: int32 ``[ceil(K/8), N]``. Word ``(j, n)`` holds codes ``8j .. 8j+7``
  of output row ``n``, code ``8j+i`` in bits ``4i .. 4i+3``. That is lowbit's
  stored little-endian nibble order, so each row's words are its stored bytes
  (padded with zero bytes to whole words) read as int32; the layout only
  transposes them, so that a tile's loads run along N and coalesce.
- ``scales``: ``[G, N]`` in the stored dtype (fp16, or fp32 where fp16 would
  change a scale; bf16 after ``model.to(torch.bfloat16)``); ``zeros``: uint8
  ``[G, N]`` or ``None`` (symmetric). Per-tensor and per-channel parameters are
  expanded to ``[N, G]`` first, then transposed.

The kernel needs the 8 codes of a word to share one group: the group size is a
multiple of 8, or there is a single group (per-channel, per-tensor).

Tiling. A program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` over a span
of K, ``8 * BLOCK_KW`` codes per K step, every code dequantized as ``(q - z) * s``
in fp32 (exactly lowbit's dequantization).

- ``BLOCK_M == 1`` (a decode step's GEMV): the step's ``[BLOCK_KW, BLOCK_N]`` words
  and their scales / zeros are loaded once and worked through as 8 nibble planes
  (plane ``i`` holds codes ``8j + i``), fp32 products into a 2-D accumulator
  reduced once at the end; exact to fp32 rounding (before the output's rounding
  to x's dtype) for every activation dtype. The next step's words are loaded
  before this step's arithmetic (Triton's software pipelining covers only loads
  that feed ``tl.dot``).
- ``BLOCK_M >= 16``: the whole ``[8 * BLOCK_KW, BLOCK_N]`` tile, row ``k`` reading
  word ``k // 8`` at shift ``4 * (k % 8)`` (a word is loaded by its 8 rows, from
  L1), dequantized and rounded to x's dtype (fp16 / bf16) for one ``tl.dot`` on
  tensor cores against x's contiguous ``[BLOCK_M, 8 * BLOCK_KW]`` tile, loads
  pipelined over ``num_stages``; fp32 activations use ieee fp32 products (no
  tf32), so an fp32 model stays exact to fp32 rounding, as on CPU. M is padded
  to the tile: 2 to 16 rows run one 16-row tile, the tensor cores' smallest.
- Split-K (``split_k > 1``, grid axis 2): when the output tiles are too few to
  fill the GPU (a GEMV has N / BLOCK_N of them), each K span is reduced by its
  own program and added atomically into a zeroed fp32 ``y``, then cast to x's
  dtype; the bias is added by the first span only.

Configurations are tried per M bucket (1, 16, 32, 64, 128, larger), N, K and
dtypes on first use (``CANDIDATES``; each with split-K off and with the split
that fills about two waves of SMs) and the fastest full call is kept for the
process; ``LOWBIT_TRITON_AUTOTUNE=0`` skips the search and runs each bucket's
first candidate.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch

from lowbit.formats import integer
from lowbit.quantized_weight import QuantizedWeight

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WAVES = 2  # split-K aims at this many programs per SM when the output tiles are too few


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` works (the kernel also needs a GPU: see ``available``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # absent, or an install broken enough to fail import: the fallback runs
        return False
    return True


def available(device: torch.device | None = None) -> bool:
    """Whether the kernel runs here: triton imports and ``device`` (default: the current
    CUDA device) is an Ampere or newer GPU (bf16 tensor cores; older GPUs keep ``dequant``)."""
    if not torch.cuda.is_available() or not triton_importable():
        return False
    index = None if device is None or device.type != "cuda" else device.index
    return torch.cuda.get_device_capability(index)[0] >= 8


def supported(qw: QuantizedWeight) -> bool:
    """Whether the kernel runs ``qw``: 4-bit integer codes, even K (whole bytes per row), and a
    group of a multiple of 8 codes unless there is one group. Scales may be any of ``DTYPES``
    (``model.to(torch.bfloat16)`` casts a layer's stored scales too); the kernel reads them as fp32."""
    fmt = qw.fmt
    if fmt.kind != "int" or fmt.bits != 4 or qw.scale.dtype not in DTYPES:
        return False
    _, k = qw.matrix_shape
    group = integer.effective_group_size(k, fmt.group_size)
    return k % 2 == 0 and (group % 8 == 0 or group >= k)


@dataclass(frozen=True)
class Config:
    """One launch configuration; ``split_k=0`` takes the split that fills the GPU."""

    block_m: int
    block_n: int
    block_kw: int  # 32-bit words per K step (8 codes each)
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0

    def __str__(self) -> str:
        split = f"split {self.split_k}" if self.split_k else "split auto"
        return (
            f"{self.block_m}x{self.block_n}x{8 * self.block_kw} (MxNxK) {self.num_warps} warps "
            f"{self.num_stages} stages {split}"
        )


def _small_m(block_m: int) -> list[Config]:
    return [
        Config(block_m, 64, 16, num_stages=4),
        Config(block_m, 128, 16, num_stages=4),
        Config(block_m, 64, 32, num_stages=3),
        Config(block_m, 128, 32, num_warps=8, num_stages=3),
        Config(block_m, 256, 16, num_warps=8, num_stages=3),
        Config(block_m, 32, 32, num_stages=4),
        Config(block_m, 32, 64, num_stages=3),
        Config(block_m, 64, 64, num_warps=8, num_stages=2),
    ]


_LARGE = [
    Config(128, 128, 8, num_warps=8, num_stages=4),
    Config(64, 128, 8, num_stages=4),
    Config(128, 256, 8, num_warps=8, num_stages=3),
    Config(64, 256, 8, num_warps=8, num_stages=3),
    Config(128, 128, 16, num_warps=8, num_stages=3),
    Config(64, 64, 16, num_stages=4),
]

# per M bucket; the first of each list is the configuration run without autotuning. A GEMV
# streams its weight once: deep K steps (up to 1024 codes) keep enough loads in flight per SM
# that a narrow N tile fills the GPU without split-K, whose zeroing and cast cost two launches
CANDIDATES: dict[int, list[Config]] = {
    1: [
        Config(1, 64, 32),
        Config(1, 32, 64),
        Config(1, 32, 128, num_warps=8),
        Config(1, 64, 64, num_warps=8),
        Config(1, 16, 128, num_warps=4),
        Config(1, 128, 16),
    ],
    16: _small_m(16),
    32: _small_m(32),
    64: _small_m(64),
    128: _LARGE,
    256: _LARGE,
}


def m_bucket(m: int) -> int:
    """The autotuning bucket of ``m`` rows: 1, 16, 32, 64, 128, or 256 for anything larger."""
    if m <= 1:
        return 1
    return min(max(16, 1 << (m - 1).bit_length()), 256)


def split_for(cfg: Config, m: int, n: int, kw: int, sms: int) -> int:
    """How many K spans ``cfg`` reduces separately: its own ``split_k``, or (0) enough
    programs for about ``WAVES`` per SM when the output tiles alone are fewer than the SMs."""
    k_steps = math.ceil(kw / cfg.block_kw)
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_steps))
    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    if tiles >= sms:
        return 1
    return max(1, min(k_steps, math.ceil(WAVES * sms / tiles)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (CPU tensors): a few splits, so split-K runs in its tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def _as_groups(t: torch.Tensor, n: int, ngroups: int) -> torch.Tensor:
    """A per-tensor, per-channel or per-group parameter as ``[n, ngroups]``."""
    return t.reshape(1, 1).expand(n, ngroups) if t.numel() == 1 else t.reshape(n, ngroups)


class Packed:
    """The GPU layout of one 4-bit weight (see the module docstring) and the kernel that reads it."""

    def __init__(self, qw: QuantizedWeight, device: torch.device):
        if not supported(qw):
            raise ValueError(
                f"the triton_w4a16 kernel cannot run {qw.fmt.describe()} with shape {qw.shape}: it needs 4-bit "
                "integer codes, an even K, and a group size that is a multiple of 8; use kernel='dequant'"
            )
        self.n, self.k = qw.matrix_shape
        self.group = integer.effective_group_size(self.k, qw.fmt.group_size)
        self.kw = math.ceil(self.k / 8)
        ngroups = math.ceil(self.k / self.group)
        rows = torch.zeros(self.n, 4 * self.kw, dtype=torch.uint8, device=device)  # whole words per row
        rows[:, : self.k // 2] = qw.packed.to(device).reshape(self.n, self.k // 2)  # 2 codes a byte
        self.qweight = rows.view(torch.int32).t().contiguous()  # [KW, N]
        self.scales = _as_groups(qw.scale.to(device), self.n, ngroups).t().contiguous()  # [G, N]
        zero = None if qw.zero is None else _as_groups(qw.zero.to(device), self.n, ngroups)
        self.zeros = None if zero is None else zero.to(torch.uint8).t().contiguous()  # [G, N]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[N, K]`` from this layout, with PyTorch ops (equal to ``QuantizedWeight.dequantize``)."""
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=self.qweight.device).view(1, 8, 1)
        codes = ((self.qweight.unsqueeze(1) >> shifts) & 0xF).reshape(-1, self.n)[: self.k].t()  # [N, K]
        scale = self._per_column(self.scales.float())
        zero = 8 if self.zeros is None else self._per_column(self.zeros.to(torch.int32))
        return ((codes - zero).float() * scale).to(dtype)

    def _per_column(self, p: torch.Tensor) -> torch.Tensor:
        """``p: [G, N]`` broadcast to ``[N, K]``."""
        return p.t().repeat_interleave(self.group, 1)[:, : self.k]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
        """``x @ dequantize(W).T (+ bias)`` for ``x: [..., K]``, in x's dtype.

        ``config`` forces a launch configuration (tests run every candidate);
        by default the fastest for this shape is found on first use. Differentiable
        in ``x`` and ``bias`` (the weight is frozen): the backward pass is
        ``grad @ dequantize(W)`` in fp32.
        """
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features in its last dimension; this weight takes {self.k}")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"the triton_w4a16 kernel runs on CUDA tensors, got x on {x.device}; "
                "move the layer and its input to a GPU, or use kernel='auto' (lowbit's CPU kernels on CPU)"
            )
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            y = _Matmul.apply(x, self, config)
            return y if bias is None else y + bias.to(y.dtype)
        return self._forward(x, None if bias is None else bias.detach(), config)

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None, config: Config | None) -> torch.Tensor:
        flat = x.detach().reshape(-1, self.k)
        if x.dtype not in DTYPES:  # float64 and the like: PyTorch's matmul in that dtype
            y = flat @ self.dequantize(x.dtype).t()
            y = y if bias is None else y + bias.to(y.dtype)
            return y.view(*x.shape[:-1], self.n)
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.n)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        if bias is not None:
            bias = bias.to(flat.device).contiguous()
        cfg = config or self.config_for(flat, bias)
        return launch(flat, self, bias, cfg).view(*x.shape[:-1], self.n)

    def config_for(self, flat: torch.Tensor, bias: torch.Tensor | None = None) -> Config:
        """The configuration a call with ``flat: [M, K]`` runs: tuned on the first call of its
        M bucket (the candidates timed there), or the bucket's first without autotuning."""
        bucket = m_bucket(flat.shape[0])
        if os.environ.get("LOWBIT_TRITON_AUTOTUNE") == "0" or flat.device.type != "cuda":
            return CANDIDATES[bucket][0]
        has = (self.zeros is not None, bias is not None)
        key = (bucket, self.n, self.k, self.group, *has, flat.dtype, self.scales.dtype, flat.device)
        if key not in _TUNED:
            _TUNED[key] = _tune(flat, self, bias)
        return _TUNED[key]


_TUNED: dict[tuple, Config] = {}


def launch(flat: torch.Tensor, packed: Packed, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """Run the kernel once: ``flat: [M, K]`` (unit stride along K) -> ``y: [M, N]`` in flat's dtype."""
    m = flat.shape[0]
    splits = split_for(cfg, m, packed.n, packed.kw, _sm_count(flat.device))
    kw_per_split = math.ceil(math.ceil(packed.kw / cfg.block_kw) / splits) * cfg.block_kw
    splits = math.ceil(packed.kw / kw_per_split)  # rounding the span up can leave fewer spans
    atomic = splits > 1
    if atomic:
        y = torch.zeros((m, packed.n), dtype=torch.float32, device=flat.device)
    else:
        y = torch.empty((m, packed.n), dtype=flat.dtype, device=flat.device)
    grid = (math.ceil(m / cfg.block_m), math.ceil(packed.n / cfg.block_n), splits)
    run = functools.partial(_kernel()[grid], *_arguments(flat, packed, bias, y, kw_per_split))
    if flat.device.type == "cuda" and flat.device.index != torch.cuda.current_device():
        with torch.cuda.device(flat.device):  # triton launches on the current device
            run(**_meta(cfg, packed, bias, atomic))
    else:
        run(**_meta(cfg, packed, bias, atomic))
    return y if y.dtype == flat.dtype else y.to(flat.dtype)


@functools.cache
def _kernel():
    from lowbit.kernels.triton_w4a16_jit import w4a16_kernel

    return w4a16_kernel


def _arguments(flat, packed: Packed, bias, y, kw_per_split: int) -> tuple:
    """The kernel's arguments in its order (see ``triton_w4a16_jit.w4a16_kernel``)."""
    return (
        flat,
        packed.qweight,
        packed.scales,
        packed.scales if packed.zeros is None else packed.zeros,  # a placeholder the kernel never reads
        packed.scales if bias is None else bias,
        y,
        flat.shape[0],
        packed.n,
        packed.k,
        packed.kw,
        packed.group,
        flat.stride(0),
        y.stride(0),
        kw_per_split,
    )


def _meta(cfg: Config, packed: Packed, bias, atomic: bool) -> dict:
    """The kernel's compile-time parameters."""
    return dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_KW=cfg.block_kw,
        HAS_ZERO=packed.zeros is not None,
        HAS_BIAS=bias is not None,
        ATOMIC=atomic,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _tune(flat: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> Config:
    """The fastest candidate of ``flat``'s M bucket, timing whole calls (split-K's zeroing and
    cast included); a candidate that does not compile here (too much shared memory) is skipped."""
    from triton.testing import do_bench

    m, sms = flat.shape[0], _sm_count(flat.device)
    tried: dict[Config, float] = {}
    error = None
    for cfg in CANDIDATES[m_bucket(m)]:
        for split in sorted({1, split_for(cfg, m, packed.n, packed.kw, sms)}):
            option = replace(cfg, split_k=split)
            try:
                call = functools.partial(launch, flat, packed, bias, option)
                tried[option] = do_bench(call, warmup=5, rep=20, return_mode="median")
            except Exception as e:  # triton's OutOfResources (shared memory) and the like: not a candidate here
                error = e
    if not tried:
        raise RuntimeError(
            f"no triton_w4a16 configuration ran for M={m}, N={packed.n}, K={packed.k} (the last error: {error!r}); "
            "use kernel='dequant' for this layer"
        ) from error
    return min(tried, key=tried.get)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, config):
        ctx.packed, ctx.dtype = packed, x.dtype
        return packed._forward(x, None, config)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.packed.dequantize(torch.float32)  # [N, K]
        return (grad.float() @ w).to(ctx.dtype), None, None
