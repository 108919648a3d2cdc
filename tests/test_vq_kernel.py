"""lowbit's vector-quantized kernel (``kernels/vq.py``) on every instruction-set path of this CPU against
dequantize-then-matmul in fp32: 2-D codebooks of 2, 3 and 4 bits per weight (4-, 6- and 8-bit indices) in
blocks of whole row groups and in blocks smaller than one (their codebooks merged), 1-D and 4-D codebooks,
ragged columns and odd vector counts, fp32 codebooks, one row to a batch past the GEMV; then ``QLinear``
choosing it for a GPTVQ-quantized model and adding outliers and low-rank terms beside it."""

import copy
import functools

import pytest
import torch
import transformers as tf

import lowbit
from lowbit import QLinear, WeightFormat
from lowbit.formats import vector
from lowbit.formats.lowrank import LowRank
from lowbit.formats.sparse import Outliers
from lowbit.kernels import vq
from lowbit.kernels.build import cpu_flags
from lowbit.quantized_weight import QuantizedWeight

pytestmark = pytest.mark.skipif(vq.extension() is None, reason="lowbit's vq kernel could not be built here")

ISAS = vq.available_isas() if vq.extension() is not None else []
VBMI = "avx512vbmi" in cpu_flags()

# name: (format, rows, columns, the path each asked-for SIMD path runs: "asked", or the one that runs instead)
LAYOUTS = {
    "vq2-d2-blocks": (WeightFormat("vq", 2, 64, vq_dim=2), 80, 200, "asked"),  # last group: 8 columns
    "vq3-d2-odd-columns": (WeightFormat("vq", 3, 32, vq_dim=2, vq_block=2048), 80, 101, "asked"),
    "vq4-d2-blocks": (WeightFormat("vq", 4, 64, vq_dim=2, vq_block=4096), 80, 130, "asked" if VBMI else "avx2"),
    "vq2-d2-ragged-rows": (WeightFormat("vq", 2, 64, vq_dim=2), 37, 136, "asked"),  # last row group: 5 rows
    "vq2-d2-merged": (WeightFormat("vq", 2, -1, vq_dim=2), 40, 200, "asked"),  # 20 rows a codebook
    "vq3-d1-blocks": (WeightFormat("vq", 3, 32, vq_dim=1), 48, 70, "asked"),
    "vq2-d1-merged": (WeightFormat("vq", 2, -1, vq_dim=1), 40, 70, "asked"),  # GPTVQ's block: 7 rows a codebook
    "vq2-d4": (WeightFormat("vq", 2, -1, vq_dim=4), 20, 38, "portable"),
    "vq4-d2-small-blocks": (WeightFormat("vq", 4, 64, vq_dim=2, vq_block=1024), 40, 128, "portable"),
}


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to fp32 rounding: the sums are the same products added in another order."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@functools.cache
def _weight(name: str) -> QuantizedWeight:
    """Random indices and fp16 codebooks (the kernel does not care whether k-means chose them)."""
    fmt, n, k, _ = LAYOUTS[name]
    gen = torch.Generator().manual_seed(n + k)
    nbooks, entries, dim = vector.book_shape(n, k, fmt)
    codes = torch.randint(0, entries, (n, vector.vectors(k, dim)), generator=gen, dtype=torch.uint8)
    return QuantizedWeight.from_codes(codes, torch.randn(nbooks, entries, dim, generator=gen).half(), None, fmt, (n, k))


@functools.cache
def _packed(name: str) -> vq.Packed:
    packed = vq.Packed(_weight(name), torch.device("cpu"))
    packed.tile = 8  # several tiles past the GEMV rows
    return packed


def _check(qw: QuantizedWeight, packed: vq.Packed, rows: int, isa: str) -> None:
    x = torch.randn(rows, qw.matrix_shape[1])
    bias = torch.randn(qw.matrix_shape[0])
    _close(packed.matmul(x, bias=bias, isa=isa), x @ qw.dequantize().t() + bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 140])  # 40: GEMV passes of 16 rows; 140: tiles and BLAS
