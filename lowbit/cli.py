"""The ``lowbit`` command line: quantize, eval, info, demo.

With ``--json`` exactly one JSON object goes to stdout; progress and logs go to
stderr. Bad input ends with a one-line ``error: ...`` and exit code 2, before
anything is written.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import typer

from lowbit.catalog import method_help

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize trained neural networks.")

TOKENIZER_HINT = "save its tokenizer files (tokenizer.json or tokenizer.model) in the model directory"
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, TypeError, ImportError)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        typer.echo(human)


def _fail(err: Exception) -> None:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="model directory, hub id, checkpoint, or alias (minilm, stories260K, "
                                          "resnet20, resnet32, vit_cifar)"),
    out: Path = typer.Option(..., "--out", help="directory to write; must not exist or be empty"),
    method: str = typer.Option("rtn", help=method_help()),
    recipe_file: Path | None = typer.Option(None, "--recipe", help="YAML recipe (overrides --method)"),
    bits: int | None = typer.Option(None, help="weight bits, 2-8 (default 4; 8 for llmint8)"),
    group_size: int | None = typer.Option(
        None, "--group-size", help="group size; -1 for per-channel (default 128; per-channel for vision models)"
    ),
    sym: bool | None = typer.Option(
        None, "--sym/--asym", help="symmetric or asymmetric (zero-point) weights (default asym for int weights)"
    ),
    fmt: str | None = typer.Option(None, "--format", help="int (default), lut (a learned codebook per channel or "
                                      "group; squeezellm's default), bcq, vq, nf4, fp4, the fixed grids pot "
                                      "(powers of two), apot (additive powers of two) and log (powers of sqrt 2), "
                                      "fp8_e4m3 or fp8_e5m2"),
    mse: bool | None = typer.Option(
        None, "--mse/--no-mse", help="clip-search each group's range or scale (default: off for rtn, on for gptq)"
    ),
    scale_bits: int | None = typer.Option(
        None, "--scale-bits", help="store the scales quantized to this many bits (QLoRA's double quantization: 8; "
                                   "SpQR: 3; default: fp16 scales; nf4's default 8, spqr's 3)",
    ),
    scale_group_size: int | None = typer.Option(
        None, "--scale-group-size", help="scales per second-level group along the output channels (default 256; spqr 16)"
    ),
    act_bits: int | None = typer.Option(
        None, "--act-bits", help="integer activations (2-8; 8 for W8A8) and an integer matmul (default: none, weights only)"
    ),
    act_granularity: str | None = typer.Option(
        None, "--act-granularity",
        help="activation scales: token (one per row) or tensor (default: token for language models, tensor for vision)",
    ),
    act_dynamic: bool | None = typer.Option(
        None, "--act-dynamic/--act-static",
        help="scales at run time or from calibration (default: token dynamic, tensor static, which needs --calib)",
    ),
    act_sym: bool | None = typer.Option(None, "--act-sym/--act-asym", help="symmetric or zero-point activations (default: symmetric for language models, zero-point for vision)"),
    act_observer: str | None = typer.Option(
        None, "--act-observer", help="static scales: minmax (default for language models), ema, percentile, "
                                     "mse (default for vision models), kl or ptf (per-channel power-of-two)",
    ),
    calib: Path | None = typer.Option(
        None, "--calib", "--calib-images",
        help="calibration data: a text file (language models, encoders) or CIFAR-10 images, a .tar.gz or a "
             "folder of class folders (vision models)",
    ),
    iters: int | None = typer.Option(
        None, "--iters", help="optimisation steps per unit (adaround, brecq, qdrop: default 1000; signround: 200)"
    ),
    first_last_bits: int | None = typer.Option(
        None, "--first-last-bits", help="bits of the first and last quantized layers (default 8 for vision models; "
                                        "0: as the rest; language models: as the rest)",
    ),
    nsamples: int | None = typer.Option(None, help="calibration windows (default 128), or images (default 1024)"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    skip: list[str] = typer.Option([], "--skip", help="glob of module names to keep in full precision (repeatable; default: none)"),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="quantize the output projection too (default: kept in full precision)"),
    resume: bool = typer.Option(False, "--resume", help="continue a run that was interrupted (it records each "
                                "finished unit beside --out until the checkpoint is written)"),
    onload: bool = typer.Option(False, "--onload", help="a model larger than memory: read each unit from the "
                                "safetensors files when reached, write it to its own output shard when done "
                                "(lowbit plan says when it is needed)"),
    spill_activations: bool = typer.Option(False, "--spill-activations", help="with --onload: keep the calibration "
                                           "activations between units in files beside --out, one batch in memory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Quantize MODEL (any family) and write a lowbit checkpoint to --out, with its model card (README.md)
    (example: lowbit quantize stories260K --method gptq --bits 4 --group-size 32 --calib
    ../shared/assets/text/tinystories_dev.txt --nsamples 32 --seqlen 256 --out stories-gptq)."""
    import lowbit
    from lowbit.engine import distributed
    from lowbit.engine.checkpoint import progress_dir_for
    from lowbit.files import file_sha256
    from lowbit.io.model_card import cli_command
    from lowbit.io.native import check_output_dir
    from lowbit.methods import check_recipe, load_recipe, parse_recipe
    from lowbit.models.adapters import adapter_for

    try:
        rank, world_size = distributed.init_from_env()  # under torchrun: data-parallel calibration
        if rank == 0:
            check_output_dir(out)
        if world_size > 1 and resume:
            raise ValueError("--resume is for one process; data-parallel runs (torchrun) do not record progress yet")
        config = dict(bits=bits, group_size=group_size, symmetric=sym, format=fmt, mse=mse, scale_bits=scale_bits,
                      scale_group_size=scale_group_size, act_bits=act_bits,
                      act_granularity=act_granularity, act_dynamic=act_dynamic, act_symmetric=act_sym,
                      act_observer=act_observer, iters=iters, seed=seed)  # fmt: skip
        if iters is not None and iters < 1:
            raise ValueError(f"--iters {iters} is invalid; use at least 1")
        if nsamples is not None and nsamples < 1:
            raise ValueError(f"--nsamples {nsamples} is invalid; use at least 1")
        recipe = load_recipe(recipe_file, **config) if recipe_file else parse_recipe(method, **config)
        check_recipe(recipe)
        method = "+".join(m.name for m in recipe)
        if calib is not None and not calib.exists():
            raise FileNotFoundError(f"calibration data {calib} does not exist; pass a text file for language models and "
                                    "encoders (e.g. ../shared/assets/text/wikitext2_test_raw.txt) or CIFAR-10 images "
                                    "for vision models")
        _quiet_transformers()
        if spill_activations and not onload:
            raise ValueError("--spill-activations goes with --onload")
        if onload and world_size > 1:
            raise ValueError("--onload is for one process; data-parallel runs (torchrun) hold the model in memory")
        net, tokenizer = _onload_skeleton(model) if onload else _load_model(model)
        family = adapter_for(net).family
        recipe = [m.for_family(family) for m in recipe]  # e.g. static activations for vision models
        needs_data = any(m.needs_calibration for m in recipe) or recipe[-1].static_activations
        if needs_data and calib is None:
            raise ValueError(f"{method} needs calibration data; pass --calib (a text file or images)")
        data = _calibration(net, tokenizer, calib, nsamples, seqlen, seed) if calib is not None else None
        if data is not None and not needs_data:
            _log(f"note: {method} does not use calibration data; --calib was checked and not used")
        # by name, so that the model family fills what the flags leave unset (as the Python API does)
        target, overrides = (recipe, {}) if recipe_file else (method, {k: v for k, v in config.items() if v is not None})
        flb = "auto" if first_last_bits is None else (first_last_bits or None)
        card = {"command": cli_command()}  # what the model card shows
        if data is not None:
            card["calibration"] = {"path": str(calib), "file_sha256": file_sha256(calib) if calib.is_file() else None}
        common = dict(calib=data, skip=skip, include_lm_head=include_lm_head, first_last_bits=flb, provenance=card,
                      progress=not as_json and rank == 0, resume=resume,
                      checkpoint_dir=progress_dir_for(out) if world_size == 1 else None)  # fmt: skip
        if onload:  # written unit by unit as it runs
            net = lowbit.quantize_to_disk(model, target, out=out, tokenizer=tokenizer,
                                          spill_activations=spill_activations, **common, **overrides)  # fmt: skip
        else:
            lowbit.quantize(net, target, **common, **overrides)
        if rank != 0:  # every rank holds the same decisions; rank 0 writes
            distributed.barrier()
            return
        if not onload:
            lowbit.save(net, out, tokenizer=tokenizer)
        if net.lowbit_progress is not None:
            net.lowbit_progress.finish()
        distributed.barrier()
    except USER_ERRORS as e:
        _fail(e)
    cov = net.lowbit_coverage
    done, total = cov.block_counts()
    quantizer = net.lowbit_recipe[-1]
    decided = lowbit.make_method(quantizer["method"], **{k: v for k, v in quantizer.items() if k != "method"})
    result = {
        "out": str(out),
        "method": method,
        "family": net.lowbit_family,
        "format": decided.weight_format.describe(),
        "activations": decided.act_format.describe() if decided.act_format else None,
        "bits": quantizer.get("bits"),
        "group_size": quantizer.get("group_size"),
        "act_bits": quantizer.get("act_bits"),
        "bits_per_weight": cov.mean_bits_per_weight(),
        "layers_quantized": len(cov.quantized),
        "layers_skipped": len(cov.skipped),
        "block_linears_quantized": done,
        "block_linears_total": total,
        "seconds": round(net.lowbit_seconds, 3),
        "size_bytes": _dir_size(out),
    }
    _emit(result, as_json, f"wrote {out}\n{cov.summary()}\nbits per weight {result['bits_per_weight']:.3f}")


