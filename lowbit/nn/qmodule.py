"""The one quantized-module family: ``QModule`` wraps a weighted op, ``QSite`` a
quantization point that holds no weight.

``QModule`` runs ``input_q -> weight_q -> op``: QLinear-to-be and QConv-to-be differ
only in the op (``F.linear``, ``F.conv1d``, ``F.conv2d``). It simulates (fake
quantization, differentiable: what reconstruction and QAT train) and
``freeze()`` returns the packed runtime module that runs on real kernels:
``QLinear`` (weight-only), ``W8A8Linear`` (integer activations), ``QConv``
(weight-only; behind a ``QSite`` holding its static input quantizer when
activations are quantized).

The wrapped weight is kept as ``weight`` in the op's own layout: ``[out, in]`` for
linears (transformers' GPT-2 ``Conv1D`` stores ``[in, out]`` and is transposed once
here), ``[out, in/groups, *kernel]`` for convs. When the input quantizer permutes
channels (PEG, RPTQ), the weight is quantized in that permuted column order, the
order the integer kernel stores.

``QSite`` puts activation quantizers on a module's inputs and/or output: a ReLU's
or softmax's output, the operands of ``q @ k^T``, a residual add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.nn.quantizers import ActQuantizer, WeightQuantizer, matrix

CONV_KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def op_kind(module: nn.Module) -> str | None:
    """``linear``, ``conv1d`` or ``conv2d`` for the modules a ``QModule`` can wrap, else ``None``."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    for cls, kind in CONV_KINDS.items():
        if type(module) is cls:
            return kind
    return None


