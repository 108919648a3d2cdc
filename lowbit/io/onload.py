"""Sequential onloading: quantize a model larger than memory, one unit at a time.

The model is built with its parameters on PyTorch's ``meta`` device (shapes, no
memory; buffers such as rotary frequencies are real). When the engine reaches a
unit, ``Onload.load`` reads that unit's tensors from the source's safetensors
files (positioned reads of exactly those bytes: nothing stays mapped, so the
source's pages never count as the process's memory) in fp32 onto the compute
device; when the unit is finished, ``Onload.write`` freezes nothing itself but
writes the unit's packed state (the engine froze it) to its own shard of the
output and puts the unit back on ``meta``. Modules outside the units (the
embedding, the final norm) are read when the calibration forward first calls
them and dropped after each capture; whatever no unit wrote is copied from the
source at the end, tensor by tensor. Between units, the calibration activations
can live in files (``spill_dir``) and are read back one batch at a time.

Peak memory is then the largest unit in fp32 plus its working set (a Hessian
method's Hessians), the calibration activations (one batch of them when spilled)
and a fixed overhead, whatever the number of units.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
INDEX = "model.safetensors.index.json"
REST_SHARD_BYTES = 1 << 30  # tensors outside the units go out in shards of about this size


def give_back_memory() -> None:
    """Return freed heap memory to the operating system (glibc keeps it otherwise, and a long run of
    same-sized unit allocations then fragments into a peak that grows with the number of units)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (its tensors' dtypes, shapes and offsets) checked against
    the file's size, and where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, 100 * 1024**2):
            raise ValueError(f"{path}: header length {n} does not fit in its {size} bytes")
        try:
            return json.loads(f.read(n)), 8 + n
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupted safetensors header ({e})") from None


def safetensors_header(path: Path) -> dict:
    return read_header(path)[0]


# --- the source: tensors by name, read when asked --------------------------------------------------------


class WeightSource:
    """A model directory's safetensors tensors by name; each read touches only that tensor's bytes.

    Every header is checked against its file's size when the source is opened: a missing
    shard, a truncated file or a tensor whose declared bytes disagree with its dtype and shape
    raise one error naming the file."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.dir} holds no safetensors weights; onloading reads .safetensors files")
        self.entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...], int]] = {}
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise FileNotFoundError(f"{path}: a weight shard named in {index.name} is missing")
            header, start = read_header(path)
            size = path.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                try:
                    dtype = SAFETENSORS_DTYPES[info["dtype"]]
                    shape = tuple(int(s) for s in info["shape"])
                    begin, end = (int(o) for o in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}: tensor {key} has an unreadable header entry {info!r}") from None
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if begin < 0 or end - begin != nbytes or start + end > size:
                    raise ValueError(f"{path}: tensor {key} declares bytes {begin}..{end} for {info['dtype']} "
                                     f"{list(shape)}, which its {size}-byte file does not hold")  # fmt: skip
                self.entries[key] = (path, start + begin, dtype, shape, nbytes)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][3]

    def file_of(self, key: str) -> Path:
        return self.entries[key][0]

    def read(self, key: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor ``key`` (cast to ``dtype``; ``None``: as stored), in memory of its own."""
        path, offset, stored, shape, nbytes = self.entries[key]
        raw = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(raw.numpy())) != nbytes:
                raise ValueError(f"{path}: tensor {key} is cut short; the file is truncated")
        t = raw.view(stored).reshape(shape)
        return t if dtype is None or dtype == stored else t.to(dtype)


# --- the skeleton: parameters on meta, buffers real -------------------------------------------------------


@contextmanager
def parameters_on_meta():
    """Within this block, every parameter a module registers lives on ``meta`` (no memory); buffers
    (rotary frequencies, position ids) are computed as usual."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(directory: str | os.PathLike) -> nn.Module:
    """The transformers model of ``directory``'s config with every parameter on ``meta``."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from lowbit.models.loading import is_causal_lm

    config = AutoConfig.from_pretrained(str(directory))
    named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])[:1]]
    with parameters_on_meta(), no_init_weights():
        if named and named[0] is not None and hasattr(named[0], "_from_config"):
            model = named[0]._from_config(config, dtype=torch.float32)
        else:
            cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
            model = cls.from_config(config, dtype=torch.float32)
    if hasattr(model, "tie_weights"):  # an output layer tied to the embedding is one parameter, as loaded
        model.tie_weights()
    model.eval()
    model.lowbit_source = str(directory)
    return model


