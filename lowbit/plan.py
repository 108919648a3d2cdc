"""``lowbit plan``: what a quantization run will need, before any work.

From the model's ``config.json`` and the headers of its weight files (no tensor is
read): the architecture is built on PyTorch's ``meta`` device (shapes, no memory),
the engine's own planning says which layers it quantizes and which units it walks,
and the run's peak resident memory, disk and time are estimated:

- memory (today's engine holds the whole model, in fp32, in memory): the fp32
  model + the calibration activations between units (the unit's inputs and outputs,
  twice for methods that also follow the float model) + the largest unit's working
  set (its forward on one calibration batch, and for Hessian methods the Hessians of
  its linears) + a fixed overhead for Python, PyTorch and transformers (1.2 GiB);
- disk: the checkpoint (codes, scales and zero points at the format's bits, the
  layers kept in full precision in fp32) and, while the run lasts, the resume record
  (each finished unit's fp32 state);
- time: the calibration forward passes (2 FLOPs per weight per token, about three
  passes per unit for Hessian methods) and GPTQ's per-layer work (its blocked
  updates, ``rows x cols^2`` FLOPs, and the Cholesky factorisation), at the GEMM
  rate this machine measures in a short probe, plus a per-column cost for GPTQ's
  column loop. An estimate: it says so, and what it assumed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.io.onload import safetensors_header

GIB = 1024**3
OVERHEAD = int(1.2 * GIB)
HESSIAN_METHODS = ("gptq", "awq+gptq", "gptvq", "spqr", "owq")


@dataclass
class Plan:
    model: str
    parameters: int
    quantized_weights: int
    kept_weights: int
    units: int
    largest_unit: str
    weight_files_bytes: int
    peak_memory_bytes: int
    memory_parts: dict = field(default_factory=dict)
    checkpoint_bytes: int = 0
    resume_record_bytes: int = 0
    estimated_seconds: float = 0.0
    gflops: float = 0.0
    machine_memory_bytes: int | None = None
    fits: bool | None = None
    onload_peak_memory_bytes: int = 0
    onload_memory_parts: dict = field(default_factory=dict)
    onload_fits: bool | None = None
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        def gib(b: int) -> str:
            return f"{b / GIB:.2f} GiB"

        lines = [
            (f"{self.model}: {self.parameters / 1e6:.1f}M parameters ({self.quantized_weights / 1e6:.1f}M to "
             f"quantize, {self.kept_weights / 1e6:.1f}M kept), {self.units} units (largest {self.largest_unit}); "
             f"weight files {gib(self.weight_files_bytes)}"),
            f"peak memory  ~{gib(self.peak_memory_bytes)}  ("
            + ", ".join(f"{k} {gib(v)}" for k, v in self.memory_parts.items()) + ")",
            (f"disk         checkpoint ~{gib(self.checkpoint_bytes)}; resume record up to "
             f"~{gib(self.resume_record_bytes)} while it runs (with --onload about the checkpoint's size: "
             "what was read unchanged is read again on resume)"),
            f"time         ~{_duration(self.estimated_seconds)} at {self.gflops:.0f} GFLOP/s (measured GEMM rate)",
        ]
        lines.insert(2, f"with --onload ~{gib(self.onload_peak_memory_bytes)}  ("
                     + ", ".join(f"{k} {gib(v)}" for k, v in self.onload_memory_parts.items()) + ")")
        if self.machine_memory_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"this machine {gib(self.machine_memory_bytes)} of memory: the run {verdict} in memory; "
                         f"with --onload it {'fits' if self.onload_fits else 'does NOT fit'}")
        lines += [f"  assumed: {a}" for a in self.assumptions]
        return "\n".join(lines)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def machine_memory() -> int | None:
    """Total physical memory (Linux), or ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gemm_gflops(seconds: float = 0.3) -> float:
    """The fp32 GEMM rate of this machine at PyTorch's thread count (a short probe)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def weight_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin"), *directory.glob("*.gguf")])


def _meta_model(directory: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from lowbit.models.loading import is_causal_lm

    config = AutoConfig.from_pretrained(str(directory))
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with torch.device("meta"):
        return cls.from_config(config)


def make_plan(model: str, method: str = "rtn", bits: int = 4, group_size: int = 128, nsamples: int = 128,
              seqlen: int = 512, batch_size: int = 8, probe: bool = True) -> Plan:  # fmt: skip
    """The plan of ``lowbit quantize MODEL --method METHOD ...`` for a transformers model directory."""
    from lowbit.models.adapters import adapter_for, is_linear, plan
    from lowbit.models.loading import resolve_model_path
    from lowbit.models.moe import unfuse_experts

    directory = Path(resolve_model_path(model))
    if not directory.is_dir():
        raise FileNotFoundError(f"{model}: lowbit plan reads a local model directory (config.json and weights)")
    files = weight_files(directory)
    for f in files:
        if f.suffix == ".safetensors":
            safetensors_header(f)  # a corrupted shard is named now, not hours into the run
    net = _meta_model(directory)
    unfuse_experts(net)
    adapter = adapter_for(net)
    targets = plan(net, adapter=adapter)
    total = sum(p.numel() for p in net.parameters())
    quantized = sum(t.numel for t in targets if t.skip is None)
    units = adapter.units(net)
    hidden = getattr(net.config, "hidden_size", None) or max(
        (m.in_features for m in net.modules() if isinstance(m, nn.Linear)), default=0
    )
    tokens = nsamples * seqlen
    hessian = method.lower() in HESSIAN_METHODS or method.lower().endswith("gptq")
    needs_data = method.lower() != "rtn"

    def unit_params(spec) -> int:
        return sum(p.numel() for n in spec.modules for p in net.get_submodule(n).parameters())

    def unit_linears(spec) -> list[nn.Module]:
        return [m for n in spec.modules for m in net.get_submodule(n).modules() if is_linear(m)]

    largest = max(units, key=unit_params)
    cfg = net.config
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    work = batch_size * seqlen * (3 * inter + 6 * hidden) * 4 + batch_size * heads * seqlen * seqlen * 4
    hess = 0
    if hessian:  # every linear's Hessian, and the solve of the widest: its copy, inverse and Cholesky factors + W
        hess = max((sum(m.in_features**2 * 4 for m in unit_linears(u))
                    + max((3 * m.in_features**2 * 4 + 2 * m.weight.numel() * 4 for m in unit_linears(u)), default=0)
                    for u in units), default=0)  # fmt: skip
    acts = tokens * hidden * 4 * 2 * (2 if method.lower() in ("adaround", "brecq", "qdrop") else 1) if needs_data else 0
    parts = {"fp32 model": total * 4, "calibration activations": acts, "largest unit's work": work + hess,
             "overhead": OVERHEAD}  # fmt: skip
    peak = sum(parts.values())
    quantizing = [t.name for t in targets if t.skip is None]
    units_inside = tuple(n + "." for u in units for n in u.modules
                         if any(q == n or q.startswith(n + ".") for q in quantizing))  # fmt: skip
    outside = max((p.numel() for n, p in net.named_parameters() if not n.startswith(units_inside)), default=0)
    batch_acts = batch_size * seqlen * hidden * 4 * 2 if needs_data else 0
    onload_parts = {"largest unit in fp32": unit_params(largest) * 4, "embedding while capturing": outside * 4,
                    "calibration activations": acts, "largest unit's work": work + hess, "overhead": OVERHEAD}
    onload_spilled = {**onload_parts, "calibration activations": batch_acts}

    bpw = bits + (16 + bits) / group_size if group_size > 0 else bits + 32 / 4096
    checkpoint = int(quantized * bpw / 8 + (total - quantized) * 4)
    record = sum(unit_params(u) for u in units) * 4

    gflops = gemm_gflops() if probe else 50.0
    flops = 0.0
    seconds = quantized * 15e-9  # rounding and packing
    if needs_data:
        passes = 3 if hessian else 2
        flops += 2 * sum(unit_params(u) for u in units) * tokens * passes
    if hessian:
        for u in units:
            for m in unit_linears(u):
                rows, cols = m.out_features, m.in_features
                flops += 2 * rows * cols * cols / 2 + cols**3 / 3 + 2 * tokens * cols * cols
                seconds += cols * (12e-6 + rows * 2e-9)  # the column loop's per-column cost
    seconds += flops / (gflops * 1e9)
    mem = machine_memory()
    assumptions = [
        f"{method}, {bits}-bit, group {group_size}; {nsamples} calibration windows of {seqlen} tokens"
        + ("" if needs_data else " (not used by rtn)"),
        ("in memory: the whole model in fp32; --onload: one unit at a time from the safetensors files "
         f"(--spill-activations: one batch of activations in memory, ~{sum(onload_spilled.values()) / GIB:.2f} GiB)"),
        "time from this machine's GEMM rate; methods that train (adaround, brecq, qdrop) take longer",
    ]
    return Plan(model=str(directory), parameters=total, quantized_weights=quantized, kept_weights=total - quantized,
                units=len(units), largest_unit=largest.name, weight_files_bytes=sum(f.stat().st_size for f in files),
                peak_memory_bytes=int(peak), memory_parts={k: int(v) for k, v in parts.items()},
                checkpoint_bytes=checkpoint, resume_record_bytes=int(record), estimated_seconds=float(seconds),
                gflops=gflops, machine_memory_bytes=mem, fits=None if mem is None else peak < mem * 0.9,
                onload_peak_memory_bytes=int(sum(onload_parts.values())),
                onload_memory_parts={k: int(v) for k, v in onload_parts.items()},
                onload_fits=None if mem is None else sum(onload_parts.values()) < mem * 0.9,
                assumptions=assumptions)  # fmt: skip

