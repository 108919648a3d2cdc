"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020), and the reconstruction loop BRECQ and QDrop reuse.

Each weight rounds down or up: ``W_q = s * (floor(W / s) + h(V) - z)`` with the
rectified sigmoid ``h``. ``V`` is learned to minimise the reconstruction error of
a layer's (AdaRound) or a unit's (BRECQ, QDrop: a residual block, a transformer
block, the stem or the head) output plus ``lambda * sum(1 - |2 h(V) - 1|^beta)``,
whose ``beta`` anneals from 20 to 2 after a warm-up without it, driving every
``h`` to 0 or 1; then the rounding is fixed.

The loop works on any unit the engine hands it: its inputs from the quantized
model (and, for QDrop, the float model's), its float target, and ``unit.run``.
Inputs that are lone tensors (CNN activations) are sampled per example; inputs
with keyword arguments (a decoder layer's mask and rotary embeddings) per
calibration batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.search import shrink_factors
from lowbit.methods.base import MethodConfig, register
from lowbit.nn.qmodule import QModule
from lowbit.nn.quantizers import ActQuantizer

# Every reconstruction method starts from the same per-group MSE weight grid (L2 error,
# ranges shrunk from 1 down to 0.21 in steps of 0.01: the initialisation BRECQ and QDrop use),
# so they differ only in how they round.
INIT_FACTORS = shrink_factors(80, 0.01)
INIT_NORM = 2.0


def channel_dim(y: torch.Tensor) -> int:
    """Where the channels of an output are: dim 1 of a conv's ``[N, C, H, W]``, else the last."""
    return 1 if y.dim() == 4 else -1


def recon_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over channels and averaged over samples and positions (the scale the
    papers' regulariser weight 0.01 is set for), optionally weighted per element (BRECQ's Fisher)."""
    err = (out - target).pow(2)
    if weight is not None:
        err = err * weight
    return err.sum(channel_dim(err)).mean()


@register
@dataclass
class AdaRound(MethodConfig):
    """AdaRound, layer by layer: each quantized module's rounding is fitted to its float output on
    the inputs the quantized model gives it, activations off; then activation ranges are calibrated.

    ``iters`` per layer (or unit) on batches of ``batch_size``; Adam on ``V`` at ``lr`` (the papers
    run 20,000 steps at 1e-3; a few hundred steps need a larger rate); the regulariser weighs
    ``reg_weight`` (0.01, as in the papers) and is off for the first ``warmup`` of the iterations;
    ``beta`` anneals linearly from ``beta_start`` to ``beta_end``. ``act_lr``: Adam's rate for
    learned activation step sizes (LSQ), cosine-annealed; the papers' 4e-5 suits 20,000 steps and
    barely moves a scale in a few hundred, so the default is 4e-3 (ResNet-20 W4A4 BRECQ at 100 steps,
    2,000 test images: 76.8% at 4e-5, 78.8% at 4e-3). Adam moves a parameter by about its rate
    per step whatever the parameter's size, so each step size's rate is also capped at
    ``act_lr_rel`` (4%) of its starting value: 8-bit grids have step sizes ten times smaller than
    4-bit ones, and 4e-3 moved them by a fifth per step (CIFAR ViT W8A8, 10,000 test images:
    QDrop 71.07 at 4e-3 against 71.71 at 4e-5, RTN 71.67). ``drop_prob``: QDrop's probability of keeping
    an activation in float; ``fisher``: weight the output error by squared gradients (BRECQ)."""

    name = "adaround"
    needs_calibration = True
    needs_float_inputs = True

    iters: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    act_lr: float = 4e-3
    act_lr_rel: float = 0.04
    drop_prob: float = 0.0
    fisher: bool = False
    learn_act_scales: bool = False
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.format != "int":
            raise ValueError(f"{self.name} learns rounding on integer grids; format {self.format!r} is not supported")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"iters ({self.iters}) and batch_size ({self.batch_size}) must be positive")
        if self.act_lr <= 0 or self.act_lr_rel <= 0:
            raise ValueError(f"act_lr ({self.act_lr}) and act_lr_rel ({self.act_lr_rel}) must be positive")

    # --- the engine's hooks ----------------------------------------------------------------

    def quantize(self, unit) -> None:
        modules = init_grids(unit, self.name)
        if not modules:
            return calibrate_acts(unit)
        with acts_off(unit):
            targets = layer_targets(unit, list(modules))
            for name, qm in modules.items():
                x_q = layer_inputs(unit, name)
                x_fp, target = targets[name]
                stats = self.reconstruct(lambda x, qm=qm: qm(x), [qm], [], x_q, target, x_fp=None)
                unit.log.append({"layer": name, **stats})
                unit.changed([name])
        calibrate_acts(unit)

    # --- the loop --------------------------------------------------------------------------

    def beta_at(self, step: int) -> float | None:
        """The regulariser's exponent at ``step``, or ``None`` during the warm-up."""
        start = int(self.warmup * self.iters)
        if step < start:
            return None
        t = (step - start) / max(1, self.iters - start)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1 - t)

    def reconstruct(self, run, layers: list[QModule], acts: list[ActQuantizer], x_q, target, *,
                    learn_rounding: bool = True, learn_acts: bool = False, x_fp=None, weight=None) -> dict:  # fmt: skip
        """Optimise ``layers``' rounding (and ``acts``' step sizes) so that ``run(x_q)`` matches ``target``.

        ``x_q``/``x_fp``/``target``/``weight``: stacked tensors ``[samples, ...]`` (sampled per
        example) or lists of per-batch ``(args, kwargs)`` / tensors (sampled per batch). ``x_fp``:
        the same inputs computed in float, mixed in per element with probability ``drop_prob``
        (QDrop). ``weight``: per-element weights of the squared error (BRECQ's Fisher diagonal).
        Returns the first and last reconstruction losses."""
        g = torch.Generator().manual_seed(self.seed)
        groups = []
        if learn_rounding:
            groups.append({"params": [m.weight_q.start_soft_rounding(m.stored_weight()) for m in layers],
                           "lr": self.lr})  # fmt: skip
        scales = [s for a in acts if a.enabled for s in [a.learn_scale()] if s is not None] if learn_acts else []
        for s in scales:  # each step size's own rate: at most act_lr, and at most act_lr_rel of its start
            lr = min(self.act_lr, self.act_lr_rel * float(s.detach().abs().mean()))
            groups.append({"params": [s], "lr": lr, "base_lr": lr})
        if not groups:
            return {}
        opt = torch.optim.Adam(groups)
        drops = [(a, a.drop_prob) for a in acts]
        for a in acts:
            a.drop_prob = self.drop_prob
            a.train()
        first = last = None
        rng = torch.random.fork_rng(devices=[])  # QDrop's drop masks from the seed, not the caller's RNG state
        rng.__enter__()
        torch.manual_seed(self.seed)
        try:
            for step in range(self.iters):
                out, tgt, w = self._sample(run, x_q, x_fp, target, weight, g)
                rec = recon_error(out, tgt, w)
                loss = rec
                beta = self.beta_at(step) if learn_rounding else None
                if beta is not None:
                    loss = loss + self.reg_weight * sum(m.weight_q.round_regularizer(beta) for m in layers)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if scales:  # cosine-annealed step-size learning rates
                    for group in opt.param_groups:
                        if group.get("base_lr") is not None:
                            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / self.iters))
                opt.step()
                if scales:
                    with torch.no_grad():
                        for s in scales:
                            s.clamp_(min=1e-8)
                first = float(rec.detach()) if first is None else first
                last = float(rec.detach())
        finally:
            rng.__exit__(None, None, None)
            for a, p in drops:
                a.drop_prob = p
                a.eval()
            if learn_rounding:
                for m in layers:
                    m.weight_q.harden(m.stored_weight())
            for a in acts:
                a.freeze_scale()
        return {"first_loss": first, "last_loss": last}

    def _sample(self, run, x_q, x_fp, target, weight, g):
        return draw(run, x_q, target, g, self.batch_size, x_fp=x_fp, drop_prob=self.drop_prob, weight=weight)


