"""lowbit's look-up-table kernel (``kernels/lut.py``) on every instruction-set path of this CPU
against dequantize-then-matmul in fp32: codebooks of 2, 3 and 4 bits per row, per group and with
a ragged last group, nf4 and fp4 with their scales, kept outliers and bias, one row to a batch
past the GEMV; then ``QLinear`` choosing it and a quantized Llama's logits with and without it."""

import copy
import functools

import pytest
import torch
import transformers as tf

import lowbit
from lowbit import QLinear, WeightFormat
from lowbit.formats.sparse import Outliers
from lowbit.kernels import lut
from lowbit.quantized_weight import QuantizedWeight

pytestmark = pytest.mark.skipif(lut.extension() is None, reason="lowbit's LUT kernel could not be built here")

ISAS = lut.available_isas() if lut.extension() is not None else []
N, K = 24, 200  # 200 = 3 * 64 + a ragged 8; with groups of 20, chunks straddle group boundaries
GROUPS = {"per-channel": -1, "g64-ragged": 64, "g20": 20}


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to fp32 rounding: the sums are the same products added in another order."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@functools.cache
def _weight(kind: str, bits: int, group: int | None, outliers: bool, k: int = K) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(bits * 100 + (group or 0))
    w = torch.randn(N, k, generator=gen)
    qw = QuantizedWeight.quantize(w, WeightFormat(kind, bits, group))
    if outliers:
        mask = torch.rand(N, k, generator=gen) < 0.03
        qw.outliers = Outliers.from_dense(torch.randn(N, k, generator=gen) * 3, mask)
    return qw