def _load_model(model: str):
    from lowbit.models.loading import load_model, resolve_model_path

    if not Path(model).exists():
        resolve_model_path(model)  # a one-line error for a path that does not exist
    return load_model(model)


def _onload_skeleton(model: str):
    """The model of directory ``model`` with its parameters on ``meta``, and its tokenizer (``--onload``)."""
    from transformers import AutoTokenizer

    from lowbit.io.onload import empty_model
    from lowbit.models.loading import resolve_model_path

    path = resolve_model_path(model)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--onload reads a local model directory of safetensors files; {model} is not one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return empty_model(path), tokenizer


def _calibration(net, tokenizer, path: Path, nsamples, seqlen: int, seed: int):
    """Token windows from a text file (or pre-tokenized ``input_ids [n, seqlen]`` in a safetensors
    file) for language models, images for vision models."""
    from lowbit.models.adapters import adapter_for

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        ids = load_file(str(path)).get("input_ids")
        if ids is None or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"{path}: pre-tokenized calibration is an integer tensor input_ids [n, seqlen]")
        return ids[: nsamples or len(ids)].long()

    if adapter_for(net).family in ("cnn", "vit") or _is_image_data(path):
        from lowbit.data.cifar10 import load_cifar10
        from lowbit.models.loading import normalization

        norm = normalization(net)
        if norm is None:
            raise ValueError(f"{type(net).__name__} takes no images; pass a text file to --calib")
        images, _ = load_cifar10(path, split="train", limit=nsamples or 1024, seed=seed, normalize=norm)
        return images
    from lowbit.data import calibration_windows, read_text

    if tokenizer is None:
        raise ValueError(f"this model has no tokenizer to read the --calib text file {path} with; {TOKENIZER_HINT}, "
                         "or pass token ids as input_ids [n, seqlen] in a .safetensors file")
    return calibration_windows(tokenizer, read_text(path), nsamples or 128, seqlen, seed)