def draw(run, x_q, target, g: torch.Generator, batch_size: int, *, x_fp=None, drop_prob: float = 0.0, weight=None):
    """One step's output, target and weight: ``batch_size`` random examples of stacked inputs, or as many
    random rows of one random calibration batch; inputs dropped to float per element with ``drop_prob``."""
    if torch.is_tensor(x_q):
        idx = torch.randint(x_q.shape[0], (min(batch_size, x_q.shape[0]),), generator=g)
        x = x_q[idx]
        if x_fp is not None and drop_prob > 0:
            keep = torch.rand(x.shape, generator=g) < drop_prob
            x = torch.where(keep, x_fp[idx], x)
        return run(x), target[idx], None if weight is None else weight[idx]
    b = int(torch.randint(len(x_q), (1,), generator=g))
    args, kwargs = x_q[b]
    h = args[0]
    rows = torch.randperm(h.shape[0], generator=g)[: min(batch_size, h.shape[0])]
    args = tuple(_rows(a, rows, h.shape[0]) for a in args)
    kwargs = {k: _rows(v, rows, h.shape[0]) for k, v in kwargs.items()}
    if x_fp is not None and drop_prob > 0:
        h, f = args[0], x_fp[b][0][0][rows]
        keep = torch.rand(h.shape, generator=g) < drop_prob
        args = (torch.where(keep, f, h), *args[1:])
    w = None if weight is None else weight[b][rows]
    return run(*args, **kwargs), target[b][rows], w