def _check(qw: QuantizedWeight, rows: int, isa: str, bias: bool) -> None:
    packed = lut.Packed(qw, torch.device("cpu"))
    packed.tile = 8  # several tiles past the GEMV rows
    x = torch.randn(rows, qw.matrix_shape[1])
    b = torch.randn(qw.matrix_shape[0]) if bias else None
    ref = x @ qw.dequantize().t() + (0 if b is None else b)
    _close(packed.matmul(x, bias=b, isa=isa), ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("extras", ["plain", "outliers+bias"])
def test_codebook_weights_match_dequantize_then_matmul_on_every_path(isa, bits, group, rows, extras):
    with_extras = extras != "plain"
    _check(_weight("lut", bits, group, with_extras), rows, isa, bias=with_extras)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("group", [-1, 64, 20, None], ids=["per-channel", "g64-ragged", "g20", "per-tensor"])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_nf4_and_fp4_match_dequantize_then_matmul_on_every_path(isa, kind, group, rows):
    _check(_weight(kind, 4, group, rows == 3), rows, isa, bias=rows == 16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "bits"),
    [
        ("nf4", 4),
        ("fp4", 4),
        ("lut", 4),
        ("lut", 3),
        ("lut", 2),
        ("bcq", 4),
        ("bcq", 3),
        ("pot", 2),
        ("log", 3),
        ("apot", 4),
    ],
)
@pytest.mark.parametrize("group", [32, 64, 96, 128])
@pytest.mark.parametrize("rows", [1, 3, 4, 5])
def test_whole_groups_match_dequantize_then_matmul(isa, kind, bits, group, rows):
    """Rows made of whole groups (the loops without ragged spans: AVX-512 at 64 and 128 columns, AVX2 from 32 to
    128 for one activation row, here also the fifth row of five), with outliers and bias, one row to past a
    block of four."""
    _check(_weight(kind, bits, group, rows == 3, k=384), rows, isa, bias=rows != 4)


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_codebooks_wide_codes_and_unaligned_rows_take_the_paths_that_fit(isa):
    gen = torch.Generator().manual_seed(1)
    books = torch.randn(N, 4 * 16, generator=gen).reshape(N, 4, 16).sort(-1).values.reshape(N, -1)
    fp32 = QuantizedWeight.from_codes(torch.randint(0, 16, (N, K), generator=gen), books, None,
                                      WeightFormat("lut", 4, 64))  # fmt: skip
    assert fp32.scale.dtype == torch.float32  # values fp16 would round: kept in fp32
    for qw in (fp32, _weight("lut", 6, 64, False), _weight("lut", 8, -1, True), _weight("lut", 3, 32, True, k=101)):
        for rows in (1, 5):
            _check(qw, rows, isa, bias=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group", [*GROUPS.values(), None], ids=[*GROUPS.keys(), "per-tensor"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_two_and_three_bit_integer_grids_match_dequantize_then_matmul_on_every_path(isa, bits, group, sym, rows):
    gen = torch.Generator().manual_seed(bits + 7 * (group or 0))
    qw = QuantizedWeight.quantize(torch.randn(N, K, generator=gen), WeightFormat("int", bits, group, symmetric=sym))
    packed = lut.Packed(qw, torch.device("cpu"))
    assert torch.equal(packed.dequantize(), qw.dequantize())  # the tables hold exactly the dequantized values
    _check(qw, rows, isa, bias=True)


def test_dequantize_is_bit_exact_and_gradients_flow_through_the_dequantized_weight():
    qw = _weight("lut", 3, 64, True)
    packed = lut.Packed(qw, torch.device("cpu"))
    assert torch.equal(packed.dequantize(), qw.dequantize())
    x = torch.randn(2, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    packed.matmul(x, bias=bias).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    (x2 @ qw.dequantize().t() + b2).square().sum().backward()
    _close(x.grad, x2.grad)
    _close(bias.grad, b2.grad)


def test_decode_table_gives_one_table_per_group_or_a_shared_codebook_and_scales():
    table, scale = lut.decode_table(_weight("lut", 3, 64, False))
    assert tuple(table.shape) == (N, 4, 8) and table.dtype == torch.float16 and scale is None
    table, scale = lut.decode_table(_weight("nf4", 4, 64, False))
    assert tuple(table.shape) == (1, 1, 16) and table.dtype == torch.float32 and tuple(scale.shape) == (N, 4)
    with pytest.raises(ValueError, match="cannot decode int4"):
        lut.decode_table(QuantizedWeight.quantize(torch.randn(4, 64), WeightFormat("int", 4, 32)))


def test_lowbit_isa_forces_a_path_and_refuses_unknown_ones(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "portable")
    assert lut.isa_code() == 0
    monkeypatch.setenv("LOWBIT_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown instruction set"):
        lut.isa_code()


@pytest.mark.parametrize("fmt", [WeightFormat("lut", 4, -1), WeightFormat("lut", 3, 64), WeightFormat("nf4", 4, 64)],
                         ids=lambda f: f.describe())  # fmt: skip
def test_qlinear_auto_runs_the_lut_kernel_and_equals_the_dequant_kernel(fmt):
    qw = _weight(fmt.kind, fmt.bits, fmt.group_size, True)
    bias = torch.randn(N)
    auto, dequant = QLinear(qw, bias, kernel="auto"), QLinear(qw, bias, kernel="dequant")
    assert auto.select_kernel(torch.device("cpu")) == "lut"
    for rows in (1, 7, 33):
        x = torch.randn(rows, K)
        with torch.no_grad():
            _close(auto(x), dequant(x))
    x = torch.randn(3, K, requires_grad=True)
    auto(x).sum().backward()
    _close(x.grad, (torch.ones(3, N) @ qw.dequantize()))


def test_a_codebook_llama_gives_the_same_logits_with_the_lut_kernel_as_with_dequant():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    q = lowbit.quantize(model, "rtn", format="lut", bits=3, group_size=-1, progress=False)
    layers = [m for m in q.modules() if isinstance(m, QLinear)]
    assert layers and all(m.select_kernel(torch.device("cpu")) == "lut" for m in layers)
    with torch.no_grad():
        auto = q(input_ids=ids).logits
        ref = copy.deepcopy(q)
        for m in ref.modules():
            if isinstance(m, QLinear):
                m.kernel, m._cache = "dequant", {}
        _close(auto, ref(input_ids=ids).logits)