# --- activations between units, in files -------------------------------------------------------------


class SpilledInputs(Sequence):
    """A unit's inputs (``(args, kwargs)`` per batch) kept in files and read back one batch at a time."""

    def __init__(self, directory: Path, tag: str):
        self.dir, self.tag, self.count = directory, tag, 0

    def append(self, item) -> None:
        tmp = self.dir / f"{self.tag}-{self.count:06d}.pt.tmp"
        torch.save(item, tmp)
        os.replace(tmp, self.dir / f"{self.tag}-{self.count:06d}.pt")
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return torch.load(self.dir / f"{self.tag}-{i % self.count:06d}.pt", weights_only=True)

    def drop(self) -> None:
        for j in range(self.count):
            (self.dir / f"{self.tag}-{j:06d}.pt").unlink(missing_ok=True)
        self.count = 0


# --- the onloader ------------------------------------------------------------------------------------------


def _slots(model: nn.Module):
    """``(module, attribute, key)`` for every parameter and persistent buffer, tied ones included."""
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for attr, p in m._parameters.items():
            if p is not None:
                yield m, attr, prefix + attr, True
        for attr, b in m._buffers.items():
            if b is not None and attr not in m._non_persistent_buffers_set:
                yield m, attr, prefix + attr, False


class Onload:
    """Reads units from ``source`` as the engine reaches them and writes each finished one to
    ``out`` (a directory being written); see the module docstring."""

    def __init__(self, model: nn.Module, source: WeightSource, out: str | os.PathLike, device=None,
                 spill_dir: str | os.PathLike | None = None):  # fmt: skip
        self.model, self.source, self.out = model, source, Path(out)
        self.device = torch.device(device or "cpu")
        self.weight_map: dict[str, str] = {}
        self.layers: dict[str, dict] = {}
        self.tied: dict[str, str] = {}
        self.shards = 0
        self.written_units: list[str] = []  # module-name prefixes whose state went out with their unit
        self.loaded_from_source: dict[str, torch.Tensor] = {}  # key -> the tensor as read (unchanged check)
        self._hooks: list = []
        self._outside: list[nn.Module] = []
        self.spill_root = None
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            self.spill_root = Path(tempfile.mkdtemp(prefix="lowbit-activations-", dir=spill_dir))
        self._spill_seq = 0

    # --- structure ----------------------------------------------------------------------------------

    def check(self, methods: list) -> None:
        """Refuse, before any work, what onloading cannot do."""
        from lowbit.methods.base import MethodConfig

        for m in methods:
            if type(m).prepare is not MethodConfig.prepare or type(m).finetune is not MethodConfig.finetune:
                raise ValueError(f"{m.name} looks at the whole model before or after the units; it cannot run "
                                 "with onloading (quantize in memory instead)")  # fmt: skip
        missing = [key for _, _, key, is_param in _slots(self.model) if is_param and key not in self.source
                   and not self._tied_elsewhere(key)]  # fmt: skip
        if missing:
            raise ValueError(f"{self.source.dir}: onloading reads tensors by their names in the model, and "
                             f"{len(missing)} are not in its safetensors files (e.g. {', '.join(missing[:3])}); "
                             "a checkpoint whose names transformers converts on load needs the in-memory path")  # fmt: skip

    def _tied_elsewhere(self, key: str) -> bool:
        """A parameter shared with another name that the source holds (an output layer tied to the embedding)."""
        obj = self._param_object(key)
        return any(k in self.source for k in self._names_of(obj))

    def _param_object(self, key: str):
        owner, _, attr = key.rpartition(".")
        return self.model.get_submodule(owner)._parameters.get(attr) if owner else self.model._parameters.get(attr)

    def _names_of(self, obj) -> list[str]:
        return [key for m, attr, key, _ in _slots(self.model) if m._parameters.get(attr) is obj]

    def attach(self, units: list) -> None:
        """Read the modules that no quantizing unit holds (the embedding, the final norm) when a
        forward first calls them."""
        from lowbit.nn.qmodule import QModule, QSite

        working = [n for u in units for n in u.modules
                   if any(isinstance(m, (QModule, QSite)) for m in self.model.get_submodule(n).modules())]  # fmt: skip
        inside = tuple(n + "." for n in working)
        for name, m in self.model.named_modules():
            if not name or name in working or name.startswith(inside):
                continue
            if any(p.device.type == "meta" for p in m.parameters(recurse=False)):
                self._hooks.append(m.register_forward_pre_hook(lambda mod, _args, n=name: self._load_module(n)))

    def _load_module(self, name: str) -> None:
        m = self.model.get_submodule(name)
        if not any(p.device.type == "meta" for p in m.parameters(recurse=False)):
            return
        for attr, p in list(m._parameters.items()):
            if p is not None and p.device.type == "meta":
                self._materialize(f"{name}.{attr}", p)
        self._outside.append(m)

    def release_outside(self) -> None:
        """Drop the modules outside the units that a capture read (they are read again if needed)."""
        for m in self._outside:
            for attr, p in list(m._parameters.items()):
                if p is not None:
                    self._replace(p, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False))  # fmt: skip
        self._outside = []

    # --- units --------------------------------------------------------------------------------------

    def load(self, spec) -> None:
        """Every tensor of the unit's modules from the source, in fp32, on the compute device."""
        from lowbit.nn.qmodule import QModule
        from lowbit.quantized_weight import check_finite

        for top in spec.modules:
            for mname, m in self.model.get_submodule(top).named_modules(prefix=top):
                for attr, p in list(m._parameters.items()):
                    if p is None or p.device.type != "meta":
                        continue
                    key = f"{mname}.{attr}"
                    t = self._materialize(key, p, transpose=isinstance(m, QModule) and m.source == "Conv1D"
                                          and attr == "weight")  # fmt: skip
                    if isinstance(m, QModule) and attr == "weight":
                        check_finite(t, f"{key} (in {self.source.file_of(self._source_key(key))})")
                for attr, b in list(m._buffers.items()):
                    key = f"{mname}.{attr}"
                    if b is not None and attr not in m._non_persistent_buffers_set and key in self.source:
                        m._buffers[attr] = self.source.read(key, b.dtype).to(self.device)

    def _source_key(self, key: str) -> str:
        if key in self.source:
            return key
        return next(k for k in self._names_of(self._param_object(key)) if k in self.source)

    def _materialize(self, key: str, old: nn.Parameter, transpose: bool = False) -> torch.Tensor:
        src = self._source_key(key)
        t = self.source.read(src, torch.float32)
        if transpose:
            t = t.t().contiguous()
        if tuple(t.shape) != tuple(old.shape):
            raise ValueError(f"{self.source.file_of(src)}: {src} has shape {list(t.shape)}, the model's "
                             f"config gives {list(old.shape)}")  # fmt: skip
        t = t.to(self.device)
        self.loaded_from_source[key] = t
        self._replace(old, nn.Parameter(t, requires_grad=False))
        return t

    def _replace(self, old, new) -> None:
        """Put ``new`` wherever the model holds the parameter object ``old`` (tied names too)."""
        for m in self.model.modules():
            for attr, p in m._parameters.items():
                if p is old:
                    m._parameters[attr] = new

    def unchanged(self, key: str, t: torch.Tensor) -> bool:
        """Whether ``t`` is still exactly what was read for ``key`` (a resume record need not keep it)."""
        src = self.loaded_from_source.get(key)
        return src is not None and src.shape == t.shape and bool(torch.equal(src, t.to(src.device)))

    def write(self, spec) -> None:
        """The finished (frozen) unit's state into its own shard; then its memory is freed."""
        from lowbit.io.native import collect

        tensors, layers, tied = collect(self.model, spec.modules)
        self._shard(tensors)
        self.written_units.extend(n + "." for n in spec.modules)
        self.layers.update(layers)
        self.tied.update(tied)
        for top in spec.modules:
            root = self.model.get_submodule(top)
            for m in root.modules():
                if hasattr(m, "_cache"):
                    m._cache = {}
            root.to("meta")
        self.loaded_from_source = {k: v for k, v in self.loaded_from_source.items()
                                   if not k.startswith(tuple(n + "." for n in spec.modules))}  # fmt: skip
        give_back_memory()

    def _shard(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        name = f"model-{self.shards:05d}.safetensors"
        save_file(tensors, str(self.out / name), metadata={"format": "pt"})
        self.shards += 1
        self.weight_map.update(dict.fromkeys(tensors, name))

    # --- activations ----------------------------------------------------------------------------------

    def spill(self, outputs, inputs) -> SpilledInputs:
        """``advance`` through files: ``outputs(sink)`` hands each batch's output to the next unit's
        inputs as it is computed, so no more than one batch of them is in memory."""
        store = SpilledInputs(self.spill_root, f"a{self._spill_seq:05d}")
        self._spill_seq += 1

        def put(out):
            args, kwargs = inputs[len(store)]
            store.append(((out.cpu(), *args[1:]), kwargs))

        outputs(put)
        if len(store) != len(inputs):
            raise RuntimeError(f"a unit gave {len(store)} outputs for {len(inputs)} calibration batches")
        if isinstance(inputs, SpilledInputs):
            inputs.drop()
        return store

    # --- the end -------------------------------------------------------------------------------------

    def close(self, model: nn.Module, tokenizer=None) -> None:
        """Write what no unit wrote (from memory or, tensor by tensor, from the source), the index
        and the config; the hooks and the spilled activations go."""
        from lowbit.io import model_card
        from lowbit.io.native import QUANT_METHOD, _structure, copy_tokenizer, hf_config

        for h in self._hooks:
            h.remove()
        written = set(self.weight_map) | set(self.tied)
        first_name: dict[int, str] = {}
        batch: dict[str, torch.Tensor] = {}
        size = 0
        for key, t in model.state_dict(keep_vars=True).items():
            if key in written or key.startswith(tuple(self.written_units)):
                continue
            if id(t) in first_name:  # the same parameter under another name: tied
                self.tied[key] = first_name[id(t)]
                continue
            first_name[id(t)] = key
            if t.device.type == "meta":
                t = self.source.read(self._source_key(key), t.dtype)
            batch[key] = t.detach().cpu().contiguous()
            size += batch[key].nbytes
            if size >= REST_SHARD_BYTES:
                self._shard(batch)
                batch, size = {}, 0
        self._shard(batch)
        (self.out / INDEX).write_text(json.dumps({"metadata": {"format": "lowbit-onload"},
                                                  "weight_map": self.weight_map}, indent=1))  # fmt: skip
        config = hf_config(model)
        coverage = getattr(model, "lowbit_coverage", None)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "recipe": getattr(model, "lowbit_recipe", []),
            "family": getattr(model, "lowbit_family", None),
            "layers": self.layers,
            "structure": _structure(model),
            "tied": self.tied,
            "coverage": coverage.to_dict() if coverage else None,
            "provenance": getattr(model, "lowbit_provenance", None),
        }
        (self.out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        copy_tokenizer(model, tokenizer, self.out)
        model_card.write(model, self.out)
        self.cleanup()

    def cleanup(self) -> None:
        if self.spill_root is not None:
            shutil.rmtree(self.spill_root, ignore_errors=True)


# --- running a checkpoint larger than memory, unit by unit -------------------------------------------


class LazyTensors:
    """A ``WeightSource`` as the mapping of tensors (as stored) that checkpoint readers index."""

    def __init__(self, source: WeightSource):
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise KeyError(key)
        return self.source.read(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def get(self, key: str, default=None):
        return self[key] if key in self.source else default

    def __iter__(self):
        return iter(self.source.entries)

    def __len__(self) -> int:
        return len(self.source.entries)


class StreamedModel:
    """A lowbit checkpoint (sharded or not), or a plain model directory of safetensors files, whose
    blocks are built from the files one at a time: ``run_blocks`` takes the inputs of the first
    block and returns the last block's outputs, each block freed once it has run on every batch;
    modules outside the blocks (embedding, final norm, head) are read when a forward calls them."""

    def __init__(self, path: str | os.PathLike, kernel: str = "auto", device=None):
        from lowbit.io.native import _restore_structure, read_quantization_config
        from lowbit.models.adapters import adapter_for

        self.path = Path(path)
        self.qc = read_quantization_config(self.path)
        if self.qc and self.qc.get("quant_method") != "lowbit":
            raise ValueError(f"{self.path}: unit-by-unit evaluation reads lowbit checkpoints and plain "
                             f"safetensors models, not {self.qc.get('quant_method')}")  # fmt: skip
        self.source = WeightSource(self.path)
        self.tensors = LazyTensors(self.source)
        self.kernel, self.device = kernel, torch.device(device or "cpu")
        self.model = empty_model(self.path)
        with parameters_on_meta():
            _restore_structure(self.model, self.qc.get("structure") or {}, self.tensors)
        self.adapter = adapter_for(self.model)
        self.blocks = [n for n, _ in self.adapter.blocks(self.model)]
        if not self.blocks:
            raise ValueError(f"{self.path}: no blocks to run one at a time ({type(self.model).__name__})")
        self.tied = {**(self.qc.get("tied") or {})}
        inside = tuple(n + "." for n in self.blocks)
        self._hooks = []
        for name, m in self.model.named_modules():
            outside = name and name not in self.blocks and not name.startswith(inside)
            if outside and any(p.device.type == "meta" for p in m.parameters(recurse=False)):
                self._hooks.append(m.register_forward_pre_hook(lambda mod, _a, n=name: self._load_plain(n)))
        self.model.lowbit_source = str(self.path)

    def _read(self, key: str, param) -> torch.Tensor:
        names = [key, self.tied.get(key)] + [k for m, a, k, _ in _slots(self.model) if m._parameters.get(a) is param]
        src = next((k for k in names if k is not None and k in self.source), None)
        if src is None:
            raise ValueError(f"{self.path}: {key} is in no weight file")
        return self.source.read(src, torch.float32).to(self.device)

    def _load_plain(self, name: str) -> None:
        m = self.model.get_submodule(name)
        for attr, p in list(m._parameters.items()):
            if p is not None and p.device.type == "meta":
                new = nn.Parameter(self._read(f"{name}.{attr}", p), requires_grad=False)
                for owner in self.model.modules():  # a head tied to the embedding: one tensor for both
                    for a, q in owner._parameters.items():
                        if q is p:
                            owner._parameters[a] = new

    def load_block(self, name: str) -> nn.Module:
        from lowbit.io.native import build_layer
        from lowbit.models.adapters import set_module

        layers = self.qc.get("layers", {})
        for lname, info in layers.items():
            if lname.startswith(name + "."):
                set_module(self.model, lname, build_layer(self.tensors, lname, info, self.kernel, self.path))
        block = self.model.get_submodule(name)
        for mname, _ in list(block.named_modules(prefix=name)):
            if mname not in layers:
                self._load_plain(mname)
        return block.to(self.device)

    def free_block(self, name: str) -> None:
        block = self.model.get_submodule(name)
        for m in block.modules():
            if hasattr(m, "_cache"):
                m._cache = {}
        block.to("meta")
        give_back_memory()

    def run_blocks(self, inputs, progress: bool = True, spill_dir=None) -> list:
        """Every block in turn over ``inputs`` (the first block's captured ``(args, kwargs)``);
        the last block's raw outputs, one per batch."""
        from tqdm.auto import tqdm

        from lowbit.engine.capture import first_output

        spill = Path(tempfile.mkdtemp(prefix="lowbit-activations-", dir=spill_dir)) if spill_dir else None
        try:
            for i, name in enumerate(tqdm(self.blocks, desc="blocks", unit="block", disable=not progress)):
                block = self.load_block(name)
                last = i == len(self.blocks) - 1
                nxt = SpilledInputs(spill, f"b{i:05d}") if spill is not None and not last else []
                with torch.no_grad():
                    for args, kwargs in inputs:
                        out = block(*args, **kwargs)
                        nxt.append(out if last else ((first_output(out), *args[1:]), kwargs))
                if isinstance(inputs, SpilledInputs):
                    inputs.drop()
                self.free_block(name)
                inputs = nxt
            return inputs
        finally:
            if spill is not None:
                shutil.rmtree(spill, ignore_errors=True)

    def replay(self, outputs: list):
        """A context in which the model's forward takes the blocks' outputs from ``outputs`` (one per
        forward call, in order) instead of computing them: what runs after the blocks (final norm,
        head, loss) runs for real."""
        return _Replay(self, outputs)


class _ReplayedBlock(nn.Module):
    def __init__(self, state: dict, last: bool):
        super().__init__()
        self.state, self.last = state, last

    def forward(self, *args, **kwargs):
        out = self.state["outputs"][self.state["i"]]
        if self.last:
            self.state["i"] += 1
        return out


class _Replay:
    def __init__(self, streamed: StreamedModel, outputs: list):
        self.streamed, self.state = streamed, {"outputs": outputs, "i": 0}

    def __enter__(self):
        from lowbit.models.adapters import set_module

        self.saved = {n: self.streamed.model.get_submodule(n) for n in self.streamed.blocks}
        for n in self.streamed.blocks:
            set_module(self.streamed.model, n, _ReplayedBlock(self.state, n == self.streamed.blocks[-1]))
        return self.streamed.model

    def __exit__(self, *exc):
        from lowbit.models.adapters import set_module

        for n, m in self.saved.items():
            set_module(self.streamed.model, n, m)
        return False
