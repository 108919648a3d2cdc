"""The fused decoder step computes what transformers' forward computes, on every Llama-family
architecture it accepts, float and quantized, and refuses the others by name."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit import QLinear, WeightFormat
from lowbit.fused_decode import FusedLlama, Projection, unsupported_reason
from lowbit.generate import greedy_decode
from lowbit.kernels import wq
from lowbit.quantized_weight import QuantizedWeight


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
    )
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=64)).eval()
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()  # q/k/v with biases


def _native():
    if wq.extension() is None:
        pytest.skip("lowbit's CPU kernels could not be built here")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_fused_step_gives_transformers_logits_at_every_position(kind):
    _native()
    model = _tiny(kind)
    quant = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=32, progress=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    for net in (model, quant):
        with torch.no_grad():
            want = net(ids).logits  # [2, 12, vocab]
        state = FusedLlama(net, max_len=16, batch=2)
        got = [state.forward(ids[:, :5])]  # a prompt, then one token at a time
        got += [state.forward(ids[:, i : i + 1]) for i in range(5, 12)]
        torch.testing.assert_close(torch.stack(got, 1), want[:, 4:], rtol=1e-4, atol=1e-4)


def test_fused_step_takes_a_chunk_after_earlier_tokens():
    model = _tiny("llama")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    state = FusedLlama(model, max_len=10)
    state.forward(ids[:, :4])
    with torch.no_grad():
        torch.testing.assert_close(state.forward(ids[:, 4:]), model(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_fused_greedy_tokens_equal_transformers_on_stories260k(stories):
    _native()
    model, tok = stories
    quant = lowbit.quantize(copy.deepcopy(model), "rtn", bits=4, group_size=32, progress=False)
    ids = tok("Once upon a time, there was a little", return_tensors="pt").input_ids
    for net in (model, quant):
        fused = greedy_decode(net, ids, 40)
        plain = greedy_decode(net, ids, 40, fused=False)
        assert fused.path == "fused" and plain.path == "transformers"
        assert torch.equal(fused.tokens, plain.tokens)


def test_fused_projection_runs_q_k_v_as_one_kernel_call_with_their_biases():
    _native()
    fmt = WeightFormat("int", 4, 32)
    lins = [torch.nn.Linear(64, n, bias=b) for n, b in ((64, True), (32, False), (32, True))]
    qs = [QLinear.from_linear(lin, fmt) for lin in lins]
    proj = Projection(qs)
    assert proj.packed is not None and proj.packed.n == 128
    x = torch.randn(3, 64)
    for y, q in zip(proj(x), qs):
        torch.testing.assert_close(y, q(x), rtol=1e-6, atol=1e-6)


def test_projections_of_different_formats_run_one_by_one():
    _native()
    a = QLinear.from_linear(torch.nn.Linear(64, 32), WeightFormat("int", 4, 32))
    b = QLinear.from_linear(torch.nn.Linear(64, 32), WeightFormat("int", 8, -1))
    proj = Projection([a, b])
    assert proj.packed is None and proj.modules is not None
    x = torch.randn(1, 64)
    assert all(torch.equal(y, q(x)) for y, q in zip(proj(x), (a, b)))
    packs = [q._prepare("native", x.device) for q in (a, b)]
    with pytest.raises(ValueError, match="different layouts"):
        wq.Packed.concat(packs)


def test_concatenated_layout_equals_the_separate_weights():
    _native()
    g = torch.Generator().manual_seed(0)
    fmt = WeightFormat("int", 4, 64, False)
    parts = [wq.Packed(QuantizedWeight.quantize(torch.randn(n, 192, generator=g), fmt), torch.device("cpu")) for n in (8, 24)]
    both = wq.Packed.concat(parts)
    x = torch.randn(2, 192, generator=g)
    assert torch.equal(both.matmul(x), torch.cat([p.matmul(x) for p in parts], dim=-1))
    assert torch.equal(both.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_other_architectures_keep_transformers_forward_and_fused_true_says_why():
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    ids = torch.randint(0, 64, (1, 4))
    assert greedy_decode(gpt2, ids, 3).path == "transformers"
    with pytest.raises(ValueError, match="fused decoding cannot run this model"):
        greedy_decode(gpt2, ids, 3, fused=True)
    with pytest.raises(ValueError, match="gpt2"):
        FusedLlama(gpt2, max_len=8)


def test_fused_state_refuses_more_positions_than_its_cache_and_the_wrong_batch():
    model = _tiny("llama")
    state = FusedLlama(model, max_len=4)
    with pytest.raises(ValueError, match="exceed the cache"):
        state.forward(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="decodes 1 sequences"):
        state.forward(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding window"):
        FusedLlama(_tiny("mistral"), max_len=65)


def test_native_rms_norm_equals_transformers_llama_norm():
    _native()
    norm = tf.models.llama.modeling_llama.LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    x = torch.randn(3, 5, 96) * 4
    got = wq.extension().rms_norm(x, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(got, norm(x).detach(), rtol=2e-6, atol=2e-6)
