"""Every common LLM architecture, built tiny and random from its transformers config: GPTQ through the
one engine loop, every weight in the coverage report, and the compressed-tensors export loaded back by
transformers computing what lowbit computes."""


import pytest
import torch

import lowbit

pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors to test the export")

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128,
             "max_position_embeddings": 128}  # fmt: skip
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
MLA = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
           "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "num_key_value_heads": 4}  # fmt: skip


def _config(family: str):
    import transformers as tf

    gqa = dict(SMALL, num_key_value_heads=2)
    return {
        "llama": lambda: tf.LlamaConfig(**gqa),
        "mistral": lambda: tf.MistralConfig(**gqa),
        "qwen2": lambda: tf.Qwen2Config(**gqa),
        "qwen3": lambda: tf.Qwen3Config(**gqa, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**gqa, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**gqa, head_dim=16),
        "phi3": lambda: tf.Phi3Config(**gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**SMALL),
        "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=128),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128),
        "mixtral": lambda: tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**gqa, **MOE, num_experts=4, shared_expert_intermediate_size=64),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**gqa, **MOE, num_experts=4, head_dim=16),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**SMALL, **MLA, moe_intermediate_size=32, num_experts_per_tok=2),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**SMALL, **MLA, moe_intermediate_size=32, num_experts_per_tok=2,
                                                   n_group=1, topk_group=1),
    }[family]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "falcon", "opt", "gpt2",
            "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]  # fmt: skip


def _tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(_config(family)).eval()


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
# transformers' compressed-tensors path keeps linears packed (CompressedLinear); it cannot keep fused MoE
# experts packed, and Falcon's weight initialisation reads a FalconLinear's .weight that packing removed:
# these load with dequantize=True (the weights unpacked once at load, then transformers' own layers)
DEQUANTIZE_ON_LOAD = (*MOE_FAMILIES, "falcon")


def _transformers_load(path, family):
    import transformers as tf

    kw = {"quantization_config": tf.CompressedTensorsConfig(dequantize=True)} if family in DEQUANTIZE_ON_LOAD else {}
    model, info = tf.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_quantizes_every_architecture_and_exports_it(family, tmp_path):
    """GPTQ w4 g32 through the engine: every block linear quantized (each MoE expert's own gate, up and
    down included), only embeddings, routers and lm_head kept in full precision, a finite model; the
    native checkpoint and the compressed-tensors export reload in lowbit, and transformers reads the
    export and computes the same logits (GPT-2 excepted: its Conv1D linears are refused, by name)."""
    from lowbit.io.compressed_tensors import export_compressed_tensors

    model = _tiny(family)
    calib = torch.randint(0, 128, (8, 32))
    lowbit.quantize(model, "gptq", calib=calib, bits=4, group_size=32, symmetric=True, progress=False)
    cov = model.lowbit_coverage
    done, total = cov.block_counts()
    assert total > 0
    for r in cov.skipped:  # nothing skipped but what the policy keeps in full precision
        assert r.reason.startswith(("embedding:", "output projection", "MoE router:")), (r.name, r.reason)
    assert done == total - sum(r.in_block for r in cov.skipped)
    for r in cov.quantized:
        assert r.method == "gptq" or r.method.startswith("rtn (fallback: gptq saw no calibration input"), r.method
    if family in MOE_FAMILIES:
        experts = [r for r in cov.quantized if ".experts." in r.name]
        n_experts = 4 * 3 * (1 if family.startswith("deepseek") else 2)  # DeepSeek's first layer is dense
        assert len(experts) == n_experts
        assert any(r.method == "gptq" for r in experts)
    for r in cov.quantized:
        assert r.bits_per_weight is not None and r.bits_per_weight > 4
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert torch.isfinite(ours).all()

    lowbit.save(model, tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(lowbit.load(tmp_path / "native")(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
    if family == "gpt2":
        with pytest.raises(ValueError, match="gpt2's linears: transformers stores them as Conv1D"):
            export_compressed_tensors(model, tmp_path / "ct")
        return
    export_compressed_tensors(model, tmp_path / "ct")
    with torch.no_grad():
        torch.testing.assert_close(lowbit.load(tmp_path / "ct")(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
        theirs = _transformers_load(tmp_path / "ct", family)(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_unfused_experts_compute_what_the_fused_module_computes():
    """The per-expert form of a Qwen2-MoE and a Mixtral layer: the same outputs, the same weights."""
    from lowbit.models.moe import Experts, unfuse_experts

    for family, names in [("qwen2_moe", "gate_proj"), ("mixtral", "w1")]:
        model = _tiny(family)
        ids = torch.randint(0, 128, (2, 20))
        with torch.no_grad():
            before = model(input_ids=ids).logits
            fused = model.model.layers[1].mlp.experts
            gu = fused.gate_up_proj.detach().clone()
        assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        experts = model.model.layers[1].mlp.experts
        assert isinstance(experts, Experts) and len(experts) == 4
        assert torch.equal(getattr(experts[2], names).weight, gu[2, : gu.shape[1] // 2])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_an_expert_no_token_reaches_gets_rtn_and_says_so():
    """Calibration that routes nothing to an expert: it still gets codes and finite scales, from
    round-to-nearest, and the coverage report names the fallback."""
    import types

    model = _tiny("qwen2_moe")
    router = model.model.layers[1].mlp.gate

    def never_three(self, hidden):  # the router of layer 1 never picks expert 3
        logits = torch.nn.functional.linear(hidden.reshape(-1, self.hidden_dim), self.weight)
        probs = torch.softmax(logits.masked_fill(torch.arange(4) == 3, float("-inf")), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, top, index

    router.forward = types.MethodType(never_three, router)
    calib = torch.randint(0, 128, (4, 16))
    lowbit.quantize(model, "gptq", calib=calib, bits=4, group_size=32, symmetric=True, progress=False)
    cov = model.lowbit_coverage
    silent = [r for r in cov.quantized if r.name.startswith("model.layers.1.mlp.experts.3.")]
    assert len(silent) == 3
    assert all(r.method == "rtn (fallback: gptq saw no calibration input for this layer)" for r in silent)
    layer = model.model.layers[1].mlp.experts[3].down_proj
    assert torch.isfinite(layer.scales.float()).all() and (layer.scales.float() > 0).all()
