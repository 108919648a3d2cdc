"""lm-eval-harness through lowbit: the local tasks built from TinyStories, the LowbitLM wrapper
(lm-eval's HFLM around a lowbit-loaded model) and ``lowbit eval --tasks``."""

import json
import subprocess
import sys

import pytest

import lowbit
from lowbit.assets import asset

pytest.importorskip("lm_eval", reason="pip install 'lowbit[lmeval]' (lm-evaluation-harness)")

from lowbit.eval.lm_eval_tasks import LOCAL_TASKS, build_local_tasks, choice_docs, lastword_docs, run_tasks

TEXT = asset("text", "tinystories_dev.txt")
STORIES = asset("stories260K")
needs_assets = pytest.mark.skipif(not TEXT.exists() or not (STORIES / "config.json").exists(),
                                  reason="stories260K or its text is not in ../shared/assets")  # fmt: skip

SAMPLE = ("Tom had a red ball. He liked to throw it high in the sky and catch it with both hands every day. "
          "One day the ball went over the fence into the garden of an old man. Tom was scared. "
          "The old man smiled and gave the ball back to him.\n\n")  # fmt: skip


def test_documents_are_built_as_described():
    text = SAMPLE * 3 + "Short one.\n\n"
    last = lastword_docs(text)
    assert len(last) == 3 and last[0]["target"] == "him" and last[0]["context"].endswith("gave the ball back to")
    other = ("A cat sat on a mat and looked at the big blue sky for a very long time that day, and then it "
             "looked at the little birds. It was warm. The cat slept.")
    text = SAMPLE + "\n\n".join(f"{other} Ending number {i}." for i in range(5))
    docs = choice_docs(text, n=3, seed=0)
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert d["choices"][d["label"]] in text and not d["context"].endswith(d["choices"][d["label"]])


def test_missing_text_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="LOWBIT_ASSETS"):
        build_local_tasks(tmp_path / "nope.txt", tmp_path / "t")


@pytest.fixture(scope="module")
def stories():
    from lowbit.models.loading import load_model

    return load_model("stories260K")


@needs_assets
def test_quantization_lowers_accuracy_on_the_local_tasks(stories):
    import copy

    net, tok = stories
    q = lowbit.quantize(copy.deepcopy(net), "rtn", bits=2, group_size=32, progress=False)
    fp32 = run_tasks(net, tok, list(LOCAL_TASKS), limit=40, batch_size=40)
    low = run_tasks(q, tok, ["lowbit_lastword"], limit=40, batch_size=40)
    assert fp32["lowbit_lastword"]["samples"] == fp32["lowbit_story_choice"]["samples"] == 40
    assert 0 <= low["lowbit_lastword"]["acc"] < fp32["lowbit_lastword"]["acc"] <= 1
    assert fp32["lowbit_lastword"]["perplexity"] < low["lowbit_lastword"]["perplexity"]
    assert 0 <= fp32["lowbit_story_choice"]["acc_norm"] <= 1


@needs_assets
def test_unknown_task_is_refused(stories):
    net, tok = stories
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_tasks(net, tok, ["no_such_task_anywhere"], limit=2)


@needs_assets
def test_cli_scores_a_checkpoint(tmp_path, stories):
    import copy

    net, tok = stories
    out = tmp_path / "q"
    lowbit.save(lowbit.quantize(copy.deepcopy(net), "rtn", bits=4, group_size=32, progress=False), out, tokenizer=tok)
    got = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(out), "--tasks", "lowbit_lastword", "--limit",
                          "12", "--json"], check=True, capture_output=True, text=True)  # fmt: skip
    result = json.loads(got.stdout)["tasks"]["lowbit_lastword"]
    assert result["samples"] == 12 and 0 <= result["acc"] <= 1 and result["perplexity"] > 1
    bad = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(out), "--tasks", "x", "--ppl", str(TEXT)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode != 0 and "--tasks runs on its own" in bad.stderr
