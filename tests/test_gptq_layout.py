"""The GPTQ checkpoint layout: reading files built here to the published layout, and round trips."""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _pack_words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``32 // bits`` values per int32 word along ``dim``, the first in the lowest bits (the published layout)."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    words = torch.zeros(v.shape[0] // per, *v.shape[1:], dtype=torch.int64)
    for j in range(per):
        words |= v[j::per] << (bits * j)
    words = words - (words >= 2**31).long() * 2**32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def write_gptq_checkpoint(model, path, bits=4, group=32, act_order=False, sym=False, seed=1):
    """An AutoGPTQ-style checkpoint written from scratch: min-max codes per group, zeros stored minus one.

    With ``act_order`` the inputs are visited in a random order (AutoGPTQ's
    ``desc_act`` visits them by decreasing Hessian diagonal) and consecutive
    ``group`` of them form a group: ``g_idx[c] = position of c in that order //
    group``. ``K`` need not be a multiple of ``group`` (the last group is
    short). Returns ``{name: (dequantized weight, g_idx)}``, the weight computed
    here by the plain formula ``W[n, c] = scales[g_idx[c], n] * (q[n, c] - zero[g_idx[c], n])``.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and ".layers." in name):
            continue
        w = mod.weight.detach().float()  # [N, K]
        n, k = w.shape
        order = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[order] = torch.arange(k) // group
        ngroups = math.ceil(k / group)
        scales, zeros = torch.zeros(ngroups, n), torch.zeros(ngroups, n)
        for gi in range(ngroups):
            cols = w[:, g_idx == gi]
            if sym:
                scales[gi] = (2 * cols.abs().amax(1) / maxq).half().float()
                zeros[gi] = (maxq + 1) // 2
            else:
                lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
                scales[gi] = ((hi - lo) / maxq).half().float()
                zeros[gi] = torch.round(-lo / scales[gi]).clamp(0, maxq)
        s, z = scales[g_idx].t(), zeros[g_idx].t()  # [N, K]: each input's own group
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        reference[name] = ((q - z) * s, g_idx)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = _pack_words(q.t(), bits, 0)  # [K / per, N]
        state[f"{name}.qzeros"] = _pack_words((zeros - 1) % 2**bits, bits, 1)  # [G, N / per]
        state[f"{name}.scales"] = scales.half().contiguous()
        state[f"{name}.g_idx"] = g_idx.to(torch.int32)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = model.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "sym": sym,
        "desc_act": act_order,
        "checkpoint_format": "gptq",
    }
    (path / "config.json").write_text(json.dumps(config))
    return reference


def float_model_with(model, reference):
    """``model`` with its block linears holding the reference dequantized weights, in float."""
    for name, (w, _) in reference.items():
        model.get_submodule(name).weight.data = w.clone()
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lowbit_loads_a_gptq_checkpoint_built_to_the_published_layout(tmp_path):
    model = tiny_llama()
    reference = write_gptq_checkpoint(model, tmp_path / "gptq")
    loaded = lowbit.load(tmp_path / "gptq")
    for name, (w, _) in reference.items():
        assert loaded.get_submodule(name).in_perm is None  # contiguous groups: no permutation
        torch.testing.assert_close(loaded.get_submodule(name).weight, w)
    ids = torch.randint(0, 128, (2, 16))
    float_model_with(model, reference)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=2e-2, atol=2e-2)


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


# --- act-order (desc_act) checkpoints: groups scattered over the inputs by g_idx ---------------------

ACT_ORDER = [(4, 32, False), (4, 40, False), (8, 16, True), (2, 32, False)]
ACT_ORDER_IDS = ["int4 g32", "int4 g40 ragged", "int8 g16 sym", "int2 g32"]


def test_qlinear_in_perm_is_applied_before_every_kernel():
    from lowbit.formats import WeightFormat
    from lowbit.kernels import cpu
    from lowbit.nn.qlinear import input_permutation

    g = torch.Generator().manual_seed(0)
    n, k = 48, 128
    w, bias, perm = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randperm(k, generator=g)
    for fmt, kernels in ((WeightFormat("int", 4, 32, False), ("dequant", "int4_cpu", "auto")),
                         (WeightFormat("int", 8, -1, True), ("dequant", "int8_cpu", "auto"))):  # fmt: skip
        qw = lowbit.QuantizedWeight.quantize(w[:, perm], fmt)  # stored columns in permuted order
        runnable = {"int4_cpu": cpu.int4_group(qw) is not None, "int8_cpu": cpu.int8_supported(qw)}
        for kernel in kernels:
            if not runnable.get(kernel, True):  # PyTorch builds without the packed CPU ops
                continue
            layer = lowbit.QLinear(qw, bias, kernel, in_perm=perm)
            plain = lowbit.QLinear(qw, bias, kernel)  # the same stored weight, fed pre-permuted inputs
            assert "act-order" in repr(layer) and layer.describe().endswith("act-order")
            assert torch.equal(layer.dequantized_weight()[:, perm], layer.stored_weight())
            for rows in (1, 3, 40):  # the vector and the matrix paths
                x = torch.randn(rows, k, generator=g)
                with torch.no_grad():
                    y, y_plain = layer(x), plain(x[:, perm])
                assert torch.equal(y, y_plain)
                want = x.double() @ layer.weight.double().t() + bias.double()
                if kernel == "dequant":
                    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
                else:  # the packed kernels run on bf16 activations
                    assert float((y.double() - want).norm() / want.norm()) < 1e-2
    assert input_permutation(torch.arange(k), k) is None  # the identity is no permutation
    with pytest.raises(ValueError, match="permutation of the 128 input channels"):
        input_permutation(torch.zeros(k, dtype=torch.long), k)


@pytest.mark.parametrize("bits,group,sym", ACT_ORDER, ids=ACT_ORDER_IDS)
def test_act_order_checkpoint_computes_what_its_g_idx_describes(tmp_path, bits, group, sym):
    model = tiny_llama()
    reference = write_gptq_checkpoint(model, tmp_path / "gptq", bits, group, act_order=True, sym=sym)
    exact = lowbit.load(tmp_path / "gptq", kernel="dequant")
    for name, (w, g_idx) in reference.items():
        layer = exact.get_submodule(name)
        assert torch.equal(layer.in_perm, torch.argsort(g_idx, stable=True)) and "act-order" in repr(layer)
        assert layer.fmt.group_size == group and layer.fmt.symmetric == sym
        assert torch.equal(layer.dequantized_weight(), w) and torch.equal(layer.weight, w)
    ids = torch.randint(0, 128, (2, 16))
    ref = _logits(float_model_with(model, reference), ids)
    torch.testing.assert_close(_logits(exact, ids), ref, rtol=1e-5, atol=1e-5)
    fast = lowbit.load(tmp_path / "gptq")  # the packed CPU kernels where they fit (bf16 activations)
    torch.testing.assert_close(_logits(fast, ids), ref, rtol=1e-2, atol=1e-2)


def test_act_order_round_trips_through_the_gptq_layout(tmp_path):
    from safetensors.torch import load_file

    from lowbit.io.gptq_layout import export_gptq

    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "a", 4, 40, act_order=True)  # ragged last groups too
    loaded = lowbit.load(tmp_path / "a")
    export_gptq(loaded, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["desc_act"] is True
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    quantized = [k for k in a if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    assert len(quantized) == 4 * 14 and all(torch.equal(a[k], b[k]) for k in quantized)  # the same file contents
    again = lowbit.load(tmp_path / "b")
    ids = torch.randint(0, 128, (2, 16))
    assert torch.equal(_logits(again, ids), _logits(loaded, ids))


def test_act_order_round_trips_through_lowbits_own_format(tmp_path):
    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "gptq", 4, 32, act_order=True)
    loaded = lowbit.load(tmp_path / "gptq")
    lowbit.save(loaded, tmp_path / "n1")
    again = lowbit.load(tmp_path / "n1")
    for name, mod in loaded.named_modules():
        if isinstance(mod, lowbit.QLinear):
            assert torch.equal(again.get_submodule(name).in_perm, mod.in_perm)
    ids = torch.randint(0, 128, (2, 16))
    assert torch.equal(_logits(again, ids), _logits(loaded, ids))
    lowbit.save(again, tmp_path / "n2")
    assert (tmp_path / "n1" / "model.safetensors").read_bytes() == (tmp_path / "n2" / "model.safetensors").read_bytes()


def test_compressed_tensors_export_refuses_act_order_layers_by_name(tmp_path):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors to test this layout")
    from lowbit.io.compressed_tensors import export_compressed_tensors

    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "gptq", 4, 32, act_order=True, sym=True)
    with pytest.raises(ValueError, match=r"act-order \(permuted input\) layers model\.layers\.0\.self_attn\.q_proj, "):
        export_compressed_tensors(lowbit.load(tmp_path / "gptq"), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def _act_order_linears(model, fmt, where: str, seed=0):
    """Replace the linears whose names contain ``where`` by act-order QLinears (random input orders)."""
    from lowbit.models.adapters import set_module

    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and where in name:
            perm = torch.randperm(mod.in_features, generator=g)
            qw = lowbit.QuantizedWeight.quantize(mod.weight.detach()[:, perm], fmt)
            set_module(model, name, lowbit.QLinear(qw, mod.bias, "dequant", in_perm=perm))
    return model


def _tiny_bert():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    return tf.BertModel(cfg).eval()


def test_onnx_writes_act_order_int8_layers_exactly_and_refuses_grouped_ones(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime to test ONNX export")
    pytest.importorskip("onnx", reason="pip install onnx to test ONNX export")
    from lowbit.formats import WeightFormat
    from lowbit.io.onnx_export import export_onnx

    for sym in (True, False):  # one scale per row: the code columns go back to input order exactly
        model = _act_order_linears(_tiny_bert(), WeightFormat("int", 8, -1, sym), "encoder.layer")
        out = tmp_path / f"o{sym}"
        export_onnx(model, out)
        ids = torch.randint(0, 64, (2, 8))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 6:] = 0
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = ort.InferenceSession(str(out / "model.onnx"), plain).run(
            None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        )[0]
        keep = mask.numpy().astype(bool)
        assert abs(got[keep] - ref[keep]).max() < 1e-4
    grouped = _act_order_linears(_tiny_bert(), WeightFormat("int", 4, 16, False), "encoder.layer")
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query: int4 g16 asym act-order"):
        export_onnx(grouped, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_gguf_writes_act_order_layers_in_input_order(stories_dir, tmp_path):
    gguf = pytest.importorskip("gguf", reason="pip install gguf sentencepiece to test GGUF export")
    pytest.importorskip("sentencepiece", reason="pip install sentencepiece to test GGUF export")
    from lowbit.formats import WeightFormat
    from lowbit.io.gguf_export import _rope_permute, export_gguf
    from lowbit.models import load_pretrained

    model, _ = load_pretrained(str(stories_dir))
    _act_order_linears(model, WeightFormat("int", 4, 32, True), ".layers.")  # q4_0's own scheme, but permuted
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    f32 = export_gguf(model, tmp_path / "f.gguf", stories_dir, "f32")
    q4 = export_gguf(model, tmp_path / "q.gguf", stories_dir, "q4_0")
    assert f32["native"] == f32["requantized"] == [] and q4["native"] == []
    assert len(q4["requantized"]) == 30 and all("act-order (permuted input)" in r for r in q4["requantized"])
    files = {p: {t.name: t for t in gguf.GGUFReader(str(tmp_path / p)).tensors} for p in ("f.gguf", "q.gguf")}
    for hf, name, h in [("self_attn.q_proj", "attn_q", heads), ("self_attn.k_proj", "attn_k", kv),
                        ("mlp.gate_proj", "ffn_gate", None), ("mlp.down_proj", "ffn_down", None)]:  # fmt: skip
        ref = model.model.layers[1].get_submodule(hf).weight
        ref = _rope_permute(ref, h) if h else ref
        t = files["f.gguf"][f"blk.1.{name}.weight"]
        assert torch.equal(torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type)).float(), ref)
        t = files["q.gguf"][f"blk.1.{name}.weight"]
        if hf != "mlp.down_proj":  # 172 inputs: F32 (reported), as for any layer
            want = gguf.quants.dequantize(gguf.quants.quantize(ref.numpy(), t.tensor_type), t.tensor_type)
            assert t.tensor_type.name == "Q4_0"
            assert torch.equal(torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type)).float(),
                               torch.from_numpy(want).float())  # fmt: skip


def test_lowbit_eval_and_info_read_an_act_order_checkpoint(tiny_llama_dir, text_file, tmp_path):
    import transformers as tf

    from lowbit.eval import perplexity

    model = tf.LlamaForCausalLM.from_pretrained(tiny_llama_dir).float().eval()
    reference = write_gptq_checkpoint(model, tmp_path / "g", 4, 40, act_order=True)  # 64 and 96 inputs: ragged
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, tmp_path / "g" / f.name)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tmp_path / "g"), "--ppl", str(text_file), "--seqlen", "32", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    tok = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)
    ref = perplexity(float_model_with(model, reference), tok, text_file.read_text(), seqlen=32, progress=False)
    assert ev["tokens"] == ref["tokens"] and abs(ev["ppl"] / ref["ppl"] - 1) < 1e-3
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "g"), "--json"]).stdout)
    assert info["block_linears_quantized"] == info["block_linears_total"] == 14


def test_g_idx_with_groups_of_unequal_sizes_is_refused_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "gptq", act_order=True)
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.g_idx"
    t[key][t[key] == 0] = torch.tensor([1] + [0] * 31, dtype=torch.int32)  # one input moves to group 1
    save_file(t, str(tmp_path / "gptq" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj\.g_idx assigns groups of \[31, 33\] inputs"):
        lowbit.load(tmp_path / "gptq")


def test_info_reads_a_gptq_checkpoint(tmp_path):
    model = tiny_llama()
    write_gptq_checkpoint(model, tmp_path / "gptq")
    runner = CliRunner()
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "gptq"), "--json"]).stdout)
    assert info["quant_method"] == "gptq" and info["block_linears_quantized"] == info["block_linears_total"] == 14
    assert 4.0 < info["bits_per_weight"] < 4.7  # 4-bit codes + fp16 scales and packed zeros per 32


def test_weight_only_layouts_refuse_models_with_integer_activations(tiny_llama_dir, tmp_path):
    """GPTQ and GGUF files carry weights only: a W8A8 model written there would compute something else."""
    pytest.importorskip("gguf", reason="pip install gguf to test GGUF export")
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gptq_layout import export_gptq
    from lowbit.models import load_pretrained

    model, _ = load_pretrained(str(tiny_llama_dir))
    lowbit.quantize(model, "rtn", bits=8, group_size=-1, symmetric=True, act_bits=8, progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: integer activations"):
        export_gptq(model, tmp_path / "g")
    with pytest.raises(ValueError, match=r"integer activations: model\.layers\.0\.self_attn\.q_proj"):
        export_gguf(model, tmp_path / "m.gguf", tiny_llama_dir, "q8_0")
    assert not (tmp_path / "g").exists() and not (tmp_path / "m.gguf").exists()
