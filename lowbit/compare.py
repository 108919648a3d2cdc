"""``lowbit compare``: methods side by side on one model, measured the same way.

Every method x bits x group size runs on the same calibration windows (sampled once), is evaluated
by the function ``lowbit eval`` uses (perplexity of the same text in the same chunks), and is saved
to ``OUT/runs/NAME`` with its model card. Finished output directories can be given too; they are
evaluated the same way. Each row holds the quality, the bits per weight as stored (every overhead
counted), the size on disk, the quantization time, greedy decode tokens/s on lowbit's kernels
against the fp32 model timed beside it, the relative output error of every quantized layer on
calibration windows, and the command and versions that make it again. ``OUT/results.json`` is
rewritten after every row and a row already in it is not computed again (an interrupted run
resumes); ``lowbit.report`` turns the rows into ``index.html`` and ``results.csv``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lowbit.api import quantize
from lowbit.files import file_sha256
from lowbit.io.model_card import lowbit_version
from lowbit.io.native import load, save
from lowbit.nn.qconv import QConv
from lowbit.nn.qlinear import QLinear
from lowbit.nn.qmodule import QModule

RESULTS = "results.json"


@dataclass(frozen=True)
class Setting:
    """One run: a method (or ``+``-joined recipe) at one width and group size (``None``: the method's default)."""

    method: str
    bits: int
    group_size: int | None = None

    @property
    def name(self) -> str:
        g = "" if self.group_size is None else ("pc" if self.group_size == -1 else f"g{self.group_size}")
        return f"{self.method}-w{self.bits}{g}"


def settings(methods: list[str], bits: list[int], group_sizes: list[int | None]) -> list[Setting]:
    """Every method x bits x group size, in that order (method outermost: one progress line per method)."""
    return [Setting(m, b, g) for m in methods for b in bits for g in group_sizes]


def _now_command(argv: list[str] | None) -> str:
    return shlex.join(["lowbit", *(argv or [])]) if argv else "lowbit.compare(...)"


# ------------------------------------------------------------------------------------------- measures


def layer_errors(reference: nn.Module, quantized: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Relative output error of every quantized layer: its output in the quantized model against the same
    layer's output in the float model, both models running the same batches.

    The error is the one the model carries at that layer (the layers before it included), which is what a
    user sees grow through the network; it is taken up to one scale per output channel, because
    scale-migrating transforms (AWQ, SmoothQuant) fold per-channel factors from a layer's input into the
    layer before it, so a producer's output legitimately differs from the float model's by such a factor.
    Per channel ``j`` the residual is ``|y_f|^2 - <y_q, y_f>^2 / |y_q|^2`` (the least-squares gain removed);
    sums run over all batches; the result is ``sqrt(sum residual / sum |y_f|^2)``."""
    names = [n for n, m in quantized.named_modules() if n and isinstance(m, (QLinear, QConv, QModule))]
    ref_mods = dict(reference.named_modules())
    names = [n for n in names if n in ref_mods]
    qq: dict[str, torch.Tensor] = {}
    ff: dict[str, torch.Tensor] = {}
    qf: dict[str, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(module, args, output):
            if torch.is_tensor(output):
                captured[name] = output.detach().float().reshape(-1, output.shape[-1])

        return fn

    def compare_to_float(name):
        def fn(module, args, output):
            f = captured.pop(name, None)
            if f is None or not torch.is_tensor(output):
                return
            q = output.detach().float().reshape(-1, output.shape[-1])
            qq[name] = qq.get(name, 0) + q.pow(2).sum(0).double()
            ff[name] = ff.get(name, 0) + f.pow(2).sum(0).double()
            qf[name] = qf.get(name, 0) + (q * f).sum(0).double()

        return fn

    hooks = [ref_mods[n].register_forward_hook(keep(n)) for n in names]
    qmods = dict(quantized.named_modules())
    hooks += [qmods[n].register_forward_hook(compare_to_float(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                reference(b)
                quantized(b)
                captured.clear()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        if n not in ff:
            continue
        residual = (ff[n] - torch.where(qq[n] > 0, qf[n].pow(2) / qq[n].clamp_min(1e-300), 0)).clamp_min(0)
        total = float(ff[n].sum())
        out[n] = math.sqrt(float(residual.sum()) / total) if total > 0 else 0.0
    return out


def decode_speed(model: nn.Module, reference: nn.Module, prompt: torch.Tensor, tokens: int, rounds: int = 3) -> dict:
    """Greedy decode tokens/s of ``model`` and of ``reference`` (fp32), interleaved rounds, medians."""
    from lowbit.generate import greedy_decode

    times: dict[str, list[float]] = {"q": [], "fp32": []}
    for _ in range(rounds):
        for key, m in (("q", model), ("fp32", reference)):
            times[key].append(greedy_decode(m, prompt, tokens).tokens_per_s)
    q, f = sorted(times["q"])[rounds // 2], sorted(times["fp32"])[rounds // 2]
    return {"decode_tok_s": q, "fp32_decode_tok_s": f, "decode_x_fp32": q / f}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") or type(model).__name__.endswith("ForCausalLM")


# ------------------------------------------------------------------------------------------- the run


class Comparison:
    """One model, one calibration sample, one evaluation: ``run`` adds a row per setting or directory.

    Language models are scored by perplexity of ``eval_text`` (as ``lowbit eval --ppl``); CIFAR-10 vision
    models (the ResNets, the ViT) by top-1 accuracy on the test images at ``eval_text`` (as ``lowbit eval
    --cifar10``, ``eval_limit`` a class-balanced subset), calibrated on ``nsamples`` training images."""

    def __init__(self, model: str, out: str | os.PathLike, *, calib=None, eval_text=None, nsamples: int = 128,
                 seqlen: int = 512, seed: int = 0, eval_seqlen: int = 512, batch_size: int = 8,
                 decode_tokens: int = 32, layer_windows: int = 4, eval_limit: int | None = None,
                 progress: bool = True, argv: list[str] | None = None):  # fmt: skip
        from lowbit.models.loading import load_model, normalization

        self.model_name = model
        self.out = Path(out)
        self.progress = progress
        self.command = _now_command(argv)
        self.base, self.tokenizer = load_model(model)
        self.base.eval()
        self.norm = normalization(self.base)
        self.vision = self.norm is not None
        if eval_text is None:
            raise ValueError("compare needs data to score: pass --eval TEXTFILE for a language model (e.g. "
                             "../shared/assets/text/tinystories_dev.txt for stories260K) or --eval the CIFAR-10 "
                             "test images for a vision model (../shared/assets/cifar10/cifar10_test_jpeg.tar.gz)")  # fmt: skip
        if not self.vision and (self.tokenizer is None or not hasattr(self.base(input_ids=torch.tensor([[1]])),
                                                                       "logits")):  # fmt: skip
            raise ValueError(f"compare scores language models by perplexity and CIFAR-10 vision models by top-1; "
                             f"{model} is neither (no tokenizer or no next-token logits, and no image normalisation)")
        self.eval_path = Path(eval_text)
        self.eval_seqlen, self.batch_size, self.eval_limit = eval_seqlen, batch_size, eval_limit
        self.calib_path = None if calib is None else Path(calib)
        self.nsamples, self.seqlen, self.seed = nsamples, seqlen, seed
        self.decode_tokens = 0 if self.vision else decode_tokens
        if self.vision:
            from lowbit.data.cifar10 import load_cifar10

            self.metric = {"key": "top1", "label": "top-1 (%)", "higher_is_better": True}
            self.eval_images = load_cifar10(self.eval_path, split="test", limit=eval_limit, normalize=self.norm)
            self.windows = None
            if self.calib_path is not None:  # as lowbit quantize reads --calib images
                self.windows, _ = load_cifar10(self.calib_path, split="train", limit=nsamples, seed=seed,
                                               normalize=self.norm)  # fmt: skip
            probe = self.windows if self.windows is not None else self.eval_images[0]
            self.layer_batches = list(probe[: 16 * layer_windows].split(16))
        else:
            from lowbit.data import calibration_windows, read_text

            self.metric = {"key": "ppl", "label": "perplexity", "higher_is_better": False}
            self.eval_text = read_text(self.eval_path)
            self.windows = None
            if self.calib_path is not None:
                self.windows = calibration_windows(self.tokenizer, read_text(self.calib_path), nsamples, seqlen, seed)
            probe = self.windows if self.windows is not None else self._eval_chunks()
            self.layer_batches = list(probe[:layer_windows].split(1))
            self.prompt = probe[:1, :16]
        self.rows: list[dict] = self._read_rows()

    # ---- rows on disk
    def _read_rows(self) -> list[dict]:
        path = self.out / RESULTS
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not readable JSON ({e}); move it away to start over") from None
        if data.get("model") != self.model_name or data.get("eval") != str(self.eval_path):
            raise ValueError(f"{path} holds a comparison of {data.get('model')} on {data.get('eval')}, not "
                             f"{self.model_name} on {self.eval_path}; use another --out")  # fmt: skip
        return data.get("rows", [])

    def _write_rows(self) -> None:
        from lowbit.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        data = {"model": self.model_name, "eval": str(self.eval_path), "metric": self.metric,
                "eval_seqlen": None if self.vision else self.eval_seqlen, "eval_limit": self.eval_limit,
                "calib": None if self.calib_path is None else str(self.calib_path),
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "command": self.command, "rows": self.rows}  # fmt: skip
        tmp = self.out / (RESULTS + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.out / RESULTS)
        write_report(self.out, data)

    def done(self, name: str) -> bool:
        return any(r["name"] == name for r in self.rows)

    # ---- measuring
    def _eval_chunks(self) -> torch.Tensor:
        from lowbit.eval.perplexity import token_chunks

        return token_chunks(self.tokenizer, self.eval_text, self.eval_seqlen)

    def _evaluate(self, model: nn.Module) -> dict:
        """``{"value", "count"}`` by the function ``lowbit eval`` uses for this model's family."""
        if self.vision:
            from lowbit.eval.classification import top1

            images, labels = self.eval_images
            return {"value": top1(model, images, labels), "count": int(labels.numel())}
        from lowbit.eval import perplexity

        r = perplexity(model, self.tokenizer, self.eval_text, seqlen=self.eval_seqlen, batch_size=self.batch_size,
                       progress=False)  # fmt: skip
        return {"value": r["ppl"], "count": r["tokens"]}

    def _eval_command(self, directory: Path) -> str:
        if self.vision:
            limit = [] if self.eval_limit is None else ["--limit", str(self.eval_limit)]
            return shlex.join(["lowbit", "eval", str(directory), "--cifar10", str(self.eval_path), *limit])
        return shlex.join(["lowbit", "eval", str(directory), "--ppl", str(self.eval_path), "--seqlen",
                           str(self.eval_seqlen), "--batch-size", str(self.batch_size)])  # fmt: skip

    def _measure(self, name: str, model: nn.Module, directory: Path | None, score: dict) -> dict:
        cov = getattr(model, "lowbit_coverage", None)
        prov = dict(getattr(model, "lowbit_provenance", None) or {})
        row = {"name": name, "dir": None if directory is None else str(directory),
               self.metric["key"]: score["value"], "eval_count": score["count"],
               "bits_per_weight": None if cov is None else cov.mean_bits_per_weight(),
               "layers_quantized": None if cov is None else len(cov.quantized),
               "layers_skipped": None if cov is None else len(cov.skipped),
               "quant_seconds": prov.get("seconds"), "command": prov.get("command"),
               "eval_command": None if directory is None else self._eval_command(directory),
               "lowbit": lowbit_version(), "torch": torch.__version__}  # fmt: skip
        if directory is not None:
            row["size_bytes"] = _dir_bytes(directory)
        if cov is not None:
            row["layer_error"] = layer_errors(self.base, model, self.layer_batches)
        if self.decode_tokens and _is_causal_lm(model):
            row.update(decode_speed(model, self.base, self.prompt, self.decode_tokens))
        return row

    def quantize_command(self, s: Setting, directory: Path) -> str:
        """The ``lowbit quantize`` command that writes this run's checkpoint by itself (the same windows)."""
        args = ["lowbit", "quantize", self.model_name, "--method", s.method, "--bits", str(s.bits)]
        if s.group_size is not None:
            args += ["--group-size", str(s.group_size)]
        if self.calib_path is not None:
            args += ["--calib", str(self.calib_path), "--nsamples", str(self.nsamples)]
            args += ["--seed", str(self.seed)] if self.vision else ["--seqlen", str(self.seqlen), "--seed", str(self.seed)]
        return shlex.join([*args, "--out", str(directory)])

    # ---- the runs
    def baseline(self) -> None:
        if self.done("fp32"):
            return
        row = self._measure("fp32", self.base, None, self._evaluate(self.base))
        row.update(bits_per_weight=32.0, method="fp32", bits=None, group_size=None,
                   size_bytes=sum(p.numel() * p.element_size() for p in self.base.parameters()))  # fmt: skip
        row.pop("decode_x_fp32", None)
        self.rows.append(row)
        self._write_rows()

    def run_setting(self, s: Setting) -> None:
        if self.done(s.name):
            return
        directory = self.out / "runs" / s.name
        if directory.exists():  # a run that wrote its checkpoint but not its row: measured again from disk
            self.add_directory(directory, s.name, s)
            return
        model = copy.deepcopy(self.base)
        knobs = {"bits": s.bits} if s.group_size is None else {"bits": s.bits, "group_size": s.group_size}
        card = {"command": self.quantize_command(s, directory)}
        if self.calib_path is not None:
            card["calibration"] = {"path": str(self.calib_path), "file_sha256": file_sha256(self.calib_path)}
        quantize(model, s.method, calib=self.windows, progress=self.progress, provenance=card, **knobs)
        score = self._evaluate(model)
        model.lowbit_provenance["evaluation"] = [
            {"metric": self.metric["label"], "value": score["value"], "data": str(self.eval_path),
             "command": self._eval_command(directory)}]  # fmt: skip
        save(model, directory, tokenizer=self.tokenizer)
        row = self._measure(s.name, model, directory, score)
        row.update(method=s.method, bits=s.bits, group_size=s.group_size)
        self.rows.append(row)
        self._write_rows()

    def add_directory(self, directory: str | os.PathLike, name: str | None = None, s: Setting | None = None) -> None:
        directory = Path(directory)
        name = name or directory.name
        if self.done(name):
            return
        model = load(directory)
        row = self._measure(name, model, directory, self._evaluate(model))
        recipe = getattr(model, "lowbit_recipe", None) or [{}]
        row.update(method=s.method if s else "+".join(m.get("method", "?") for m in recipe),
                   bits=s.bits if s else recipe[-1].get("bits"),
                   group_size=s.group_size if s else recipe[-1].get("group_size"))  # fmt: skip
        self.rows.append(row)
        self._write_rows()


def compare(model: str, methods: list[str], bits: list[int], group_sizes: list[int | None], *, out,
            dirs: list[str | os.PathLike] = (), **kwargs) -> list[dict]:  # fmt: skip
    """Run (or resume) a comparison into ``out`` and return its rows (``Comparison``'s keywords)."""
    run = Comparison(model, out, **kwargs)
    todo = settings(methods, bits, group_sizes)
    run.baseline()
    for s in tqdm(todo, desc="compare", unit="run", disable=not run.progress):
        run.run_setting(s)
    for d in dirs:
        run.add_directory(d)
    return run.rows
