"""PMQ (Xiao et al., "Patch-wise Mixed-Precision Quantization of Vision Transformer", 2023): a
width per linear (weights and input) from one global sensitivity measure and a Pareto-frontier
allocation, then widths per patch inside each layer.

The abstract names the three parts; lowbit had no more of the paper to read, so each is built
here as described below (lowbit's choices, not the paper's formulas):

- **Global sensitivity**, measured at the model's output (every layer scored by what it does to
  the final prediction, not to its own output). For each linear and each candidate width ``b``:
  the KL divergence of the model's output distribution from the float one with only that
  linear's weights rounded to ``b`` bits, and again with only its input rounded (the relative
  squared error of the output for a model without logits), over ``search_images`` calibration
  images; one forward pass per (layer, width). The grids are lowbit's defaults at ``b`` bits:
  min-max weights, and an input range shrunk to the smallest squared error. A first reading
  here, a diagonal-Fisher estimate from one backward pass (``sum g^2 (x - Q_b(x))^2``), chose
  allocations below the uniform one (70.2 against 72.2 at W4A4 on 500 test images): the
  measured output effect replaced it for the layer costs. The Fisher estimate per token
  position is kept for the patch-wise widths below.
- **Pareto frontier**. Each linear held at the default width may take ``bits + d`` for its
  weights and ``act_bits + d`` for its input, ``d`` in ``offsets`` (2..8 bits). Layers are added
  one at a time to a frontier of partial allocations over (weight bits, bit operations,
  estimated loss); a state is kept when no other in its (bits, BOPs) cell has a lower loss, and
  dropped once even the narrowest remaining widths cannot fit. The chosen allocation is the
  frontier's lowest estimated loss within the uniform allocation's weight bits and BOPs, so
  the model is never larger or costlier than at ``bits``/``act_bits`` everywhere. Layers at
  another width (the first and last layers' 8 bits) keep it; a linear whose input another
  grid already quantizes (it reads a site's output) counts ``act_bits`` for its BOPs.
- **Patch-wise widths** (``patches=True``, the default). Inside each
  layer, the input's token positions (a ViT's class token and patches) with the largest
  estimated loss get one bit more, the same number with the smallest one bit less (never
  below ``min_patch_bits``), the count chosen to minimise the layer's estimated loss (zero
  when nothing gains): the layer's bit operations stay the same. The widths are static per
  position, so they need the calibration's sequence length (a ViT's); inputs of a varying
  length (text) keep one width per layer. Such layers run in simulation at freeze time (the
  integer kernels take one width per tensor).

Weights and activation ranges are then round-to-nearest with lowbit's defaults at each
layer's width (min-max weights, MSE-searched static activation ranges).

Measured on the CIFAR ViT at W4A4 (all 10,000 test images, 256 calibration images, two
calibration seeds): round-to-nearest 69.63 / 70.25, the per-layer widths alone 70.16 / 70.00,
with the patch widths 70.50 / 70.03. The patch widths never cost accuracy there; the gain over
uniform widths (+0.3 on average) is smaller than what the calibration seed moves (0.6).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.formats import integer
from lowbit.methods.base import register, static_act_format
from lowbit.methods.brecq import _forward, task_loss
from lowbit.methods.ptq4vit import _ranges
from lowbit.methods.rtn import RTN
from lowbit.nn.qmodule import QModule

WIDTHS = range(2, 9)


@register
@dataclass
class PMQ(RTN):
    """PMQ: global Fisher-weighted sensitivity, Pareto-frontier widths per linear, patch-wise widths."""

    name = "pmq"
    needs_calibration = True

    offsets: tuple = (-1, 0, 1)
    search_images: int = 32
    patches: bool = True  # budget-neutral widths per token position inside each layer
    cells: int = 96  # the frontier's grid per axis (bits x BOPs)
    min_patch_bits: int = 3  # a patch never goes below this width

    def __post_init__(self):
        super().__post_init__()
        self.offsets = tuple(int(d) for d in self.offsets)
        if 0 not in self.offsets:
            raise ValueError(f"offsets {list(self.offsets)} must include 0 (the uniform allocation is the budget)")
        if self.search_images < 1 or self.cells < 2:
            raise ValueError("search_images must be >= 1 and cells >= 2")

    # --- the engine's hooks ------------------------------------------------------------------

    def prepare(self, model, adapter, batches) -> None:
        self._plan = None
        acts = self.act_format is not None
        self._sens = sensitivities(model, batches or [], self.search_images, self.weight_format, acts)
        widths = {"w": {self.bits + d for d in self.offsets} & set(WIDTHS),
                  "a": {self.act_bits + d for d in self.offsets} & set(WIDTHS) if acts else set()}  # fmt: skip
        output_costs(model, _first(batches or [], self.search_images), self._sens, self.weight_format, widths,
                     getattr(self, "progress", False))  # fmt: skip

    def transform(self, unit, quantizer) -> None:
        if self.act_bits is not None:
            static_act_format(quantizer, self.name, "gives each linear's input a static width")
        if getattr(self, "_plan", None) is None:
            self._plan = self.allocate(unit.model)
            if any(not s["weighted"] for s in getattr(self, "_sens", {}).values()):
                unit.log.append({"note": "no task loss (the model has no logits): sensitivities unweighted"})
        for name, qm in unit.qmodules().items():
            choice = self._plan.get(name)
            if choice is None:
                continue
            wb, ab, token_bits = choice
            qm.weight_q.fmt = replace(qm.weight_q.fmt, bits=wb)
            if ab is not None and qm.input_q.fmt is not None:
                qm.input_q.fmt = replace(qm.input_q.fmt, bits=ab)
                qm.input_q.set_token_bits(token_bits)
            unit.log.append({"layer": name, "weight_bits": wb, "act_bits": ab,
                             "token_bits": None if token_bits is None else _hist(token_bits)})  # fmt: skip

    # --- the allocation ----------------------------------------------------------------------

    def allocate(self, model: nn.Module) -> dict:
        """``{layer: (weight bits, input bits, per-position widths or None)}`` for the layers at the default width."""
        layers = []
        for name, s in getattr(self, "_sens", {}).items():
            m = model.get_submodule(name) if _has(model, name) else None
            if not isinstance(m, QModule) or m.weight_q.fmt is None or m.weight_q.fmt.bits != self.bits:
                continue
            quantized_input = m.input_q.fmt is not None and m.input_q.fmt.bits == self.act_bits and "a" in s
            layers.append((name, s, quantized_input))
        if not layers:
            return {}
        options = []
        for name, s, qi in layers:
            opts = []
            for dw in self.offsets:
                wb = self.bits + dw
                if wb not in WIDTHS:
                    continue
                for da in self.offsets if qi else (0,):
                    ab = self.act_bits + da if qi else None
                    if qi and ab not in WIDTHS:
                        continue
                    cost = s["w_out"][wb] + (s["a_out"][ab] if qi else 0.0)
                    ops = wb * (ab if qi else self.act_bits or 16) * s["macs"]  # an unquantized input: neutral
                    opts.append((wb * s["numel"], ops, cost, wb, ab))
            options.append(opts)
        budget_bits = sum(self.bits * s["numel"] for _, s, _ in layers)
        budget_ops = sum(self.bits * (self.act_bits or 16) * s["macs"] for _, s, qi in layers)
        picks = pareto(options, budget_bits, budget_ops, self.cells)
        plan = {}
        for (name, s, qi), (_, _, _, wb, ab) in zip(layers, picks):
            ok = qi and self.patches and s["fixed_len"] and ab - 1 >= self.min_patch_bits
            tb = token_widths(s["a"], ab) if ok else None
            plan[name] = (wb, ab, tb)
        return plan


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _hist(bits: torch.Tensor) -> dict:
    v, c = torch.unique(bits, return_counts=True)
    return {int(a): int(b) for a, b in zip(v, c)}


def pareto(options: list[list[tuple]], budget_bits: float, budget_ops: float, cells: int) -> list[tuple]:
    """One option per layer (``(bits, ops, cost, ...)``) with the lowest total cost within both budgets,
    over a frontier thinned to the lowest cost per (bits, ops) cell."""
    min_bits = [min(o[0] for o in opts) for opts in options]
    min_ops = [min(o[1] for o in opts) for opts in options]
    rest_bits = [sum(min_bits[i:]) for i in range(len(options) + 1)]
    rest_ops = [sum(min_ops[i:]) for i in range(len(options) + 1)]
    states = [(0.0, 0.0, 0.0, ())]  # bits, ops, cost, choice indices
    for i, opts in enumerate(options):
        best: dict[tuple[int, int], tuple] = {}
        for b, o, c, picks in states:
            for j, (ob, oo, oc, *_rest) in enumerate(opts):
                nb, no = b + ob, o + oo
                if nb + rest_bits[i + 1] > budget_bits * (1 + 1e-9) or no + rest_ops[i + 1] > budget_ops * (1 + 1e-9):
                    continue
                key = (int(nb / budget_bits * cells), int(no / budget_ops * cells))
                if key not in best or c + oc < best[key][2]:
                    best[key] = (nb, no, c + oc, (*picks, j))
        states = list(best.values())
        if not states:
            raise ValueError("no allocation fits the uniform widths' budget (this cannot happen with offset 0)")
    _, _, _, picks = min(states, key=lambda s: s[2])
    return [options[i][j] for i, j in enumerate(picks)]


def token_widths(act_cost: dict, ab: int, k: int | None = None) -> torch.Tensor | None:
    """Per-position widths: ``ab + 1`` for the ``k`` positions with the largest estimated loss, ``ab - 1`` for
    the ``k`` smallest; ``k=None``: the ``k`` minimising the layer's estimated loss (``None`` when none helps)."""
    here = act_cost[ab]
    t = here.numel()
    if t < 2 or ab + 1 not in act_cost or ab - 1 not in act_cost:
        return None
    order = torch.argsort(here, descending=True)
    if k is None:
        up = (here - act_cost[ab + 1])[order]  # what raising each gains, most sensitive first
        down = (act_cost[ab - 1] - here)[order.flip(0)]  # what lowering each costs, least sensitive first
        gains = torch.cumsum(up[: t // 2], 0) - torch.cumsum(down[: t // 2], 0)
        if not len(gains) or float(gains.max()) <= 0:
            return None
        k = int(gains.argmax()) + 1
    k = min(k, t // 2)
    if k < 1:
        return None
    bits = torch.full((t,), ab, dtype=torch.long)
    bits[order[:k]] = ab + 1
    bits[order.flip(0)[:k]] = ab - 1
    return bits


def _weight_error(w: torch.Tensor, fmt, bits: int) -> torch.Tensor:
    """``(W - Q_bits(W))^2`` under min-max round-to-nearest in ``fmt`` at ``bits``."""
    f = replace(fmt, bits=bits)
    m = w.reshape(w.shape[0], -1).float()
    lo, hi = _ranges(m, f)
    scale, zero = integer.params_from_range(lo, hi, bits, f.symmetric)
    return (integer.fake_quantize(m, scale, zero, bits, f.group_size) - m).pow(2)


def _weight_rtn(w: torch.Tensor, fmt, bits: int) -> torch.Tensor:
    f = replace(fmt, bits=bits)
    m = w.reshape(w.shape[0], -1).float()
    lo, hi = _ranges(m, f)
    scale, zero = integer.params_from_range(lo, hi, bits, f.symmetric)
    return integer.fake_quantize(m, scale, zero, bits, f.group_size).reshape(w.shape)


def _fake(x: torch.Tensor, lo: float, hi: float, bits) -> torch.Tensor:
    """``x`` on an asymmetric grid of ``2^bits`` levels over ``[lo, hi]`` (``bits``: an int, or a tensor of
    widths that broadcasts against ``x``: one per token position)."""
    levels = torch.exp2(torch.as_tensor(bits, dtype=torch.float32)) - 1
    s = max(hi - lo, 1e-12) / levels
    z = torch.round(-lo / s)
    return ((torch.minimum(torch.clamp(torch.round(x / s) + z, min=0), levels) - z) * s).to(x.dtype)


def _act_error(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """``(x - Q_bits(x))^2`` on an asymmetric grid over ``[lo, hi]``."""
    return (_fake(x, lo, hi, bits) - x).pow(2)


def _clipped_range(sample: torch.Tensor, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """``[lo, hi]`` shrunk by the factor (1 down to 0.3) with the smallest squared error at ``bits`` on ``sample``
    (what lowbit's MSE activation observer does, so the estimate sees the grid the layer will get)."""
    best = None
    for c in torch.linspace(1.0, 0.3, 15).tolist():
        err = float(_act_error(sample, lo * c, hi * c, bits).mean())
        if best is None or err < best[0]:
            best = (err, lo * c, hi * c)
    return best[1], best[2]


def sensitivities(model: nn.Module, batches, limit: int, fmt, acts: bool) -> dict:
    """Per linear: ``numel``, ``macs`` (per sample), ``w`` {bits: weight loss estimate}, ``a`` {bits: per-position
    input loss estimate ``[T]``, or one value when the length varies} and ``fixed_len``. Two passes over the first
    ``limit`` examples: the inputs' ranges, then the gradients."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    batches = _first(batches, limit)
    if not linears or not batches:
        return {}
    ranges: dict[str, list[float]] = {}
    shapes: dict[str, set] = {n: set() for n in linears}

    samples: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    g = torch.Generator().manual_seed(0)

    def observe(_m, args, name):
        x = args[0].detach()
        r = ranges.setdefault(name, [float("inf"), float("-inf")])
        r[0], r[1] = min(r[0], float(x.min())), max(r[1], float(x.max()))
        shapes[name].add((x.dim(), tuple(x.shape[1:-1])))
        flat = x.reshape(-1).float()
        samples[name].append(flat[torch.randint(flat.numel(), (min(flat.numel(), 1 << 14),), generator=g)])

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: observe(m, a, n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    fixed = {n: len(s) == 1 and next(iter(s))[0] == 3 for n, s in shapes.items() if s}
    grids = {n: {b: _clipped_range(torch.cat(samples[n]), *ranges[n], b) for b in WIDTHS} for n in ranges}
    held: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    act_cost: dict[str, dict[int, torch.Tensor]] = {}
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    count = {n: 0 for n in linears}

    def keep(_m, args, name):
        x = args[0]
        if torch.is_tensor(x) and x.requires_grad:
            x.retain_grad()
        held[name].append(x)

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: keep(m, a, n)) for n, m in linears.items()]
    params = {p: p.requires_grad for p in model.parameters()}
    weighted = True
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                loss = task_loss(_forward(model, batch))
                if loss is None:  # no logits: no task loss, every weight and input counts equally
                    weighted = False
                model.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
            for name, m in linears.items():
                if weighted and m.weight.grad is not None:
                    fisher[name] += m.weight.grad.detach().float().pow(2)
                if acts and name in ranges:
                    for x in held[name]:
                        g2 = x.grad.float().pow(2) if (weighted and x.grad is not None) else torch.ones_like(x)
                        xd = x.detach().float()
                        cost = act_cost.setdefault(name, {})
                        for b in WIDTHS:
                            e = (g2 * _act_error(xd, *grids[name][b], b)).sum(-1)  # [N, T] or [N]
                            e = e.sum(0) if fixed[name] else e.sum().reshape(1)
                            cost[b] = e if b not in cost else cost[b] + e
                        count[name] += x.shape[0]
                held[name].clear()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, r in params.items():
            p.requires_grad_(r)
    out = {}
    for name, m in linears.items():
        if name not in ranges:
            continue  # the calibration never reached it
        w = m.weight.detach()
        f = fisher[name] if weighted else torch.ones_like(fisher[name])
        f = f.reshape(w.shape[0], -1)
        tokens = 1
        for d in next(iter(shapes[name]))[1]:
            tokens *= d
        rec = {"numel": w.numel(), "macs": w.numel() * tokens, "fixed_len": fixed[name], "weighted": weighted,
               "w": {b: float((f * _weight_error(w, fmt, b)).sum()) for b in WIDTHS}}  # fmt: skip
        if acts and name in act_cost:
            rec["a"] = {b: c / max(1, count[name]) for b, c in act_cost[name].items()}
            rec["grids"] = grids[name]
        out[name] = rec
    return out


@torch.no_grad()
def output_costs(model: nn.Module, batches: list, sens: dict, fmt, widths: dict, progress: bool = False,
                 desc: str = "pmq sensitivity") -> None:  # fmt: skip
    """Each linear's measured effect on the model's output with only its weights (``w_out``) or only its
    input (``a_out``) rounded to each width: the KL divergence of the output distribution from the float
    one (the relative squared error of the output for a model without logits), summed over the batches."""
    if not batches:
        return
    ref = [_output(model, b) for b in batches]
    kl = all(s["weighted"] for s in sens.values())

    def distance() -> float:
        return output_distance(model, batches, ref, kl)

    for name, s in tqdm(sens.items(), desc=desc, unit="layer", disable=not progress):
        m = model.get_submodule(name)
        w = m.weight.data
        s["w_out"] = {}
        for b in sorted(widths["w"]):
            m.weight.data = _weight_rtn(w, fmt, b).to(w.dtype)
            try:
                s["w_out"][b] = distance()
            finally:
                m.weight.data = w
        s["a_out"] = {}
        for b in sorted(widths["a"]) if "grids" in s else []:
            lo, hi = s["grids"][b]
            h = m.register_forward_pre_hook(lambda _m, a, lo=lo, hi=hi, b=b: (_fake(a[0], lo, hi, b), *a[1:]))
            try:
                s["a_out"][b] = distance()
            finally:
                h.remove()


@torch.no_grad()
def output_distance(model: nn.Module, batches: list, ref: list, kl: bool) -> float:
    """How far the model's outputs on ``batches`` are from ``ref``: the KL divergence of the output
    distribution (``kl``, a model with logits), else the relative squared error; summed over batches."""
    total = 0.0
    for b, r in zip(batches, ref):
        o = _output(model, b)
        if r.dim() >= 2 and kl:
            lp, lq = torch.log_softmax(r.float(), -1), torch.log_softmax(o.float(), -1)
            total += float((lp.exp() * (lp - lq)).sum())
        else:
            total += float((o - r).pow(2).sum() / r.pow(2).sum().clamp(min=1e-12))
    return total


def _output(model, batch) -> torch.Tensor:
    out = _forward(model, batch)
    out = getattr(out, "logits", None) if not torch.is_tensor(out) and hasattr(out, "logits") else out
    if not torch.is_tensor(out):
        out = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return out.detach()


def _first(batches, limit: int) -> list:
    """The calibration batches that hold the first ``limit`` examples."""
    out, seen = [], 0
    for batch in batches:
        if seen >= limit:
            break
        out.append(batch)
        seen += batch.shape[0] if torch.is_tensor(batch) else 1
    return out
