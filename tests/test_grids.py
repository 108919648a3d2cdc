"""Fixed non-uniform weight grids (formats.floating: pot, apot, log): the levels against their
definitions written out here, the sign-magnitude code layout, exact bits, the scale search,
GPTQ on a grid, the table kernel against dequantize-then-matmul, and a checkpoint round trip."""

import copy
import itertools
import math

import pytest
import torch
import transformers as tf

import lowbit
from lowbit.formats import floating
from lowbit.formats.spec import WeightFormat
from lowbit.methods.gptq import GPTQ, gptq_quantize
from lowbit.methods.rtn import RTN
from lowbit.nn import QLinear
from lowbit.quantized_weight import QuantizedWeight


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pot_levels_are_zero_and_descending_powers_of_two(bits):
    mags = floating.grid_magnitudes("pot", bits)
    want = [0.0] + [2.0**-j for j in range(2 ** (bits - 1) - 1)]
    assert mags == sorted(want)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_log_levels_step_by_sqrt2(bits):
    mags = floating.grid_magnitudes("log", bits)
    assert mags[0] == 0.0 and mags[-1] == 1.0 and len(mags) == 2 ** (bits - 1)
    for a, b in itertools.pairwise(mags[1:]):
        assert b / a == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7])
def test_apot_levels_are_sums_of_one_power_per_term(bits):
    m = bits - 1
    n = (m + 1) // 2
    # term i of 2 bits (the last of 1 when m is odd): 0 or 2^-(i + 1 + j n)
    terms = [[0.0] + [2.0 ** -(i + 1 + j * n) for j in range(3 if 2 * (i + 1) <= m else 1)] for i in range(n)]
    sums = {0.0}
    for t in terms:
        sums = {a + b for a in sums for b in t}
    assert len(sums) == 2**m  # every combination a distinct level
    top = max(sums)
    assert floating.grid_magnitudes("apot", bits) == pytest.approx(sorted(v / top for v in sums), abs=0)


def test_codes_are_sign_and_magnitude_and_round_trip_exactly():
    levels = floating.codebook("apot", 4)
    assert torch.equal(levels[8:], -levels[:8])
    scale = torch.tensor([[0.5, 2.0]])
    codes = torch.tensor([[0, 3, 9, 15, 7, 12, 1, 8]], dtype=torch.uint8)  # two groups of 4
    w = floating.dequantize(codes, scale, "apot", 4, bits=4)
    again = floating.quantize(w, scale, "apot", 4, bits=4)
    assert torch.equal(floating.dequantize(again, scale, "apot", 4, bits=4), w)  # -0 may recode as +0
    fmt = WeightFormat("apot", 4, 4)
    qw = QuantizedWeight.from_codes(codes, scale, None, fmt, (1, 8))
    assert torch.equal(qw.dequantize(), w)
    assert qw.storage_bits() == 8 * 4 + 2 * 16  # 4-bit codes, fp16 scales: nothing else


def test_format_checks():
    with pytest.raises(ValueError, match="from 2 to 8"):
        WeightFormat("pot", 1, 64)
    assert WeightFormat("log", 3, 32).describe() == "log3 g32"
    assert WeightFormat("pot", 3, 32, scale_bits=4).describe() == "pot3 g32 scales int4/256"
    back = WeightFormat.from_dict(WeightFormat("apot", 3, -1).to_dict())
    assert back == WeightFormat("apot", 3, -1)


@pytest.mark.parametrize("kind", ["pot", "apot", "log"])
def test_the_scale_search_never_does_worse_than_absmax(kind):
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    plain = RTN(bits=3, group_size=64, format=kind).quantize_weight(w)
    searched = RTN(bits=3, group_size=64, format=kind, mse=True, mse_norm=2.0).quantize_weight(w)
    err = lambda q: ((q.dequantize() - w) ** 2).reshape(32, 4, 64).sum(-1)
    assert bool((err(searched) <= err(plain) * (1 + 1e-6)).all())  # absmax (p = 1) is one of the factors
    assert float(err(searched).sum()) < 0.95 * float(err(plain).sum())


@pytest.mark.parametrize("kind", ["apot", "nf4"])
def test_gptq_on_a_grid_lowers_the_output_error_and_stores_its_codes(kind):
    torch.manual_seed(0)
    x = torch.randn(512, 96) @ torch.randn(96, 96)  # correlated inputs
    w = torch.randn(48, 96)
    H = x.t() @ x / 512
    bits = 4
    codes, scale, _ = gptq_quantize(w, H, bits, 32, True, mse=True, kind=kind)
    fmt = WeightFormat(kind, bits, 32)
    qw = QuantizedWeight.from_codes(codes, scale, None, fmt, tuple(w.shape))
    rtn = QuantizedWeight.quantize(w, fmt)
    out_err = lambda q: float(((x @ (q.dequantize() - w).t()) ** 2).mean())
    assert out_err(qw) < 0.8 * out_err(rtn)
    assert GPTQ(bits=4, group_size=32, format=kind).weight_format.kind == kind
    with pytest.raises(ValueError, match="scaled codebooks"):
        GPTQ(format="lut")


@pytest.mark.parametrize("kind,bits,group", [("pot", 3, 64), ("apot", 4, 32), ("log", 2, -1), ("log", 4, 48)])
@pytest.mark.parametrize("rows", [1, 5, 24])
def test_grid_layers_run_on_the_table_kernel_as_dequantize_then_matmul(kind, bits, group, rows):
    torch.manual_seed(0)
    qw = QuantizedWeight.quantize(torch.randn(40, 144), WeightFormat(kind, bits, group))
    layer = QLinear(qw)
    assert layer.select_kernel(torch.device("cpu")) == "lut"
    x = torch.randn(rows, 144)
    ref = x @ qw.dequantize().t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4)


def test_a_grid_quantized_llama_reloads_exactly(tmp_path):
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    calib = torch.randint(0, 64, (4, 16))
    q = lowbit.quantize(copy.deepcopy(model), "gptq", bits=3, group_size=32, format="log", calib=calib,
                        progress=False)  # fmt: skip
    assert {x.method for x in q.lowbit_coverage.quantized} == {"gptq"}
    lowbit.save(q, tmp_path / "log3")
    back = lowbit.load(tmp_path / "log3", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
