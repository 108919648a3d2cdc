"""``Unit``: what a method sees of the piece of the model being quantized.

A unit is a stem, a block or a head (modules run one after another). It offers
its quantized modules and activation sites in execution order, its inputs from
the quantized model as quantized so far (``inputs``) and from the float model
(``float_inputs``, when a method asks), the float target, statistics on demand
(``stats``), and ``run``. Methods ask it for observations; they never drive the
data flow themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.engine import distributed
from lowbit.engine.capture import ChildReplay, Inputs, StopForward, first_output
from lowbit.models.adapters import Adapter, UnitSpec
from lowbit.nn.qmodule import QModule, QSite, set_quantization
from lowbit.nn.quantizers import ActQuantizer
from lowbit.observers import InputStats


class Unit:
    def __init__(self, model: nn.Module, spec: UnitSpec, adapter: Adapter, inputs: Inputs | None,
                 float_inputs: Inputs | None = None):  # fmt: skip
        self.model, self.spec, self.adapter = model, spec, adapter
        self.name = spec.name
        self.inputs = inputs
        self.float_inputs = float_inputs
        single = len(spec.modules) == 1
        self.prefix = spec.modules[0] + "." if single else ""  # names inside a single-module unit are relative
        self.replay = ChildReplay(self.root) if single and inputs else None
        self.log: list[dict] = []
        self._order: list[str] | None = None

    # --- structure -----------------------------------------------------------------------

    @property
    def root(self) -> nn.Module:
        """The unit's module (for a chain of several modules, the model they live in)."""
        return self.model.get_submodule(self.spec.modules[0]) if len(self.spec.modules) == 1 else self.model

    def modules(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.spec.modules]

    def _members(self, kind) -> dict[str, nn.Module]:
        out = {}
        for top in self.spec.modules:
            for rel, m in self.model.get_submodule(top).named_modules():
                if isinstance(m, kind):
                    out[f"{top}.{rel}" if rel else top] = m
        return out

    def qmodules(self) -> dict[str, QModule]:
        """Quantized modules by their name in the model, in execution order when known."""
        found = self._members(QModule)
        order = [n for n in self.order() if n in found] if self.inputs else []
        return {n: found[n] for n in order + [n for n in found if n not in order]}

    def sites(self) -> dict[str, QSite]:
        return self._members(QSite)

    def relative(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def get(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def scale_pairs(self) -> list[tuple[str, list[str]]]:
        """The adapter's (producer, consumers) pairs present in this unit, as names in the model."""
        if not self.prefix:
            return []
        return [(self.prefix + p, [self.prefix + c for c in cs]) for p, cs in self.adapter.scale_pairs(self.root)]

    # --- running -------------------------------------------------------------------------

    def run(self, args: tuple, kwargs: dict | None = None):
        """The unit's output for one batch of inputs."""
        out = None
        for i, name in enumerate(self.spec.modules):
            m = self.model.get_submodule(name)
            if i == 0:
                out = m(*args, **(kwargs or {}))
            else:
                x = first_output(out)
                if x.dim() > 2 and isinstance(m, QModule) and m.kind == "linear" or x.dim() > 2 and isinstance(m, nn.Linear):
                    x = torch.flatten(x, 1)
                out = m(x)
        return first_output(out)

    def _pass(self, inputs: Inputs, on_output: Callable | None = None, replay: bool = True) -> None:
        """One pass over ``inputs``; a hook's ``StopForward`` ends a batch early."""
        if self.replay is not None and replay:
            self.replay.run(self.root, inputs, on_output)
            return
        with torch.no_grad():
            for args, kwargs in inputs:
                try:
                    out = self.run(args, kwargs)
                    if on_output is not None:
                        on_output(out)
                except StopForward:
                    pass

    def changed(self, names: list[str] | None = None) -> None:
        """Modules ``names`` changed what they compute: replayed outputs after them are stale."""
        if self.replay is not None:
            self.replay.changed(None if names is None else [self.relative(n) for n in names])

    def outputs(self, on_output: Callable | None = None) -> list[torch.Tensor]:
        """What the unit computes on its inputs, batch by batch (handed to ``on_output`` instead of
        kept, when given)."""
        outs: list[torch.Tensor] = []
        self._pass(self.inputs, on_output or outs.append)
        return outs

    def float_outputs(self, inputs: Inputs | None = None, on_output: Callable | None = None) -> list[torch.Tensor]:
        """What the float unit computes (every quantizer off) on ``inputs`` (default: the float inputs)."""
        outs: list[torch.Tensor] = []
        for m in self.modules():
            set_quantization(m, False)
        try:
            self._pass(inputs if inputs is not None else self.float_inputs, on_output or outs.append, replay=False)
        finally:
            for m in self.modules():
                set_quantization(m, True)
        return outs

    # --- observations ----------------------------------------------------------------------

    def order(self) -> list[str]:
        """Quantized modules and sites in the order one forward calls them (first batch)."""
        if self._order is None:
            if not self.inputs:
                self._order = list(self._members((QModule, QSite)))
                return self._order
            calls: list[str] = []
            members = self._members((QModule, QSite))
            hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: calls.append(n)) for n, m in members.items()]
            try:
                self._pass(self.inputs[:1], replay=False)
            finally:
                for h in hooks:
                    h.remove()
            seen: list[str] = []
            for n in calls:
                if n not in seen:
                    seen.append(n)
            self._order = seen + [n for n in members if n not in seen]  # never called: last
        return self._order

    def groups(self) -> list[list[str]]:
        """Execution-ordered observation points: quantized modules reading the same input tensor
        together (q/k/v, gate/up), each site alone."""
        if not self.inputs:
            return [[n] for n in self.order()]
        members = self._members((QModule, QSite))
        seen_inputs: list[tuple[str, torch.Tensor]] = []
        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen_inputs.append((n, a[0] if a else None)))
                 for n, m in members.items()]  # fmt: skip
        try:
            self._pass(self.inputs[:1], replay=False)
        finally:
            for h in hooks:
                h.remove()
        groups: list[list[str]] = []
        last, done = None, set()
        for name, x in seen_inputs:
            if name in done:
                continue
            done.add(name)
            if groups and isinstance(members[name], QModule) and isinstance(members[groups[-1][-1]], QModule) \
                    and x is last:  # fmt: skip
                groups[-1].append(name)
            else:
                groups.append([name])
            last = x
        return groups + [[n] for n in members if n not in done]

    def stats(self, names: list[str], hessian: bool = False, acts: bool = True,
              weights: bool = True) -> dict[str, InputStats]:  # fmt: skip
        """Statistics of the weight inputs of quantized modules ``names`` (a conv's unfolded
        patches) over all calibration batches, each pass ending once every one has been seen.
        With ``acts``, static activation quantizers among ``names`` (inputs and sites) accumulate
        in the same pass and take their ranges from their observers at the end; ``weights=False``
        only calibrates those (no weight statistics are built)."""
        stats: dict[str, InputStats] = {}
        pending = set(names)
        seen: set[str] = set()
        observers: list[tuple[str, ActQuantizer]] = []
        hooks = []

        def done(name):
            seen.add(name)
            if seen >= pending:
                seen.clear()
                raise StopForward

        for name in names:
            m = self.get(name)
            if isinstance(m, QModule):
                q = m.input_q
                if acts and q.observes:
                    q.begin_observing()
                    observers.append((name, q))

                def pre(mod, args, name=name, q=q, observe=acts and q.observes):
                    v = q.transform(args[0])
                    if observe:
                        q.accumulate(v)
                    if not weights:
                        return done(name)
                    try:
                        rows = mod.weight_rows(v.detach())
                    except NotImplementedError as e:  # the method falls back, and says why
                        stats.setdefault(name, InputStats.empty(0))
                        stats[name].unsupported = f"cannot observe this layer ({e})"
                        rows = None
                    if rows is not None:
                        if name not in stats:
                            stats[name] = InputStats.empty(rows.shape[1], rows.device, hessian, mod.weight_groups)
                        stats[name].add(rows)
                    done(name)

                hooks.append(m.register_forward_pre_hook(pre))
            elif isinstance(m, QSite):
                hooks += self._site_hooks(name, m, observers, done, acts)
        self.changed(names)  # a replayed child would hide the observed modules from their hooks
        try:
            if weights or observers:  # else there is nothing to observe: no pass
                self._pass(self.inputs or [])
        finally:
            for h in hooks:
                h.remove()
        if distributed.active():  # data-parallel calibration: every rank's statistics, combined
            distributed.reduce_stats(stats)
            seen_acts = {f"{i}:{name}": q.stats for i, (name, q) in enumerate(observers) if q.stats is not None}
            distributed.reduce_stats(seen_acts)
            for i, (name, q) in enumerate(observers):
                q.stats = seen_acts.get(f"{i}:{name}")
        for name, q in observers:
            try:
                q.finish_observing()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return stats

    def owned(self, names: list[str]) -> set[str]:
        """The quantized modules among ``names`` this process decides: all of them in one process;
        under data-parallel calibration each rank takes a share (balanced by the layers' sizes) and
        ``share_decisions`` hands every rank the others' codes."""
        return distributed.owned(names, lambda n: self.get(n).weight.numel() * self.get(n).weight.shape[-1]
                                 if hasattr(self.get(n), "weight_q") else 0)  # fmt: skip

    def share_decisions(self, names: list[str]) -> None:
        """Every rank receives the codes the owner of each module in ``names`` decided."""
        if distributed.active():
            distributed.share_weights({n: self.get(n) for n in names if hasattr(self.get(n), "weight_q")},
                                      self.owned(names))  # fmt: skip

    def _site_hooks(self, name, site: QSite, observers, done, acts: bool):
        ins = [q for q in site.input_q if q.observes] if acts else []
        out = site.output_q if acts and site.output_q is not None and site.output_q.observes else None
        for q in ins + ([out] if out is not None else []):
            q.begin_observing()
            observers.append((name, q))

        def pre(mod, args):
            for q, a in zip(site.input_q, args):
                if q in ins:
                    q.accumulate(q.transform(a))
            if out is None:
                done(name)

        def post(mod, args, output):
            out.accumulate(out.transform(output))
            done(name)

        hooks = [site.register_forward_pre_hook(pre)]
        if out is not None:
            hooks.append(site.module.register_forward_hook(post))
        return hooks

    # --- tensors for reconstruction ---------------------------------------------------------

    def stacked(self, inputs: Inputs) -> torch.Tensor | None:
        """The inputs as one tensor ``[samples, ...]`` when every batch is a lone tensor of the
        same trailing shape (CNN activations), else ``None`` (then methods sample whole batches)."""
        if not inputs or any(kw or len(a) != 1 or not torch.is_tensor(a[0]) for a, kw in inputs):
            return None
        if len({tuple(a[0].shape[1:]) for a, _ in inputs}) != 1:
            return None
        return torch.cat([a[0] for a, _ in inputs])
