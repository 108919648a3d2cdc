"""Quantized scales (formats.double: QLoRA's double quantization, SpQR's statistics) and the nf4
method: the log-grid encoding against a written-out loop, exact bits, codes computed against the
stored scales (RTN, GPTQ), save/load, module buffers, and refusals."""

import copy

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import double
from lowbit.formats.spec import WeightFormat
from lowbit.methods import make_method
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight


def test_scales_encode_on_a_log_grid_per_run_as_a_written_out_loop_does():
    torch.manual_seed(0)
    s = torch.rand(3, 40) * 0.1 + 1e-3
    q = double.QuantizedScales.encode(s, 3, 16)
    got = q.decode()
    for r in range(3):
        for start in range(0, 40, 16):  # runs of 16, the last one ragged (8)
            run = s[r, start : start + 16].double()
            logs = torch.log2(run)
            base = float(torch.tensor(float(logs.min())).half())
            step = float(torch.tensor((float(logs.max()) - base) / 7).half())
            codes = torch.clamp(torch.round((logs - base) / step), 0, 7)
            want = torch.exp2(base + codes * step).half().float()
            assert torch.equal(got[r, start : start + 16], want)
            # every scale within half a step of the grid, relatively
            assert float((got[r, start : start + 16] / run.float()).log2().abs().max()) <= step / 2 + 2e-3
    assert q.storage_bits() == (3 * 40 * 3 + 7) // 8 * 8 + 3 * 3 * 2 * 16
    assert got.dtype == torch.float32 and torch.equal(got, got.half().float())
    with pytest.raises(ValueError, match="positive"):
        double.QuantizedScales.encode(torch.zeros(1, 4), 3, 16)


def test_nf4_with_double_quantization_costs_4_127_bits_and_reloads_exactly():
    torch.manual_seed(0)
    w = torch.randn(256, 1024)
    fmt = WeightFormat("nf4", 4, 64, scale_bits=8, scale_group_size=256)
    qw = QuantizedWeight.quantize(w, fmt)
    scales = 256 * 16  # 16 blocks of 64 per row
    assert (
        qw.storage_bits() == 256 * 1024 * 4 + scales * 8 + 16 * 2 * 16
    )  # codes, 8-bit scales, a base and step per run
    assert qw.bits_per_weight == pytest.approx(4.127, abs=1e-3)  # QLoRA's figure
    plain = QuantizedWeight.quantize(w, WeightFormat("nf4", 4, 64))
    rel = lambda q: float((q.dequantize() - w).pow(2).mean() / w.pow(2).mean())
    assert rel(qw) < 1.01 * rel(plain)
    # the codes are the nearest level against the stored (decoded) scales
    from lowbit.formats import floating

    assert torch.equal(qw.codes(), floating.quantize(w, qw.scale, "nf4", 64))
    back = QuantizedWeight.from_tensors(qw.to_tensors("l"), "l", fmt, qw.shape)
    assert "l.scales" not in qw.to_tensors("l") and torch.equal(back.dequantize(), qw.dequantize())
    assert WeightFormat.from_dict(fmt.to_dict()) == fmt and "scales int8/256" in fmt.describe()
    assert WeightFormat.from_dict({"kind": "int", "bits": 4, "group_size": 128, "symmetric": False}).scale_bits is None
    layer = QLinear(qw)
    x = torch.randn(5, 1024)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-4)
    assert torch.equal(layer.quantized_weight.scale_q.packed, qw.scale_q.packed)


def _problem():
    torch.manual_seed(0)
    X = torch.randn(256, 64) @ torch.randn(64, 64) * 0.3
    W = torch.randn(40, 64) * torch.linspace(0.05, 2, 40)[:, None]  # rows of very different scales

    class Stats:
        H = 2 * X.t() @ X / X.shape[0]
        tokens = 256
        groups = 1

    return W, X, Stats()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_codes_are_computed_against_the_stored_scales(method):
    W, X, stats = _problem()
    m = make_method(method, bits=3, group_size=16, scale_bits=3, scale_group_size=16)
    qw = m.quantize_linear(W, stats)
    assert qw.scale_q is not None and torch.equal(qw.scale_q.decode().t(), qw.scale)
    # the stored weight is (code - zero) * stored scale, and reload gives it back
    from lowbit.formats import integer

    torch.testing.assert_close(qw.dequantize(), integer.dequantize(qw.codes(), qw.scale, qw.zero, 16))
    back = QuantizedWeight.from_tensors(qw.to_tensors("p"), "p", qw.fmt, qw.shape)
    assert torch.equal(back.dequantize(), qw.dequantize())
    # 3-bit codes, zeros and scales per 16; a base and step per run of 16 (then 8) of the 40 rows, 4 groups
    assert qw.storage_bits() == 40 * 64 * 3 + 40 * 4 * 3 + 40 * 4 * 3 + 4 * 3 * 32
    plain = make_method(method, bits=3, group_size=16).quantize_linear(W, stats)
    err = lambda q: float(((X @ (q.dequantize() - W).t()) ** 2).mean())
    assert err(qw) < 1.5 * err(plain)
    # GPTQ rounds each group's scales when it reaches the group: the same encoding as the whole matrix
    again = double.QuantizedScales.encode(qw.scale_q.decode(), 3, 16)
    assert torch.equal(again.decode(), qw.scale_q.decode())


def test_scales_off_their_grid_and_unsupported_methods_are_refused():
    fmt = WeightFormat("int", 4, 16, scale_bits=4, scale_group_size=8)
    s, z = torch.rand(8, 2) + 0.5, torch.full((8, 2), 8.0)
    with pytest.raises(ValueError, match="second-level grid"):
        QuantizedWeight.from_codes(torch.zeros(8, 32, dtype=torch.uint8), s * 1.0001 + 1e-3, z, fmt)
    with pytest.raises(ValueError, match="does not compute its codes against quantized scales"):
        make_method("awq", scale_bits=8)
    with pytest.raises(ValueError, match="plain scales"):
        make_method("rtn", scale_bits=8, act_bits=8)
    with pytest.raises(ValueError, match="per channel or per group"):
        WeightFormat("lut", 3, -1, scale_bits=8)
    assert make_method("nf4", scale_bits=0).scale_bits is None  # --scale-bits 0: plain fp16 scales


def test_nf4_method_on_a_llama_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    q = lowbit.quantize(copy.deepcopy(model), "nf4", progress=False)
    recs = q.lowbit_coverage.quantized
    assert {r.method for r in recs} == {"nf4"}
    assert all(r.bits_per_weight < 4.25 for r in recs)  # plain fp16 scales of 64 would cost 4.25
    lowbit.save(q, tmp_path / "nf4")
    back = lowbit.load(tmp_path / "nf4", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