def _rows(value, rows: torch.Tensor, batch: int):
    """``value`` restricted to the sampled examples where it has a batch dimension (masks and
    rotary tables broadcast over the batch keep their single row)."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    return value


# --- shared steps of the reconstruction methods --------------------------------------------------


def init_grids(unit, method: str) -> dict[str, QModule]:
    """Every quantized module of the unit on the shared MSE weight grid, nearest rounding."""
    modules = unit.qmodules()
    for qm in modules.values():
        qm.weight_q.init_params(qm.stored_weight(), method, mse=True, mse_norm=INIT_NORM, factors=INIT_FACTORS)
    unit.changed()
    return modules


def unit_quantizers(unit) -> list[ActQuantizer]:
    return [q for m in unit.modules() for q in m.modules() if isinstance(q, ActQuantizer) and q.quantizes]


class acts_off:
    """Activation quantization of the unit off for the block (weights are fitted first)."""

    def __init__(self, unit):
        self.unit = unit
        self.qs = unit_quantizers(unit)

    def __enter__(self):
        for q in self.qs:
            q.enabled = False
        self.unit.changed()

    def __exit__(self, *exc):
        for q in self.qs:
            q.enabled = True
        self.unit.changed()


def calibrate_acts(unit) -> None:
    """Static activation ranges of the unit, point by point in execution order, each observed with
    everything before it already quantized (the weights stay as they are)."""
    if not any(q.static for q in unit_quantizers(unit)):
        return
    for group in unit.groups():
        unit.stats(group, weights=False)
        unit.changed(group)


def layer_targets(unit, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's float input and output on the unit's float inputs (one pass, quantizers off)."""
    ins = {n: [] for n in names}
    outs = {n: [] for n in names}
    hooks = []

    def keep(_m, args, out, n):
        ins[n].append(args[0].detach())
        outs[n].append(out.detach())

    for n in names:
        hooks.append(unit.get(n).register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)))
    try:
        unit.float_outputs()
    finally:
        for h in hooks:
            h.remove()
    return {n: (torch.cat(ins[n]), torch.cat(outs[n])) for n in names}


def layer_inputs(unit, name: str) -> torch.Tensor:
    """The inputs module ``name`` receives from the quantized unit (as rounded so far)."""
    got = []
    h = unit.get(name).register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()))
    try:
        unit.outputs()
    finally:
        h.remove()
    return torch.cat(got)
