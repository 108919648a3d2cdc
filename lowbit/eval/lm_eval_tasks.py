"""lm-evaluation-harness on lowbit models, and two small tasks built from local text.

``LowbitLM`` is lm-eval's Hugging Face model class (``HFLM``) holding a model lowbit loaded: a
lowbit checkpoint on lowbit's kernels, or a float model from a directory, hub id or alias. So a
quantized checkpoint is scored by lm-eval's own request handling, batching and metrics, exactly as
the community scores models. It is also registered with lm-eval as ``lowbit``.

The hub is not always reachable, so two tasks are built from a local text file (TinyStories in
``../shared/assets/text``): its paragraphs become documents, taken from the end of the file.

- ``lowbit_lastword`` (LAMBADA-style): the paragraph without its last word is the context; the model
  must give the last word greedily (``acc``), and its word-level ``perplexity`` is reported.
- ``lowbit_story_choice`` (HellaSwag-style multiple choice): the paragraph's sentences but the last
  are the context; the choices are its real last sentence and the last sentences of three other
  paragraphs (fixed seed), scored by log-likelihood (``acc``, and ``acc_norm`` per byte).

Any other task name goes to lm-eval's registry as it is (``hellaswag``, ``arc_easy``,
``lambada_openai``, ``wikitext``, ...), which downloads its dataset from the Hugging Face hub.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

LOCAL_TASKS = ("lowbit_lastword", "lowbit_story_choice")
DOCS = 1000  # documents per local task (the last paragraphs of the text)
MIN_WORDS = 30

_YAML = {
    "lowbit_lastword": """task: lowbit_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "lowbit_story_choice": """task: lowbit_story_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def _paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p.split()) >= MIN_WORDS]


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]


def lastword_docs(text: str, n: int = DOCS) -> list[dict]:
    docs = []
    for p in reversed(_paragraphs(text)):
        words = p.split()
        last = re.sub(r"[^\w'-]+$", "", words[-1])
        if last and re.search(r"\w", last):
            docs.append({"context": " ".join(words[:-1]), "target": last})
        if len(docs) == n:
            break
    return docs


def choice_docs(text: str, n: int = DOCS, seed: int = 0) -> list[dict]:
    paras = [p for p in reversed(_paragraphs(text)) if len(_sentences(p)) >= 3][: n + 3]
    endings = [_sentences(p)[-1] for p in paras]
    rng = random.Random(seed)
    docs = []
    for i, p in enumerate(paras[:n]):
        s = _sentences(p)
        others = [e for j, e in enumerate(endings) if j != i and e != s[-1]]
        if len(set(others)) < 3:
            continue
        others = sorted(set(others), key=others.index)
        choices = [s[-1], *rng.sample(others, 3)]
        rng.shuffle(choices)
        docs.append({"context": " ".join(s[:-1]), "choices": choices, "label": choices.index(s[-1])})
    return docs


def build_local_tasks(text_path: str | Path, directory: str | Path, n: int = DOCS) -> Path:
    """Write the local tasks' documents (JSON lines) and lm-eval task files into ``directory``; returns it
    (lm-eval's ``include_path``)."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise FileNotFoundError(f"the local lm-eval tasks are built from {text_path}, which does not exist "
                                "(set LOWBIT_ASSETS to the folder that holds text/tinystories_dev.txt)")  # fmt: skip
    text = text_path.read_text(encoding="utf-8")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in (("lowbit_lastword", lastword_docs(text, n)), ("lowbit_story_choice", choice_docs(text, n))):
        if len(docs) < 10:
            raise ValueError(f"{text_path} has too few paragraphs of {MIN_WORDS}+ words for {name} ({len(docs)})")
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (directory / f"{name}.yaml").write_text(_YAML[name].format(data=json.dumps(str(data))))
    return directory


def _harness():
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"lm-eval tasks need lm-evaluation-harness and what its Hugging Face model class imports "
                          f"({e}): pip install 'lowbit[lmeval]'") from None
    return evaluator, HFLM, TaskManager


def lowbit_lm_class():
    """``LowbitLM``: lm-eval's HFLM around a model lowbit loaded (registered with lm-eval as ``lowbit``)."""
    _, HFLM, _ = _harness()
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    if "lowbit" in MODEL_REGISTRY:
        return MODEL_REGISTRY["lowbit"]

    @register_model("lowbit")
    class LowbitLM(HFLM):
        """``LowbitLM(pretrained=PATH)`` loads PATH with lowbit (a lowbit checkpoint runs on lowbit's
        kernels); ``LowbitLM(model=..., tokenizer=...)`` wraps a model already loaded."""

        def __init__(self, pretrained=None, model=None, tokenizer=None, batch_size=8, **kwargs):
            if model is None:
                if pretrained is None:
                    raise ValueError("LowbitLM needs pretrained=PATH or model=")
                from lowbit.io.native import load, read_quantization_config
                from lowbit.models.loading import load_model

                path = Path(str(pretrained))
                if path.is_dir() and read_quantization_config(path).get("quant_method") == "lowbit":
                    from transformers import AutoTokenizer

                    model, tokenizer = load(path), tokenizer or AutoTokenizer.from_pretrained(str(path))
                else:
                    model, loaded_tok = load_model(str(pretrained))
                    tokenizer = tokenizer or loaded_tok
            if tokenizer is None:
                raise ValueError("lm-eval needs the model's tokenizer")
            # a lowbit checkpoint's config names lowbit's own quantization, which transformers' quantizer
            # registry (read by HFLM) does not know; the model is already built, so it is hidden meanwhile
            config = getattr(model, "config", None)
            held = getattr(config, "quantization_config", None)
            ours = isinstance(held, dict) and held.get("quant_method") == "lowbit"
            if ours:
                del config.quantization_config
            try:
                super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
            finally:
                if ours:
                    config.quantization_config = held

    return LowbitLM


def run_tasks(model, tokenizer, tasks: list[str], *, text_path: str | Path | None = None, limit: int | None = None,
              batch_size: int = 8, workdir: str | Path | None = None) -> dict:  # fmt: skip
    """Score ``model`` on ``tasks`` with lm-eval; returns ``{task: {metric: value}}`` (stderr left out)."""
    import logging
    import tempfile

    evaluator, _, TaskManager = _harness()
    for name in ("lm_eval", "lm-eval"):  # its per-call notices (an already-built model passed in) are not news here
        logging.getLogger(name).setLevel(logging.ERROR)
    include = None
    local = [t for t in tasks if t in LOCAL_TASKS]
    with tempfile.TemporaryDirectory() as tmp:
        if local:
            if text_path is None:
                from lowbit.assets import asset

                text_path = asset("text", "tinystories_dev.txt")
            include = str(build_local_tasks(text_path, workdir or tmp))
        manager = TaskManager(include_path=include)
        unknown = [t for t in tasks if t not in LOCAL_TASKS and not manager.match_tasks([t])]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks: {', '.join(LOCAL_TASKS)}, "
                             "or any task name lm-eval lists (lm_eval --tasks list)")  # fmt: skip
        lm = lowbit_lm_class()(model=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                            bootstrap_iters=0)
        except (ConnectionError, OSError) as e:
            raise ConnectionError(f"lm-eval could not fetch a task's dataset ({e}); the standard tasks download "
                                  "from the Hugging Face hub, so run them where it is reachable; the local tasks "
                                  f"({', '.join(LOCAL_TASKS)}) need no network") from None  # fmt: skip
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if "," in k and "stderr" not in k and isinstance(v, (int, float))}  # fmt: skip
        results[task]["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
    return results