def _is_image_data(path: Path) -> bool:
    return path.is_dir() or path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


READABLE = ("lowbit", "gptq", "compressed-tensors")


def _load_any(model: str):
    """A lowbit checkpoint or a pretrained model, with its tokenizer."""
    from transformers import AutoTokenizer

    import lowbit
    from lowbit.io.native import read_quantization_config

    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file() and \
            read_quantization_config(path).get("quant_method") in READABLE:  # fmt: skip
        net = lowbit.load(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return net, tokenizer
    return _load_model(model)


@app.command()
def plan(
    model: str = typer.Argument(..., help="model directory (config.json and its weight files) or alias"),
    method: str = typer.Option("rtn", help="method or recipe, as for quantize"),
    bits: int = typer.Option(4, help="weight bits"),
    group_size: int = typer.Option(128, help="group size; -1 for per-channel"),
    nsamples: int = typer.Option(128, help="calibration windows"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Before any work: the peak memory, disk and estimated time of quantizing MODEL, from its config and
    the headers of its weight files (example: lowbit plan stories260K --method gptq)."""
    from lowbit.plan import make_plan

    try:
        _quiet_transformers()
        result = make_plan(model, method, bits, group_size, nsamples, seqlen)
    except USER_ERRORS as e:
        _fail(e)
    _emit(result.to_dict(), as_json, result.describe())


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="lowbit checkpoint, model directory, hub id, checkpoint or alias"),
    ppl: Path | None = typer.Option(None, "--ppl", help="text file for perplexity (language models)"),
    cifar10: Path | None = typer.Option(
        None, "--cifar10", help="CIFAR-10 test images (.tar.gz or a folder of class folders): top-1 accuracy"
    ),
    tasks: str | None = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated: the local lowbit_lastword "
                                     "and lowbit_story_choice (built from ../shared/assets text, no network), or any "
                                     "lm-eval task (hellaswag, arc_easy, lambada_openai, wikitext: need the hub)"),
    limit: int | None = typer.Option(None, "--limit", help="cifar10: a class-balanced subset of this many images; "
                                     "--tasks: documents per task"),
    seqlen: int = typer.Option(512, help="tokens per chunk"),
    batch_size: int = typer.Option(8, "--batch-size", help="chunks per forward pass"),
    onload: bool = typer.Option(False, "--onload", help="perplexity of a model larger than memory: one block at "
                                "a time from its safetensors files (the same number as without)"),
    spill_activations: bool = typer.Option(False, "--spill-activations", help="with --onload: the hidden states "
                                           "between blocks in temporary files"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Evaluate MODEL: perplexity of a text file (non-overlapping --seqlen chunks) for a language
    model, lm-eval tasks (--tasks), or top-1 accuracy on CIFAR-10 test images for a vision model
    (example: lowbit eval stories260K --tasks lowbit_lastword,lowbit_story_choice --limit 200)."""
    from lowbit.data import read_text
    from lowbit.eval import perplexity

    try:
        if ppl is None and cifar10 is None and tasks is None:
            raise ValueError("nothing to evaluate; pass --ppl TEXTFILE or --tasks TASKS (language models) or "
                             "--cifar10 PATH (vision)")
        if tasks is not None:
            if ppl is not None or cifar10 is not None or onload:
                raise ValueError("--tasks runs on its own; evaluate --ppl or --cifar10 in another call")
            names = [t.strip() for t in tasks.split(",") if t.strip()]
            if not names:
                raise ValueError("--tasks is empty; e.g. --tasks lowbit_lastword,lowbit_story_choice")
            if limit is not None and limit < 1:
                raise ValueError(f"--limit {limit} is invalid; use at least 1")
            from lowbit.eval.lm_eval_tasks import run_tasks

            _quiet_transformers()
            net, tokenizer = _load_any(model)
            if tokenizer is None:
                raise ValueError(f"{model} has no tokenizer; lm-eval tasks need one: {TOKENIZER_HINT}")
            scores = run_tasks(net, tokenizer, names, limit=limit, batch_size=batch_size)
            human = "\n".join(f"{t}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "samples")
                              + f" ({m.get('samples')} documents)" for t, m in scores.items())  # fmt: skip
            _emit({"model": model, "tasks": scores, "limit": limit}, as_json, human)
            return
        if (onload or spill_activations) and (cifar10 is not None or not onload):
            raise ValueError("--onload evaluates perplexity (--ppl); --spill-activations goes with --onload")
        if onload:
            from transformers import AutoTokenizer

            from lowbit.eval.perplexity import streamed_perplexity
            from lowbit.models.loading import resolve_model_path

            _quiet_transformers()
            text = read_text(ppl)
            path = resolve_model_path(model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                raise ValueError(f"{model} has no tokenizer; perplexity needs one: {TOKENIZER_HINT}") from None
            result = streamed_perplexity(path, tokenizer, text, seqlen, batch_size, progress=not as_json,
                                         spill_dir=tempfile.gettempdir() if spill_activations else None)  # fmt: skip
        elif cifar10 is not None:
            if not cifar10.exists():
                raise FileNotFoundError(f"CIFAR-10 images {cifar10} do not exist; pass the CIFAR-10 .tar.gz or a folder of "
                                        "class folders (the shared assets hold ../shared/assets/cifar10)")
            result = _eval_cifar(model, cifar10, limit, as_json)
        else:
            text = read_text(ppl)
            _quiet_transformers()
            net, tokenizer = _load_any(model)
            if tokenizer is None:
                raise ValueError(f"{model} has no tokenizer; perplexity needs one: {TOKENIZER_HINT} "
                                 "(vision models: --cifar10 PATH)")
            if not hasattr(net(input_ids=tokenizer("a", return_tensors="pt").input_ids), "logits"):
                raise ValueError(f"{model} is not a language model (no next-token logits), so it has no perplexity; "
                                 "vision models: --cifar10 PATH; encoders: lowbit demo --model minilm reports "
                                 "embedding fidelity")
            result = perplexity(net, tokenizer, text, seqlen=seqlen, batch_size=batch_size)
    except USER_ERRORS as e:
        _fail(e)
    if "top1" in result:
        _emit(result, as_json, f"top-1 {result['top1']:.2f}% over {result['images']} images")
    else:
        _emit(result, as_json, f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens")


def _eval_cifar(model: str, path: Path, limit, as_json: bool) -> dict:
    from lowbit.data.cifar10 import load_cifar10
    from lowbit.eval.classification import top1
    from lowbit.models.loading import normalization

    net, _ = _load_any(model)
    norm = normalization(net)
    if norm is None:
        raise ValueError(f"{model} is not a CIFAR-10 vision model; use --ppl for language models")
    images, labels = load_cifar10(path, split="test", limit=limit, normalize=norm)
    return {"top1": top1(net, images, labels, progress=not as_json), "images": int(labels.numel())}


@app.command()
def info(
    path: Path = typer.Argument(..., help="a checkpoint directory (lowbit, GPTQ, compressed-tensors, ONNX) or .gguf"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Bits per weight, size on disk, and the layers quantized and skipped (example: lowbit info stories-gptq;
    also GGUF files, ONNX exports and compressed-tensors checkpoints)."""
    from lowbit.coverage import Coverage
    from lowbit.io.native import read_quantization_config

    try:
        if path.is_file() and path.suffix == ".gguf":
            from lowbit.io.gguf_export import gguf_coverage

            qc, cov = {"quant_method": "gguf"}, gguf_coverage(path)
        elif (path / "model.onnx").is_file():
            from lowbit.io.onnx_export import onnx_coverage

            qc, cov = {"quant_method": "onnx qdq"}, onnx_coverage(path)
        elif not path.is_dir():
            raise FileNotFoundError(f"{path} is not a checkpoint directory or a .gguf file; pass the --out directory "
                                    "of lowbit quantize (or an export, a GGUF or ONNX file)")
        else:
            qc = read_quantization_config(path)
            if not qc:
                raise ValueError(f"{path} holds no quantization_config, so it is not a quantized checkpoint; quantize "
                                 f"it first: lowbit quantize {path} --out DIR")
            if qc.get("quant_method") == "gptq":
                from lowbit.io.gptq_layout import checkpoint_coverage

                cov = checkpoint_coverage(path)
            elif qc.get("quant_method") == "compressed-tensors":
                cov = _loaded_coverage(path)
            else:
                cov = Coverage.from_dict(qc.get("coverage") or {})
    except USER_ERRORS as e:
        _fail(e)
    done, total = cov.block_counts()
    result = {
        "quant_method": qc.get("quant_method"),
        "recipe": qc.get("recipe"),
        "bits_per_weight": cov.mean_bits_per_weight(),
        "size_bytes": path.stat().st_size if path.is_file() else _dir_size(path),
        "layers_quantized": [r.name for r in cov.quantized],
        "layers_skipped": {r.name: r.reason for r in cov.skipped},
        "block_linears_quantized": done,
        "block_linears_total": total,
    }
    lines = [f"{path}: {qc.get('quant_method')} checkpoint, {result['size_bytes'] / 1e6:.2f} MB on disk"]
    if result["bits_per_weight"] is not None:
        lines.append(f"bits per weight (quantized layers): {result['bits_per_weight']:.3f}")
    human = "\n".join([*lines, cov.summary()])
    _emit(result, as_json, human)


def _loaded_coverage(path: Path):
    """Coverage of a checkpoint another toolkit wrote, read by loading it."""
    import lowbit
    from lowbit.coverage import Coverage, LayerRecord
    from lowbit.models.adapters import plan
    from lowbit.nn import QLinear

    _quiet_transformers()
    model = lowbit.load(path)
    cov = Coverage()
    for t in plan(model):
        if isinstance(t.module, QLinear):
            qw = t.module.quantized_weight
            rec = LayerRecord(
                t.name, "Linear", "quantized", "", t.in_block, qw.fmt.describe(), qw.bits_per_weight, qw.numel
            )
        else:
            rec = LayerRecord(
                t.name, type(t.module).__name__, "skipped", "stored unquantized in the checkpoint", t.in_block
            )
        cov.add(rec)
    return cov


EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf", "onnx", "bnb")
EXPORT_ALIASES = {"bitsandbytes": "bnb"}


@app.command()
def export(
    path: Path = typer.Argument(..., help="a lowbit checkpoint (or a model directory, for gguf)"),
    fmt: str = typer.Option(..., "--format", help="target layout: compressed-tensors, gptq, gguf, onnx or bnb "
                            "(bitsandbytes' 4-bit nf4, for nf4 checkpoints)"),
    out: Path = typer.Option(..., "--out", help="directory to write (a .gguf file for gguf); must not exist"),
    gguf_type: str = typer.Option("q4_0", "--type", help="gguf only: f32, q8_0, q4_0 or q4_1"),
    onload: bool = typer.Option(False, "--onload", help="compressed-tensors only: a checkpoint larger than memory, "
                                "converted one block at a time"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Write a checkpoint in a layout other runtimes load (example: lowbit export stories-gptq --format gguf
    --out stories.gguf, after lowbit quantize ... --out stories-gptq)."""
    from lowbit.io.native import check_output_dir

    fmt = EXPORT_ALIASES.get(fmt, fmt)
    try:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(EXPORT_FORMATS)}")
        if fmt != "gguf":
            check_output_dir(out)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory; pass the --out directory of lowbit quantize")
        _quiet_transformers()
        report = None
        if onload and fmt != "compressed-tensors":
            raise ValueError(f"--onload exports compressed-tensors; {fmt} export holds the model in memory")
        net, tokenizer = (None, None) if onload else _load_any(str(path))
        if onload:
            from lowbit.io.compressed_tensors import export_compressed_tensors_streamed

            export_compressed_tensors_streamed(path, out)
        elif fmt == "gguf":
            from lowbit.io.gguf_export import export_gguf

            report = export_gguf(net, out, path, gguf_type)
            for line in report["requantized"] + report["fallback_f32"]:
                _log(f"note: {line}")
        elif fmt == "gptq":
            from lowbit.io.gptq_layout import export_gptq

            export_gptq(net, out, tokenizer)
        elif fmt == "onnx":
            from lowbit.io.onnx_export import export_onnx

            export_onnx(net, out, tokenizer)
        elif fmt == "bnb":
            from lowbit.io.bnb_export import export_bnb

            export_bnb(net, out, tokenizer)
        else:
            from lowbit.io.compressed_tensors import export_compressed_tensors

            export_compressed_tensors(net, out, tokenizer)
    except USER_ERRORS as e:
        _fail(e)
    size = out.stat().st_size if out.is_file() else _dir_size(out)
    result = {"out": str(out), "format": fmt, "size_bytes": size}
    if report is not None:
        result.update({k: report[k] for k in ("type", "native", "requantized", "fallback_f32")})
    _emit(result, as_json, f"wrote {out} ({fmt}, {result['size_bytes'] / 1e6:.2f} MB)")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated integers (e.g. 4,3), got {text!r}") from None


@app.command()
def compare(
    model: str = typer.Argument(..., help="the float model: directory, hub id or alias (stories260K)"),
    dirs: list[Path] = typer.Argument(None, help="finished output directories to evaluate beside the runs"),
    out: Path = typer.Option(..., "--out", help="report directory (index.html, results.json, results.csv, runs/)"),
    methods: str = typer.Option("rtn,gptq", help="comma-separated methods or +-joined recipes"),
    bits: str = typer.Option("4", help="comma-separated weight widths"),
    group_size: str = typer.Option("128", "--group-size", help="comma-separated group sizes; -1 per-channel, 0 each method's default"),
    calib: Path | None = typer.Option(None, "--calib", help="calibration text file, or CIFAR-10 images for a vision "
                                      "model (the same sample for every run)"),
    eval_text: Path | None = typer.Option(None, "--eval", help="text file scored by perplexity (as lowbit eval --ppl), "
                                          "or CIFAR-10 test images scored by top-1 (as lowbit eval --cifar10)"),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help="vision: a class-balanced subset of the test images"),
    nsamples: int = typer.Option(128, help="calibration windows (or images)"),
    seqlen: int = typer.Option(512, help="tokens per calibration window"),
    eval_seqlen: int = typer.Option(512, "--eval-seqlen", help="tokens per perplexity chunk"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    decode: int = typer.Option(32, help="greedy tokens timed per run against fp32 (0: off)"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON on stdout"),
):
    """Run every method x bits x group size on the same calibration windows, evaluate each the same way, and
    write a report (example: lowbit compare stories260K --methods rtn,gptq --bits 4,3 --group-size 32
    --calib ../shared/assets/text/tinystories_dev.txt --eval ../shared/assets/text/tinystories_dev.txt
    --nsamples 16 --seqlen 256 --out report/; a CIFAR-10 model: lowbit compare resnet20 --methods rtn,gptq --bits 4
    --group-size -1 --calib ../shared/assets/cifar10/cifar10_train_jpeg.tar.gz --eval
    ../shared/assets/cifar10/cifar10_test_jpeg.tar.gz --nsamples 256 --eval-limit 1000 --out report-r20/).
    Finished rows are kept: the same command resumes."""
    from lowbit.compare import compare as run_compare

    try:
        _quiet_transformers()
        for path, what in ((calib, "calibration data"), (eval_text, "evaluation text"), *((d, "directory")
                                                                                         for d in dirs or [])):
            if path is not None and not path.exists():
                raise FileNotFoundError(f"{what} {path} does not exist")
        widths = _int_list(bits, "--bits")
        groups = [None if g == 0 else g for g in _int_list(group_size, "--group-size")]
        names = [m.strip() for m in methods.split(",") if m.strip()]
        rows = run_compare(model, names, widths, groups, out=out, dirs=list(dirs or []), calib=calib,
                           eval_text=eval_text, nsamples=nsamples, seqlen=seqlen, seed=seed,
                           eval_seqlen=eval_seqlen, eval_limit=eval_limit, decode_tokens=decode, progress=not as_json,
                           argv=sys.argv[1:])  # fmt: skip
    except USER_ERRORS as e:
        _fail(e)
    key = "top1" if rows and "top1" in rows[0] else "ppl"
    lines = [f"{r['name']:<24} {key} {r[key]:.4f}  bpw {r['bits_per_weight']:.3f}" for r in rows]
    _emit({"out": str(out), "rows": rows}, as_json, "\n".join(lines) + f"\nwrote {out / 'index.html'}")


@app.command()
def demo(
    model: str = typer.Option("default", help="minilm, stories260K, or default (both when present)"),
    bits: int = typer.Option(4, help="the language model's weight bits, 2-8 (RTN weight-only)"),
    group_size: int = typer.Option(128, "--group-size", help="the language model's group size; -1 for per-channel"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Quantize real pretrained models and report quality, size and speed against fp32: MiniLM
    with SmoothQuant W8A8 (an encoder's batches are compute-bound: integer activations make
    them fast), stories260K with RTN weight-only (decoding reads the weights once per token)
    (example: lowbit demo --model stories260K --bits 3)."""
    from lowbit.demo import run_demo

    try:
        _quiet_transformers()
        result = run_demo(model, bits=bits, group_size=group_size, log=_log)
    except USER_ERRORS as e:
        _fail(e)
    _emit(result, as_json, result.pop("table"))


@app.command()
def generate(
    model: str = typer.Argument(..., help="lowbit checkpoint, model directory, hub id or alias (e.g. stories260K)"),
    prompt: str = typer.Option("Once upon a time", "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate (greedy)"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: torch's)"),
    fused: bool = typer.Option(
        True, "--fused/--no-fused", help="lowbit's fused decoder step for Llama-family models (else transformers')"
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Greedy-decode a continuation of --prompt and print it with the decode speed.

    Example: lowbit generate stories260K --prompt "Once upon a time" --max-new-tokens 32
    """
    import torch

    from lowbit.generate import generate as run

    try:
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        _quiet_transformers()
        net, tokenizer = _load_any(model)
        if tokenizer is None:
            raise ValueError(f"{model} has no tokenizer; generation needs one: {TOKENIZER_HINT}")
        text, r = run(net, tokenizer, prompt, max_new_tokens, fused=None if fused else False)
    except USER_ERRORS as e:
        _fail(e)
    result = {
        "text": text,
        "prompt_tokens": r.prompt_tokens,
        "new_tokens": r.new_tokens,
        "prefill_ms": r.prefill_s * 1e3,
        "tokens_per_s": r.tokens_per_s,
        "threads": torch.get_num_threads(),
        "decoder_step": r.path,
    }
    _emit(
        result,
        as_json,
        f"{text}\n\n{r.new_tokens} new tokens, prefill {r.prompt_tokens} tokens in {r.prefill_s * 1e3:.1f} ms, "
        f"decode {r.tokens_per_s:.1f} tokens/s ({torch.get_num_threads()} threads, {r.path} decoder step)",
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
