"""Data-parallel calibration on ``torch.distributed``: ``torchrun --nproc-per-node N -m lowbit quantize ...``.

Every rank holds the whole model and the same calibration windows, keeps the
contiguous share of the batches its rank names, and runs the engine loop on it.
Where a method reads statistics (``Unit.stats``: GPTQ's Hessians, activation
ranges), the ranks' statistics are combined before anyone uses them: Hessians and
channel means weighted by tokens and summed, maxima and minima reduced, the
per-batch ranges and sampled rows gathered in rank order, which is batch order.
The layers' own work (GPTQ's solve) is split: each rank decides a share of every
group of layers (balanced by size) and the codes are exchanged, so every rank ends
with the same model, and rank 0 writes.

RTN and statistics-only methods give bit-identical checkpoints to one process
(minima and maxima do not depend on the order of reduction); GPTQ's Hessian is a
sum in another order, equal to float rounding (the tests state the tolerance).
Methods that compute losses on their own unit's inputs (AWQ's search, SmoothQuant's
search, reconstruction) would decide differently on each rank: they are refused
until their losses are reduced too. Backends: gloo on CPU, NCCL on CUDA; a
multi-node run needs only torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``),
the same calibration file on every node and an output path on rank 0's node.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lowbit.observers import InputStats

# methods whose only use of calibration data is Unit.stats (reduced across ranks here)
DISTRIBUTED_METHODS = ("rtn", "gptq")


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), once; ``(rank, world size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    return world()[1] > 1


def shard(batches: list | None) -> list | None:
    """This rank's contiguous share of the calibration batches (rank 0 the first)."""
    rank, size = world()
    if size == 1 or batches is None:
        return batches
    if len(batches) < size:
        raise ValueError(f"{len(batches)} calibration batches cannot be shared by {size} processes; give at "
                         f"least {size} (more windows or a smaller batch size)")  # fmt: skip
    per, extra = divmod(len(batches), size)
    start = rank * per + min(rank, extra)
    return batches[start : start + per + (rank < extra)]


def check_methods(methods: list) -> None:
    refused = [m.name for m in methods if m.needs_calibration and m.name not in DISTRIBUTED_METHODS]
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot run data-parallel yet (they score candidates on each "
                         f"process's own calibration share); run it in one process, or use "
                         f"{' / '.join(DISTRIBUTED_METHODS)}")  # fmt: skip


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_stats(stats: dict[str, InputStats]) -> None:
    """Combine every rank's ``stats`` in place (each name the same on every rank afterwards).

    A rank that saw no row of a layer (an MoE expert no token of its share reached)
    contributes an empty entry, so every rank takes part in every reduction."""
    if not active():
        return
    mine = {n: (s.abs_mean.numel(), s.H is not None, s.groups, s.unsupported) for n, s in stats.items()}
    known: dict = {}
    for theirs in _gather(mine):
        for n, v in theirs.items():
            known.setdefault(n, v)
    device = next((s.abs_mean.device for s in stats.values()), torch.device("cpu"))
    for n in sorted(known):
        width, hessian, groups, unsupported = known[n]
        if n not in stats:
            stats[n] = InputStats.empty(width, device, hessian, groups) if width else InputStats.empty(0)
            stats[n].unsupported = unsupported
        s = stats[n]
        if width == 0:
            continue
        n_tokens = torch.tensor([float(s.tokens)], device=device)
        dist.all_reduce(n_tokens)
        total = n_tokens.item()
        if s.H is not None:
            weighted = s.H * s.tokens
            dist.all_reduce(weighted)
            s.H = weighted / total if total else weighted
        mean = s.abs_mean * s.tokens
        dist.all_reduce(mean)
        s.abs_mean = mean / total if total else mean
        for t, op in ((s.abs_max, dist.ReduceOp.MAX), (s.hi, dist.ReduceOp.MAX), (s.lo, dist.ReduceOp.MIN)):
            dist.all_reduce(t, op=op)
        parts = _gather((s.batch_lo, s.batch_hi, s.rows))
        s.batch_lo = [b for p in parts for b in p[0]]
        s.batch_hi = [b for p in parts for b in p[1]]
        s.rows = [r for p in parts for r in p[2]]
        s.tokens = int(total)


def owned(names: list[str], cost) -> set[str]:
    """The names this rank decides: all in one process; else a greedy split of ``names`` by
    ``cost(name)`` (the same on every rank, so every rank computes the same split)."""
    rank, size = world()
    if size == 1:
        return set(names)
    load = [0.0] * size
    mine = set()
    for n in sorted(names, key=lambda n: (-cost(n), names.index(n))):
        r = min(range(size), key=lambda i: (load[i], i))
        load[r] += cost(n) or 1
        if r == rank:
            mine.add(n)
    return mine


def share_weights(modules: dict, mine: set[str]) -> None:
    """Broadcast each module's decided codes (``weight_q.fixed`` and the method label) from the
    rank that decided them to all the others."""
    decided = {n: (m.weight_q.fixed, m.weight_q.method) for n, m in modules.items() if n in mine}
    for theirs in _gather(decided):
        for n, (fixed, method) in theirs.items():
            if n not in mine and fixed is not None:
                modules[n].weight_q.set_fixed(fixed, method)


def barrier() -> None:
    if active():
        dist.barrier()
