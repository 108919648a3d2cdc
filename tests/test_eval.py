import copy
import math

import pytest
import torch

import lowbit
from lowbit.eval import kl_divergence, perplexity, token_chunks


class CharTokenizer:
    """Bytes as tokens: enough to exercise the perplexity protocol."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([list(text.encode())])
        return type("Enc", (), {"input_ids": ids})()


@pytest.fixture
def tiny_lm():
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def test_perplexity_uses_non_overlapping_chunks_and_drops_the_tail(tiny_lm):
    text = "abcdefgh" * 30  # 240 tokens -> 3 chunks of 64, 48 dropped
    chunks = token_chunks(CharTokenizer(), text, 64)
    assert chunks.shape == (3, 64) and torch.equal(chunks[1], torch.tensor(list(text.encode()))[64:128])
    res = perplexity(tiny_lm, CharTokenizer(), text, seqlen=64, progress=False)
    assert res["tokens"] == 192 and res["chunks"] == 3
    with torch.no_grad():
        losses = [tiny_lm(input_ids=c[None], labels=c[None]).loss for c in chunks]
    assert res["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)


def test_text_shorter_than_one_chunk_is_an_error(tiny_lm):
    with pytest.raises(ValueError, match="fewer than one chunk"):
        perplexity(tiny_lm, CharTokenizer(), "short", seqlen=64, progress=False)


def test_kl_divergence_is_zero_for_the_same_model_and_grows_with_fewer_bits(tiny_lm):
    chunks = token_chunks(CharTokenizer(), "the quick brown fox " * 20, 32)
    assert kl_divergence(tiny_lm, tiny_lm, chunks) == pytest.approx(0.0, abs=1e-6)
    kls = []
    for bits in (8, 3):
        q = lowbit.quantize(copy.deepcopy(tiny_lm), "rtn", bits=bits, group_size=32, progress=False)
        kls.append(kl_divergence(tiny_lm, q, chunks))
    assert 0 < kls[0] < kls[1]