class QModule(nn.Module):
    """A weighted op in simulate mode; see the module docstring."""

    def __init__(self, module: nn.Module, fmt: WeightFormat, input_q: ActQuantizer | None = None):
        super().__init__()
        kind = op_kind(module)
        if kind is None:
            raise TypeError(f"QModule wraps nn.Linear, Conv1D, nn.Conv1d or nn.Conv2d, not {type(module).__name__}")
        self.kind = kind
        self.source = type(module).__name__
        w = module.weight.detach()
        if is_hf_conv1d(module):
            w = w.t()
        self.weight = nn.Parameter(w.float().clone().contiguous(), requires_grad=False)
        bias = getattr(module, "bias", None)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        self.conv = None
        if kind != "linear":
            if getattr(module, "padding_mode", "zeros") != "zeros":
                raise ValueError(f"convs with padding_mode={module.padding_mode!r} are not supported; use zeros")
            self.conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                             groups=module.groups)  # fmt: skip
        self.weight_q = WeightQuantizer(fmt)
        self.input_q = input_q if input_q is not None else ActQuantizer(None, channel_dim=self.channel_dim)

    @property
    def channel_dim(self) -> int:
        return -1 if self.kind == "linear" else 1

    @property
    def in_features(self) -> int:
        """Width of the weight's matrix view (what GPTQ's Hessian is over)."""
        return matrix(self.weight).shape[1]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * (self.conv["groups"] if self.conv else 1)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    # --- the weight in the order the kernel stores it ---------------------------------

    @property
    def perm(self) -> torch.Tensor | None:
        return self.input_q.perm

    def stored_weight(self) -> torch.Tensor:
        """The float weight in stored column order (permuted like the activations, if they are)."""
        w = self.weight
        return w if self.perm is None else w[:, self.perm.to(w.device)]

    def quantized_weight_value(self) -> torch.Tensor:
        """The simulated weight in the input's own column order."""
        wq = self.weight_q(self.stored_weight())
        if self.perm is None:
            return wq
        return wq[:, torch.argsort(self.perm.to(wq.device))]

    # --- statistics the methods ask for ---------------------------------------------------

    def weight_rows(self, v: torch.Tensor) -> torch.Tensor:
        """What the weight's matrix view multiplies, ``[rows, in_features]``: a linear's input
        tokens, a conv's unfolded patches (``v``: the transformed, unquantized input)."""
        if self.kind == "linear":
            return v.reshape(-1, v.shape[-1])
        c = self.conv
        k, s, d = tuple(self.weight.shape[2:]), tuple(c["stride"]), tuple(c["dilation"])
        p = c["padding"]
        if isinstance(p, str):  # 'valid': none; 'same': what the conv pads (one more on the far side if odd)
            pads = []
            for i in reversed(range(len(k))):
                total = 0 if p == "valid" else d[i] * (k[i] - 1)
                pads += [total // 2, total - total // 2]
            v, p = F.pad(v, pads), (0,) * len(k)
        if self.kind == "conv1d":
            v = v.unsqueeze(-1)
            k, s, p, d = (k[0], 1), (s[0], 1), (p[0], 0), (d[0], 1)
        cols = F.unfold(v, k, dilation=d, padding=p, stride=s)  # [N, C*kh*kw, L], channel-major: groups contiguous
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    @property
    def weight_groups(self) -> int:
        """How many independent blocks of columns ``weight_rows`` has (a grouped conv's groups)."""
        return self.conv["groups"] if self.conv else 1

    # --- forward ----------------------------------------------------------------------

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if self.kind == "linear":
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        fn = F.conv1d if self.kind == "conv1d" else F.conv2d
        return fn(x, w.to(x.dtype), None if b is None else b.to(x.dtype), **self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.input_q(x), self.quantized_weight_value())

    # --- freezing ---------------------------------------------------------------------

    def freeze(self, kernel: str = "auto", input_grid: ActQuantizer | None = None) -> nn.Module:
        """The packed runtime module computing what this one simulates.

        ``input_grid``: the static grid this layer's input already lies on (the output quantizer
        of the site that feeds it, and nothing else), for a conv that does not quantize its own
        input: re-quantizing a value on its grid returns it, so the conv can take its input as
        integers and run on the integer kernels."""
        from lowbit.nn.qconv import QConv
        from lowbit.nn.qlinear import QLinear
        from lowbit.nn.w8a8 import W8A8Linear
        from lowbit.nn.w8a8conv import W8A8Conv, fits

        qw = self.weight_q.freeze(self.stored_weight().detach())
        aq = self.input_q
        bias = None if self.bias is None else self.bias.detach()
        if self.kind == "linear":
            if aq.fmt is None:
                if aq.input_shift is not None or aq.input_scale is not None:
                    raise ValueError("a weight-only linear cannot carry an input transform; quantize activations")
                if _plain_uniform(input_grid):  # its input already lies on that grid: integer kernels
                    g = frozen_act(input_grid)
                    return W8A8Linear(qw, bias, g.fmt, act_scale=g.scale, act_zero=g.zero)
                return QLinear(qw, bias, kernel)
            if not aq.fmt.uniform or aq.token_bits is not None:
                # a log / twin grid or widths per token: quantized in simulation, then the weight-only kernel
                return QSite(QLinear(qw, bias, kernel), [frozen_act(aq)], None)
            return W8A8Linear(qw, bias, aq.fmt, act_scale=aq.scale, act_zero=aq.zero, act_bounds=aq.bounds,
                              perm=aq.perm, input_shift=aq.input_shift, input_scale=aq.input_scale,
                              outlier_threshold=aq.outlier_threshold)  # fmt: skip
        dims = 1 if self.kind == "conv1d" else 2
        grid = aq if aq.fmt is not None else input_grid
        plain = grid is not None and grid.perm is None and grid.input_shift is None and grid.input_scale is None \
            and grid.token_bits is None
        if plain and not grid.outlier_threshold and fits(qw, grid.fmt, self.conv["groups"]) is None:
            g = frozen_act(grid)
            return W8A8Conv(qw, bias, g.fmt, act_scale=g.scale, act_zero=g.zero, dims=dims, **self.conv)
        conv = QConv(qw, bias, dims=dims, **self.conv)
        if aq.fmt is None:
            return conv
        return QSite(conv, [frozen_act(aq)], None)

    def describe(self) -> str:
        return self.weight_q.describe()

    def extra_repr(self) -> str:
        return f"{self.source} {tuple(self.weight.shape)}"


def _plain_uniform(grid: ActQuantizer | None) -> bool:
    """A static per-tensor uniform grid with nothing else attached (no transform, permutation or outliers)."""
    return grid is not None and grid.per_tensor_grid and grid.scale is not None and grid.input_shift is None and \
        grid.input_scale is None and not grid.outlier_threshold and grid.token_bits is None  # fmt: skip


def frozen_act(q: ActQuantizer) -> ActQuantizer:
    """A copy of ``q`` fixed for inference (no learning, no dropping)."""
    q.freeze_scale()
    out = ActQuantizer(q.fmt, q.observer, q.percentile, q.channel_dim)
    for name in ("scale", "zero", "perm", "bounds", "input_shift", "input_scale", "token_bits"):
        value = getattr(q, name)
        setattr(out, name, None if value is None else value.detach().clone())
    out.outlier_threshold = q.outlier_threshold
    return out.eval()


class QSite(nn.Module):
    """``output_q(module(input_q[0](a), input_q[1](b), ...))``: quantization points on an op
    without weights (or on a frozen runtime module's input)."""

    def __init__(self, module: nn.Module, input_q: list[ActQuantizer | None] | None = None,
                 output_q: ActQuantizer | None = None, role: str = ""):  # fmt: skip
        super().__init__()
        self.role = role  # what the module computes (the adapter's SiteSpec.role): softmax, mlp_act, ...
        self.module = module
        self.input_q = nn.ModuleList([q if q is not None else ActQuantizer(None) for q in input_q or []])
        self.output_q = output_q

    def forward(self, *args, **kwargs):
        qs = list(self.input_q)
        args = tuple(qs[i](a) if i < len(qs) else a for i, a in enumerate(args))
        out = self.module(*args, **kwargs)
        return self.output_q(out) if self.output_q is not None else out

    def quantizers(self) -> list[ActQuantizer]:
        qs = [q for q in self.input_q if q.quantizes]
        return qs + ([self.output_q] if self.output_q is not None else [])

    def to_config(self) -> dict:
        """What a checkpoint records to rebuild this site around its module."""
        return {
            "inputs": [None if not q.quantizes else _act_config(q) for q in self.input_q],
            "output": None if self.output_q is None else _act_config(self.output_q),
            "role": self.role,
        }

    @classmethod
    def from_config(cls, module: nn.Module, cfg: dict) -> QSite:
        ins = [None if c is None else _act_from_config(c) for c in cfg.get("inputs", [])]
        out = None if cfg.get("output") is None else _act_from_config(cfg["output"])
        return cls(module, ins, out, cfg.get("role", ""))


def _act_config(q: ActQuantizer) -> dict:
    return {"format": q.fmt.to_dict(), "observer": q.observer, "channel_dim": q.channel_dim,
            "outlier_threshold": q.outlier_threshold}  # fmt: skip


def _act_from_config(c: dict) -> ActQuantizer:
    q = ActQuantizer(ActFormat.from_dict(c["format"]), c.get("observer", "minmax"), channel_dim=c.get("channel_dim", -1))
    q.outlier_threshold = c.get("outlier_threshold")
    return q


def quantized_modules(root: nn.Module) -> list[tuple[str, QModule]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, QModule)]


def set_quantization(root: nn.Module, on: bool) -> None:
    """Switch every quantizer under ``root`` on or off (off: the float model, for targets)."""
    for m in root.modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            m.enabled = on

