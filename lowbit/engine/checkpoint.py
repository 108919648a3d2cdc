"""Resume after a crash: the engine records each finished unit, atomically, beside the output.

A progress directory (``.<out>.lowbit-progress`` next to ``--out``) holds
``meta.json`` (what the run is: model, recipe, calibration data fingerprint) and,
per finished unit, ``unit-NNNNN.safetensors`` (every parameter and buffer of the
unit's modules, the codes its quantizers fixed) with ``unit-NNNNN.json`` (the
quantizers' settings, the unit's log, the random number generator's state). Each
file is written to a temporary name, flushed to disk and renamed, the JSON last:
a unit counts as finished only when its JSON exists, so a ``kill -9`` at any moment
leaves either a finished unit or nothing of it.

On ``resume``, finished units are restored instead of recomputed, and their outputs
feed the next unit exactly as in an uninterrupted run, so the final checkpoint is
bit-identical to one from a run never interrupted (same machine, same threads).
The directory is removed once the checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import WeightFormat
from lowbit.nn.quantizers import ActQuantizer, WeightQuantizer
from lowbit.quantized_weight import QuantizedWeight

SIMPLE = (bool, int, float, str, type(None))


def progress_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lowbit-progress")


def fingerprint_batches(batches) -> str:
    """sha256 of the calibration inputs (tensors, in order)."""
    h = hashlib.sha256()
    for b in batches or []:
        for t in _tensors_of(b):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors_of(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from _tensors_of(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors_of(v)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """The finished units of one run, read and written under ``directory``."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, resume: bool):
        self.dir = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        # one process per output: an exclusive lock the kernel releases when the process dies (kill -9 too)
        self._lock = open(self.dir.with_name(self.dir.name + ".lock"), "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise FileExistsError(f"another lowbit process is quantizing into the output of {self.dir}; "
                                  "wait for it or choose another --out") from None  # fmt: skip
        try:
            self._open(resume)
        except BaseException:
            self.release()
            raise

    def _open(self, resume: bool) -> None:
        meta = self.dir / "meta.json"
        if self.dir.exists() and meta.exists():
            if not resume:
                raise FileExistsError(f"{self.dir} records an interrupted run for this output; pass --resume "
                                      f"(resume=True) to continue it, or delete that directory to start over")  # fmt: skip
            old = json.loads(meta.read_text())
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise ValueError(f"cannot resume from {self.dir}: the interrupted run differs in "
                                 f"{', '.join(differ)}; run it as before, or delete that directory")  # fmt: skip
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(meta, lambda p: p.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True)))
        self.done = 0
        while (self.dir / f"unit-{self.done:05d}.json").exists():
            self.done += 1

    def save(self, index: int, model: nn.Module, modules: list[str], log: list[dict], onload=None) -> None:
        """Record unit ``index`` as finished. ``onload``: tensors still equal to what it read from
        the source are not recorded (resuming reads them from there again)."""
        tensors, info = unit_state(model, modules, onload.unchanged if onload is not None else None)
        base = self.dir / f"unit-{index:05d}"
        info["log"] = json.loads(json.dumps(log, default=str))
        info["rng"] = torch.get_rng_state().tolist()
        _write_atomic(base.with_suffix(".safetensors"), lambda p: save_file(tensors, str(p)))
        _write_atomic(base.with_suffix(".json"), lambda p: p.write_text(json.dumps(info)))
        self.done = max(self.done, index + 1)

    def restore(self, index: int, model: nn.Module) -> list[dict]:
        """Put unit ``index`` back as it was when it finished; returns its log."""
        base = self.dir / f"unit-{index:05d}"
        info = json.loads(base.with_suffix(".json").read_text())
        tensors = load_file(str(base.with_suffix(".safetensors")))
        restore_unit_state(model, tensors, info)
        torch.set_rng_state(torch.tensor(info["rng"], dtype=torch.uint8))
        return info["log"]

    def finish(self) -> None:
        """The checkpoint is written: remove the record and the lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        Path(self._lock.name).unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Let another process take this output (the record stays)."""
        if not self._lock.closed:
            self._lock.close()


# --- a unit's state ---------------------------------------------------------------------------------


def _members(model: nn.Module, modules: list[str]):
    for top in modules:
        for rel, m in model.get_submodule(top).named_modules():
            yield (f"{top}.{rel}" if rel else top), m


def unit_state(model: nn.Module, modules: list[str], unchanged=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every parameter and buffer of the unit's modules (except those ``unchanged(key, tensor)``
    says are as the source holds them), and what its quantizers decided."""
    tensors: dict[str, torch.Tensor] = {}
    quantizers: dict[str, dict] = {}
    for name, m in _members(model, modules):
        for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and not (unchanged is not None and unchanged(f"{name}.{key}", t)):
                tensors[f"{name}.{key}"] = t.detach().cpu().contiguous().clone()
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, SIMPLE)}
            fmt = m.fmt
            entry = {"attrs": attrs, "fmt": dataclasses.asdict(fmt) if fmt is not None else None,
                     "buffers": [k for k, v in m._buffers.items() if v is not None],
                     "params": [k for k, v in m._parameters.items() if v is not None]}  # fmt: skip
            if isinstance(m, WeightQuantizer) and m.fixed is not None:
                entry["fixed"] = {"fmt": dataclasses.asdict(m.fixed.fmt), "shape": list(m.fixed.shape)}
                tensors.update(m.fixed.to_tensors(f"{name}.fixed"))
            quantizers[name] = entry
    return tensors, {"quantizers": quantizers}


def restore_unit_state(model: nn.Module, tensors: dict[str, torch.Tensor], info: dict) -> None:
    quantizers = info["quantizers"]
    for name, entry in quantizers.items():
        q = model.get_submodule(name)
        fmt_cls = WeightFormat if isinstance(q, WeightQuantizer) else ActFormat
        q.fmt = fmt_cls(**entry["fmt"]) if entry["fmt"] is not None else None
        for k, v in entry["attrs"].items():
            setattr(q, k, v)
        for k in list(q._buffers):
            if k not in entry["buffers"]:
                q._buffers[k] = None
        for k in list(q._parameters):
            if k not in entry["params"]:
                q._parameters[k] = None
        if isinstance(q, WeightQuantizer):
            fixed = entry.get("fixed")
            q.fixed = None
            q._fixed_cache = None
            if fixed is not None:
                q.fixed = QuantizedWeight.from_tensors(tensors, f"{name}.fixed", WeightFormat(**fixed["fmt"]),
                                                       tuple(fixed["shape"]))  # fmt: skip
    for key, t in tensors.items():
        owner, _, attr = key.rpartition(".")
        if owner.endswith(".fixed"):  # a quantizer's codes, restored with it above
            continue
        m = model.get_submodule(owner)
        current = getattr(m, attr, None)
        if attr in m._parameters:
            if current is not None and current.shape == t.shape:
                with torch.no_grad():
                    current.copy_(t)
            else:
                m._parameters[attr] = nn.Parameter(t.to(_device_of(m)), requires_grad=False)
        elif attr in m._buffers:
            m._buffers[attr] = t.to(_device_of(m))
        else:
            raise ValueError(f"resume: {key} has no place in the model (was it built the same way?)")


def _device_of(m: nn.Module) -> torch.device:
    for t in [*m.parameters(), *m.buffers()]:
        return t.device
    return torch.device("cpu")
