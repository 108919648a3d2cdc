"""The public verb: ``lowbit.quantize(model, method_or_recipe, calib=..., **config)``, for every
model family."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lowbit.engine import distributed
from lowbit.engine.loop import run
from lowbit.files import file_sha256
from lowbit.io.model_card import api_command, lowbit_version
from lowbit.methods import MethodConfig, check_recipe, parse_recipe
from lowbit.models.adapters import adapter_for, plan
from lowbit.nn.qmodule import op_kind
from lowbit.quantized_weight import check_finite

# Weight granularity per model family when a recipe built from names does not set it: vision
# models' papers quantize weights per output channel; language models per group of 128.
FAMILY_GROUP_SIZE = {"cnn": -1, "vit": -1}
# Bits of the first and last quantized layers (weights and their input activations) by default.
FAMILY_FIRST_LAST_BITS = {"cnn": 8, "vit": 8}


def quantize(
    model: nn.Module,
    method_or_recipe: str | MethodConfig | list = "rtn",
    *,
    calib=None,
    tokenizer=None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    skip: list[str] | tuple[str, ...] = (),
    include_lm_head: bool = False,
    first_last_bits: int | None | str = "auto",
    kernel: str = "auto",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    onload=None,
    provenance: dict | None = None,
    **config,
) -> nn.Module:
    """Quantize ``model`` in place and return it: any ``nn.Module`` (a language model, an encoder,
    a ViT, a CNN), any registered method or recipe.

    ``method_or_recipe``: a registered name (``"rtn"``, ``"gptq"``, ``"qdrop"``), a
    ``+``-joined recipe (``"awq+gptq"``), a method config, or a list of them;
    ``config`` fills the configs built from names (``bits=4, group_size=128``).
    The last method of a recipe decides the codes; the methods before it transform
    the model first.

    ``calib`` (for methods that need data): token ids ``[n, seqlen]``, a float tensor of
    model inputs (images ``[n, 3, H, W]``), a list of model inputs, or a text file path
    read with ``tokenizer`` into ``nsamples`` random windows of ``seqlen`` tokens
    (``seed``). ``skip``: glob patterns of module names to keep in full precision.
    ``first_last_bits``: bits of the first and last quantized layers (``"auto"``: 8 for
    vision models, as their papers keep them; ``None``: like the rest). Every parameter of
    two or more dimensions ends up in ``model.lowbit_coverage``, quantized (by the method
    that really decided its codes) or skipped with a reason.

    ``checkpoint_dir``: record each finished unit there (atomically); with ``resume=True`` a
    run interrupted at any moment continues from its last finished unit and ends bit-identical
    to an uninterrupted one. The record stays until ``model.lowbit_progress.finish()`` (the CLI
    calls it once the checkpoint is written).

    ``onload``: used by ``quantize_to_disk`` (a model larger than memory, read and written unit by unit).

    ``model.lowbit_provenance`` records what the model card of a saved checkpoint shows: the source,
    the calibration data (windows, seed, sha256 of the inputs; the file and its sha256 when ``calib``
    is a path), the time, the versions and the call; ``provenance`` overrides its fields (the CLI
    passes its command line and calibration file).
    """
    start = time.perf_counter()
    adapter = adapter_for(model)
    if isinstance(method_or_recipe, str) and "group_size" not in config and adapter.family in FAMILY_GROUP_SIZE:
        config["group_size"] = FAMILY_GROUP_SIZE[adapter.family]
    methods = [m.for_family(adapter.family) for m in parse_recipe(method_or_recipe, **config)]
    check_recipe(methods)
    quantizer = methods[-1]
    if not quantizer.quantizes:
        raise ValueError(f"recipe ends with {quantizer.name}, which does not quantize; add a quantizer such as rtn")
    for m in methods:
        reason = m.refuses(adapter.family)
        if reason:
            raise ValueError(f"{m.name} cannot run on {type(model).__name__} ({adapter.family}): {reason}")
    needs_data = any(m.needs_calibration for m in methods) or quantizer.static_activations
    if methods[:-1] and not needs_data:
        raise ValueError(f"{'+'.join(m.name for m in methods)}: transforms need calibration data")
    given = _calibration_batches(calib, tokenizer, nsamples, seqlen, seed, batch_size) if calib is not None else None
    if needs_data and given is None:
        _calibration_batches(None, tokenizer, nsamples, seqlen, seed, batch_size)  # says what to pass
    batches = given if needs_data else None
    if distributed.active() and batches is not None:  # torchrun: this process's share of the calibration data
        distributed.check_methods(methods)
        batches = distributed.shard(batches)
    model.eval()
    notes = adapter.prepare(model, _example(given))  # calibration data, even unused, checks BatchNorm folding
    targets = plan(model, skip=skip, include_lm_head=include_lm_head, adapter=adapter)
    todo = [t for t in targets if t.skip is None]
    if not todo and not any(t.skip == "already quantized" for t in targets):
        raise ValueError(f"{type(model).__name__} holds no layer lowbit can quantize (linears or convs)")
    for t in todo:
        if op_kind(t.module) is not None and onload is None:  # onloading checks each unit as it reads it
            check_finite(t.module.weight.detach(), f"{t.name}.weight")
    if first_last_bits == "auto":
        first_last_bits = FAMILY_FIRST_LAST_BITS.get(adapter.family)
    progress_record = None
    if checkpoint_dir is not None:
        from lowbit.engine.checkpoint import Progress, fingerprint_batches

        fingerprint = {"model": str(getattr(model, "lowbit_source", type(model).__name__)),
                       "recipe": [{"method": m.name, **asdict(m)} for m in methods],
                       "calibration_sha256": fingerprint_batches(batches), "skip": list(skip),
                       "include_lm_head": include_lm_head, "first_last_bits": first_last_bits, "kernel": kernel,
                       "torch": torch.__version__}  # fmt: skip
        progress_record = Progress(checkpoint_dir, fingerprint, resume)
        if progress and progress_record.done:
            print(f"lowbit: resuming after {progress_record.done} finished units ({checkpoint_dir})", file=sys.stderr)
    if onload is not None:
        onload.device = _default_device(device)
    try:
        coverage = run(model, adapter, methods, targets, batches, _default_device(device), first_last_bits,
                       progress, kernel, progress_record, onload)  # fmt: skip
    except BaseException:
        if progress_record is not None:
            progress_record.release()  # the finished units stay for --resume
        raise
    model.lowbit_progress = progress_record
    model.lowbit_coverage = coverage
    model.lowbit_recipe = [{"method": m.name, **asdict(m)} for m in methods]
    model.lowbit_family = adapter.family
    model.lowbit_notes = notes
    model.lowbit_seconds = time.perf_counter() - start
    call = dict(config, nsamples=nsamples, seqlen=seqlen, seed=seed) if given is not None else config
    model.lowbit_provenance = {
        "source": str(getattr(model, "lowbit_source", None) or type(model).__name__),
        "command": api_command(method_or_recipe, call, calib if given is not None else None),
        "calibration": _calibration_record(calib, given, seed) if needs_data else None,
        "seconds": round(model.lowbit_seconds, 3),
        "lowbit": lowbit_version(),
        "torch": torch.__version__,
        "evaluation": [],
    }
    for key, value in (provenance or {}).items():
        if key == "calibration" and model.lowbit_provenance["calibration"] is not None:
            model.lowbit_provenance["calibration"].update(value or {})
        elif key != "calibration":
            model.lowbit_provenance[key] = value
    return model


def _calibration_record(calib, batches, seed: int) -> dict:
    """What the model card says of the calibration data."""
    from lowbit.engine.checkpoint import fingerprint_batches

    record: dict = {"windows": 0, "seed": seed, "sha256": fingerprint_batches(batches)}
    for b in batches or []:
        if torch.is_tensor(b):
            record["windows"] += b.shape[0]
            if not b.is_floating_point() and b.dim() == 2:
                record["tokens_per_window"] = b.shape[1]
        else:
            record["windows"] += 1
    if isinstance(calib, (str, os.PathLike)):
        record["path"] = str(calib)
        record["file_sha256"] = file_sha256(calib)
    return record


def quantize_to_disk(
    model: str | os.PathLike,
    method_or_recipe: str | MethodConfig | list = "rtn",
    *,
    out: str | os.PathLike,
    tokenizer=None,
    spill_activations: bool = False,
    device: str | torch.device | None = None,
    **kwargs,
) -> nn.Module:
    """Quantize the model in directory ``model`` (safetensors files) into the lowbit checkpoint
    ``out`` without ever holding the whole model: each unit is read from the source shards when
    the engine reaches it and written to its own output shard when finished (sequential
    onloading, ``lowbit.io.onload``). Peak memory is about the largest unit in fp32 plus the
    calibration activations (one batch of them with ``spill_activations``, which keeps them in
    files beside ``out``) plus a fixed overhead.

    The checkpoint equals what ``quantize`` then ``save`` write for the same model and recipe
    (``lowbit.load`` reads it). ``kwargs`` are ``quantize``'s (``calib``, ``checkpoint_dir`` and
    ``resume`` included). Returns the model skeleton (parameters on ``meta``) carrying the
    coverage report, recipe and timings."""
    from lowbit.io.native import atomic_directory
    from lowbit.io.onload import Onload, WeightSource, empty_model
    from lowbit.models.loading import resolve_model_path

    model = resolve_model_path(str(model))
    source = WeightSource(model)
    net = empty_model(model)
    out = Path(out)
    with atomic_directory(out) as tmp:
        onload = Onload(net, source, tmp, device, spill_dir=out.parent if spill_activations else None)
        try:
            quantize(net, method_or_recipe, tokenizer=tokenizer, device=device, onload=onload, **kwargs)
            onload.close(net, tokenizer)
        finally:
            onload.cleanup()
    return net


def _example(batches):
    if not batches:
        return None
    b = batches[0]
    return b[:2] if torch.is_tensor(b) else b


def _calibration_batches(calib, tokenizer, nsamples, seqlen, seed, batch_size) -> list:
    from lowbit.data import calibration_windows, read_text

    if calib is None:
        raise ValueError("this recipe needs calibration data: pass calib= (token ids, images or a text file)")
    if isinstance(calib, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("calib is a text file: pass tokenizer= to read it")
        calib = calibration_windows(tokenizer, read_text(calib), nsamples, seqlen, seed)
    if torch.is_tensor(calib):
        if calib.dim() == 1:
            calib = calib.unsqueeze(0)
        if calib.is_floating_point() and not bool(torch.isfinite(calib).all()):
            raise ValueError("calibration inputs hold NaN or Inf")
        size = batch_size or (8 if calib.dtype == torch.long else 256)
        return list(calib.split(size))
    if isinstance(calib, (list, tuple)) and calib:
        return list(calib)
    raise TypeError("calib must be token ids [n, seqlen], a tensor of inputs, a list of model inputs, or a text file")


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
