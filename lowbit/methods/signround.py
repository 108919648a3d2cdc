"""SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs", 2023; the method behind Intel's auto-round).

Each weight gets a rounding offset ``v`` in ``[-0.5, 0.5]`` added before rounding,
and each group's min and max get factors ``alpha, beta`` in ``[0, 1]`` (the range
shrinks, never grows):

    scale = (beta * max - alpha * min) / (2^b - 1),  zero = round(-alpha * min / scale)
    W_q = scale * (clamp(round(W / scale + v) + zero, 0, 2^b - 1) - zero)

(symmetric grids: ``scale = max(beta * max, -alpha * min) / (2^(b-1) - 1)``, zero fixed).
All of them are learned together for a whole unit (a transformer block) by signed
gradient descent on the squared error between the unit's output on the quantized
model's inputs and the float unit's output on the float inputs: every step moves
each parameter by ``lr`` times the sign of its gradient, ``lr`` decaying linearly from
``1 / iters`` to 0, so ``v`` can travel at most about half a step in total -- enough to
flip a rounding, never further. The parameters of the step with the lowest loss are
kept. The scale is rounded to its storage dtype inside the loop (straight-through),
so the codes learned are the codes stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.adaround import acts_off, calibrate_acts, draw, recon_error
from lowbit.methods.base import MethodConfig, register
from lowbit.methods.brecq import _as_samples, _runner, _stack

INITS = ("mse", "minmax")


@register
@dataclass
class SignRound(MethodConfig):
    """SignRound: a unit's rounding offsets and range factors by signed gradient descent.

    ``iters`` steps on ``batch_size`` random calibration examples each (the paper's 200 and 8);
    ``lr`` for the rounding offsets and ``minmax_lr`` for the range factors default to
    ``1 / iters``; ``tune_range=False`` keeps the min-max range (rounding only). ``accumulate``: random
    batches whose gradients one step sums. ``init``: where the range factors start: ``mse`` (lowbit's
    default: at the shrink of each group's range that the RTN clip search picks; MiniLM, 128 WikiText-2
    windows, cosine loss w4 g128 0.0118 / w3 g128 0.0421) or ``minmax`` (the paper's 1: 0.0123 / 0.0437).
    Starting from GPTQ's codes measured worse (0.0141 at w4 g128), so it is not offered."""

    name = "signround"
    needs_calibration = True
    needs_float_inputs = True

    iters: int = 200
    batch_size: int = 8
    accumulate: int = 1
    lr: float | None = None
    minmax_lr: float | None = None
    tune_range: bool = True
    init: str = "mse"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.format != "int":
            raise ValueError(f"signround learns rounding on integer grids; format {self.format!r} is not supported")
        if self.iters < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError(f"iters ({self.iters}), batch_size ({self.batch_size}) and accumulate "
                             f"({self.accumulate}) must be positive")  # fmt: skip
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not one of {', '.join(INITS)}")
        for knob in ("lr", "minmax_lr"):
            value = getattr(self, knob)
            if value is not None and value <= 0:
                raise ValueError(f"{knob} ({value}) must be positive")

    def quantize(self, unit) -> None:
        modules = unit.qmodules()
        if not modules:
            return calibrate_acts(unit)
        if not unit.inputs:  # nothing reached this unit: the min-max grid, recorded as a fallback
            for qm in modules.values():
                qm.weight_q.init_params(qm.stored_weight(), f"rtn (fallback: {self.name} saw no calibration input)")
            return calibrate_acts(unit)
        inputs, _ = _as_samples(unit)
        target = _stack(unit.float_outputs(), inputs)
        with acts_off(unit):
            stats = self.optimise(_runner(unit, inputs), list(modules.items()), inputs, target)
        unit.log.append({"unit": unit.name, **stats})
        unit.changed()
        calibrate_acts(unit)

    def optimise(self, run, modules: list, inputs, target) -> dict:
        """Signed gradient descent on ``modules``' (``[(name, QModule)]``) SignRound parameters so that
        ``run(inputs)`` matches ``target``; fixes the best step's codes. Returns the losses seen."""
        lr = self.lr if self.lr is not None else 1.0 / self.iters
        minmax_lr = self.minmax_lr if self.minmax_lr is not None else lr
        params = {name: qm.weight_q.start_signed_rounding(qm.stored_weight()) for name, qm in modules}
        for name, qm in modules:
            if self.init == "mse":
                _mse_factors(qm.stored_weight(), qm.weight_q.fmt, *params[name][1:])
        touched = dict.fromkeys(params, False)
        g = torch.Generator().manual_seed(self.seed)
        best, best_loss, first, last = None, float("inf"), None, None
        try:
            for step in range(self.iters):
                for ps in params.values():
                    for p in ps:
                        p.grad = None
                value = 0.0
                for _ in range(self.accumulate):  # the step's gradient (and loss) over several random batches
                    out, tgt, _ = draw(run, inputs, target, g, self.batch_size)
                    loss = recon_error(out, tgt) / self.accumulate
                    if step < self.iters - 1:
                        loss.backward()
                    value += float(loss.detach())
                if value < best_loss:  # the parameters this loss was measured with
                    best_loss = value
                    best = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
                first = value if first is None else first
                last = value
                if step == self.iters - 1:
                    break
                decay = 1.0 - step / self.iters  # linear decay to 0
                with torch.no_grad():
                    for name, (v, lo_f, hi_f) in params.items():
                        if v.grad is not None and bool(v.grad.any()):
                            touched[name] = True
                        _signed_step(v, lr * decay, -0.5, 0.5)
                        if self.tune_range:
                            _signed_step(lo_f, minmax_lr * decay, 0.0, 1.0)
                            _signed_step(hi_f, minmax_lr * decay, 0.0, 1.0)
        except BaseException:
            for _, qm in modules:  # leave no half-learned state behind
                qm.weight_q.signed = None
            raise
        for name, qm in modules:
            label = (
                self.name if touched[name] else f"rtn (fallback: {self.name} saw no calibration input for this layer)"
            )
            qm.weight_q.finish_signed_rounding(qm.stored_weight(), label, None if best is None else best[name])
        return {"first_loss": first, "best_loss": best_loss, "last_loss": last}


def _mse_factors(w: torch.Tensor, fmt, lo_factor: torch.Tensor, hi_factor: torch.Tensor) -> None:
    """Start the range factors at each group's MSE-optimal shrink of its min-max range (the RTN clip search)
    instead of 1."""
    from lowbit.formats import integer

    m = w.detach().float().reshape(w.shape[0], -1)
    groups = integer.to_groups(m, fmt.group_size) if fmt.group_size is not None else m.reshape(1, 1, -1)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale, _ = integer.mse_params(m, fmt.bits, fmt.group_size, fmt.symmetric)
    full, _ = integer.params_from_range(lo, hi, fmt.bits, fmt.symmetric)
    with torch.no_grad():
        p = (scale / full).clamp(0.0, 1.0)  # the shrink the search picked (ranges shrink as one factor)
        lo_factor.copy_(p)
        hi_factor.copy_(p)


def _signed_step(p: torch.Tensor, lr: float, lo: float, hi: float) -> None:
    """``p -= lr * sign(grad)``, kept in ``[lo, hi]``."""
    if p.grad is not None:
        with torch.no_grad():
            p.sub_(lr * torch.sign(p.grad)).clamp_(lo, hi)
