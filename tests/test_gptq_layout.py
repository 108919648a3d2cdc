"""The GPTQ checkpoint layout: reading files built here to the published layout, and round trips."""

import json

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app


def tiny_llama(hidden=64, inter=128):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def write_gptq_checkpoint(model, path, bits=4, group=32):
    """An AutoGPTQ-style checkpoint written from scratch: min-max asymmetric codes, zeros stored minus one."""
    from safetensors.torch import save_file

    per = 32 // bits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and ".layers." in name):
            continue
        w = mod.weight.detach()  # [N, K]
        n, k = w.shape
        wg = w.reshape(n, k // group, group)
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / (2**bits - 1)).half().float()
        zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 2**bits - 1).reshape(n, k)
        reference[name] = ((q.reshape(n, -1, group) - zero[..., None]) * scale[..., None]).reshape(n, k)
        qt = q.t().to(torch.int64)  # [K, N]
        qweight = torch.zeros(k // per, n, dtype=torch.int64)
        for j in range(per):
            qweight |= qt[j::per] << (bits * j)
        zt = (zero.t().to(torch.int64) - 1) % (2**bits)  # [G, N]
        qzeros = torch.zeros(k // group, n // per, dtype=torch.int64)
        for j in range(per):
            qzeros |= zt[:, j::per] << (bits * j)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = (qweight - (qweight >= 2**31).long() * 2**32).to(torch.int32)
        state[f"{name}.qzeros"] = (qzeros - (qzeros >= 2**31).long() * 2**32).to(torch.int32)
        state[f"{name}.scales"] = scale.t().half().contiguous()
        state[f"{name}.g_idx"] = (torch.arange(k) // group).to(torch.int32)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = model.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "sym": False,
        "desc_act": False,
        "checkpoint_format": "gptq",
    }
    (path / "config.json").write_text(json.dumps(config))
    return reference


def test_lowbit_loads_a_gptq_checkpoint_built_to_the_published_layout(tmp_path):
    model = tiny_llama()
    reference = write_gptq_checkpoint(model, tmp_path / "gptq")
    loaded = lowbit.load(tmp_path / "gptq")
    for name, w in reference.items():
        torch.testing.assert_close(loaded.get_submodule(name).weight, w)
        model.get_submodule(name).weight.data = w
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, -1), (8, 16), (2, 64)])
def test_export_then_load_gives_the_same_weights_and_logits(tmp_path, bits, group):
    model = tiny_llama()
    lowbit.quantize(model, "rtn", bits=bits, group_size=group, progress=False)
    lowbit.save(model, tmp_path / "native")
    r = CliRunner().invoke(app, ["export", str(tmp_path / "native"), "--format", "gptq", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    loaded = lowbit.load(tmp_path / "g")
    for name, mod in model.named_modules():
        if isinstance(mod, lowbit.QLinear):
            assert torch.equal(loaded.get_submodule(name).weight, mod.weight)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_refuses_what_the_layout_cannot_express_and_lists_the_layers(tmp_path):
    model = tiny_llama(inter=172)  # 172 outputs do not fill int32 words of eight 4-bit codes
    lowbit.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    from lowbit.io.gptq_layout import export_gptq

    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj: shape 172x64.*model.layers.1.mlp.up_proj"):
        export_gptq(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()
    model3 = tiny_llama()
    lowbit.quantize(model3, "rtn", bits=3, group_size=32, progress=False)
    with pytest.raises(ValueError, match="2-, 4- or 8-bit"):
        export_gptq(model3, tmp_path / "g3")


def test_act_order_g_idx_is_refused_clearly(tmp_path):
    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "gptq")
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.g_idx"
    t[key] = t[key][torch.randperm(t[key].numel())].contiguous()
    save_file(t, str(tmp_path / "gptq" / "model.safetensors"))
    with pytest.raises(ValueError, match="non-contiguous groups"):
        lowbit.load(tmp_path / "gptq")


def test_info_reads_a_gptq_checkpoint(tmp_path):
    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "gptq")
    runner = CliRunner()
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "gptq"), "--json"]).stdout)
    assert info["quant_method"] == "gptq" and info["block_linears_quantized"] == info["block_linears_total"] == 14
    assert 4.0 < info["bits_per_weight"] < 4.7  # 4-bit codes + fp16 scales and packed zeros per 32