def test_vq_weights_match_dequantize_then_matmul_on_every_path(isa, layout, rows):
    _check(_weight(layout), _packed(layout), rows, isa)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "portable"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_runs_on_the_simd_path_asked_for_unless_it_cannot(isa, layout):
    runs = LAYOUTS[layout][3]
    want = isa if runs == "asked" or (runs == "avx2" and isa == "avx2") else runs
    assert _packed(layout).path(isa) == want


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_codebooks_run_without_the_fp16_planes_and_pairs(isa):
    fmt = WeightFormat("vq", 4, 32, vq_dim=2, vq_block=64 * 32)
    gen = torch.Generator().manual_seed(3)
    nbooks, entries, dim = vector.book_shape(72, 96, fmt)
    codes = torch.randint(0, entries, (72, 48), generator=gen, dtype=torch.uint8)
    qw = QuantizedWeight.from_codes(codes, torch.randn(nbooks, entries, dim, generator=gen), None, fmt)
    assert qw.scale.dtype == torch.float32  # values fp16 would round: kept in fp32
    packed = vq.Packed(qw, torch.device("cpu"))
    assert packed.planes is None and packed.pairs is None
    for rows in (1, 5):
        _check(qw, packed, rows, isa)


def test_dequantize_is_bit_exact_and_gradients_flow_through_the_decoded_weight():
    qw, packed = _weight("vq3-d2-odd-columns"), _packed("vq3-d2-odd-columns")
    assert torch.equal(packed.dequantize(), qw.dequantize())
    n, k = qw.matrix_shape
    x = torch.randn(2, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True)
    packed.matmul(x, bias=bias).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    (x2 @ qw.dequantize().t() + b2).square().sum().backward()
    _close(x.grad, x2.grad)
    _close(bias.grad, b2.grad)


def test_lowbit_isa_forces_a_path_and_refuses_unknown_ones(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "portable")
    assert vq.isa_code() == 0
    assert vq.Packed(_weight("vq2-d2-blocks"), torch.device("cpu")).path() == "portable"
    monkeypatch.setenv("LOWBIT_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown instruction set"):
        vq.isa_code()


def test_qlinear_adds_outliers_and_low_rank_terms_beside_the_vq_kernel():
    qw = copy.copy(_weight("vq4-d2-blocks"))
    n, k = qw.matrix_shape
    gen = torch.Generator().manual_seed(5)
    qw.outliers = Outliers.from_dense(torch.randn(n, k, generator=gen) * 3, torch.rand(n, k, generator=gen) < 0.03)
    qw.lowrank = LowRank.of_error(torch.randn(n, k, generator=gen) * 0.1, 4)
    bias = torch.randn(n)
    auto, dequant = QLinear(qw, bias, kernel="auto"), QLinear(qw, bias, kernel="dequant")
    assert auto.select_kernel(torch.device("cpu")) == "vq"
    for rows in (1, 7, 33):
        x = torch.randn(rows, k)
        with torch.no_grad():
            _close(auto(x), dequant(x))


def test_a_gptvq_llama_runs_the_vq_kernel_under_auto_with_the_dequantize_paths_logits():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model, ids = tf.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (2, 12))
    q = lowbit.quantize(model, "gptvq", calib=ids, bits=3, kmeans_iters=3, update_iters=1, progress=False)
    layers = [m for m in q.modules() if isinstance(m, QLinear)]
    assert layers and all(m.fmt.kind == "vq" and m.select_kernel(torch.device("cpu")) == "vq" for m in layers)
    with torch.no_grad():
        auto = q(input_ids=ids).logits
        ref = copy.deepcopy(q)
        for m in ref.modules():
            if isinstance(m, QLinear):
                m.kernel, m._cache = "dequant", {}
        _close(auto, ref(input_ids=ids).logits)
