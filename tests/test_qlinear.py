"""Every QLinear kernel path against the dequantize-then-matmul reference."""

import pytest
import torch

from lowbit import QLinear, WeightFormat
from lowbit.kernels import avx512, cpu, lut, wq
from lowbit.quantized_weight import QuantizedWeight


def _pair(fmt, k=256, n=64, bias=True):
    lin = torch.nn.Linear(k, n, bias=bias)
    return lin, QLinear.from_linear(lin, fmt)


def _reference(q, x):
    y = x @ q.weight.t()
    return y + q.bias if q.bias is not None else y


INT4_FORMATS = [
    WeightFormat("int", 4, 128, False),
    WeightFormat("int", 4, 32, True),
    WeightFormat("int", 4, -1, False),
    WeightFormat("int", 4, 64, False),
]


@pytest.mark.parametrize("fmt", INT4_FORMATS, ids=lambda f: f.describe())
def test_int4_cpu_kernel_matches_reference(fmt):
    lin = torch.nn.Linear(256, 64)
    q = QLinear.from_linear(lin, fmt, kernel="int4_cpu")
    for shape in [(1, 256), (8, 256), (3, 5, 256)]:
        x = torch.randn(shape)
        torch.testing.assert_close(q(x), _reference(q, x), rtol=2e-2, atol=2e-2)


def _need_avx512():
    if avx512.extension() is None:
        pytest.skip("lowbit's AVX-512 kernel is not available on this CPU or could not be built")


def _need_native():
    if wq.extension() is None:
        pytest.skip("lowbit's CPU kernels could not be built here (no compiler?)")


NATIVE_FORMATS = [
    *INT4_FORMATS,
    WeightFormat("int", 4, 96),  # a group that is not a power of two
    WeightFormat("int", 4, 8, True),  # groups shorter than one vector step
    WeightFormat("int", 8, -1, False),
    WeightFormat("int", 8, -1, True),
    WeightFormat("int", 8, 64, False),
    WeightFormat("int", 8, 24, True),
]


@pytest.mark.parametrize("fmt", NATIVE_FORMATS, ids=lambda f: f.describe())
def test_every_native_kernel_path_equals_dequantize_then_matmul(fmt):
    """Each instruction-set path, GEMV and tiled GEMM, ragged last groups: fp32 rounding only."""
    _need_native()
    g = torch.Generator().manual_seed(0)
    for k, n in ((288, 40), (300, 24)):  # 288 = 2 * 128 + 32, 300: ragged for every group here
        qw = QuantizedWeight.quantize(torch.randn(n, k, generator=g), fmt)
        packed = wq.Packed(qw, torch.device("cpu"))
        packed.tile = 16  # several tiles even for these small layers
        ref = qw.dequantize().double()
        for isa in wq.available_isas():
            assert torch.equal(packed.dequantize(isa), qw.dequantize()), isa
            for rows in (1, 2, 3, 4, 5, 9, 40):  # remainder chunks of the GEMV; the tiled path
                x = torch.randn(rows, k, generator=g)
                y = packed.matmul(x, isa).double()
                want = x.double() @ ref.t()
                rel = float((y - want).norm() / want.norm())
                assert rel < 1e-5, (isa, k, rows, rel)


def test_native_paths_agree_with_each_other_on_a_layer():
    _need_native()
    lin = torch.nn.Linear(512, 96)
    q = QLinear.from_linear(lin, WeightFormat("int", 4, 128))
    assert q.select_kernel(torch.device("cpu"), 1) == "native"
    x = torch.randn(3, 512)
    outs = [q._prepare("native", x.device).matmul(x, isa) for isa in wq.available_isas()]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(x), _reference(q, x), rtol=1e-5, atol=1e-5)


def test_native_kernel_keeps_the_input_dtype_and_shape():
    _need_native()
    q = QLinear.from_linear(torch.nn.Linear(64, 32), WeightFormat("int", 4, 32))
    x = torch.randn(2, 3, 64)
    assert q(x).shape == (2, 3, 32)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert q(torch.randn(0, 64)).shape == (0, 32)


def test_native_kernel_passes_gradients_to_its_input():
    _need_native()
    q = QLinear.from_linear(torch.nn.Linear(64, 16), WeightFormat("int", 4, 32))
    for rows in (2, 40):  # the GEMV and the tiled path
        x = torch.randn(rows, 64, requires_grad=True)
        q(x).square().sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        _reference(q, x_ref).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_native_kernel_refuses_a_path_the_cpu_lacks_and_unknown_names(monkeypatch):
    _need_native()
    with pytest.raises(ValueError, match="unknown instruction set"):
        wq.isa_code("sse9")
    monkeypatch.setattr(wq, "available_isas", lambda: ["portable"])
    with pytest.raises(ValueError, match="cannot run lowbit's avx2 kernels"):
        wq.isa_code("avx2")


def test_lowbit_isa_environment_variable_forces_a_path(monkeypatch):
    _need_native()
    monkeypatch.setenv("LOWBIT_ISA", "portable")
    assert wq.selected_isa() == "portable"
    q = QLinear.from_linear(torch.nn.Linear(64, 16), WeightFormat("int", 8, -1))
    x = torch.randn(2, 64)
    torch.testing.assert_close(q(x), _reference(q, x), rtol=1e-5, atol=1e-5)


def test_odd_k_4bit_is_not_run_natively():
    qw = QuantizedWeight.quantize(torch.randn(8, 33), WeightFormat("int", 4, -1))
    assert not wq.supported(qw)
    q = QLinear(qw)
    assert q.select_kernel(torch.device("cpu")) == "dequant"
    x = torch.randn(2, 33)
    torch.testing.assert_close(q(x), _reference(q, x))


@pytest.mark.parametrize("fmt", [*INT4_FORMATS, WeightFormat("int", 4, 96)], ids=lambda f: f.describe())
@pytest.mark.parametrize("n", [64, 40])
def test_int4_avx512_bf16_mode_matches_reference(fmt, n):
    _need_avx512()
    lin = torch.nn.Linear(288, n)  # 288 = 2*128 + 32: a ragged last group for g128
    q = QLinear.from_linear(lin, fmt, kernel="int4_avx512")
    for shape in [(1, 288), (3, 288), (2, 4, 288)]:
        x = torch.randn(shape)
        torch.testing.assert_close(q(x), _reference(q, x), rtol=2e-2, atol=2e-2)


def test_avx512_fp32_path_is_exact_to_fp32_rounding():
    _need_avx512()
    q = QLinear.from_linear(torch.nn.Linear(512, 48), WeightFormat("int", 4, 128))
    x = torch.randn(5, 512)
    y = avx512.int4_gemv(x, q.quantized_weight, q.quantized_weight.zero, use_bf16=False)
    torch.testing.assert_close(y, x @ q.weight.t(), rtol=1e-5, atol=1e-5)


def test_bf16_modes_are_opt_in():
    q = QLinear.from_linear(torch.nn.Linear(256, 64), WeightFormat("int", 4, 128))
    cpu_dev = torch.device("cpu")
    for rows in (1, 8, 9, 512):
        assert q.select_kernel(cpu_dev, rows=rows) in ("native", "dequant")  # exact paths only
    x = torch.randn(64, 256)
    torch.testing.assert_close(q(x), _reference(q, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_cpu_kernel_matches_reference(symmetric):
    lin = torch.nn.Linear(208, 40)
    q = QLinear.from_linear(lin, WeightFormat("int", 8, -1, symmetric), kernel="int8_cpu")
    x = torch.randn(4, 7, 208)
    torch.testing.assert_close(q(x), _reference(q, x), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize(
    "fmt,k,n",
    [
        (WeightFormat("int", 3, 32), 256, 64),
        (WeightFormat("int", 2, 16), 96, 32),
        (WeightFormat("nf4", 4, 64), 256, 64),
        (WeightFormat("fp4", 4, 32), 64, 32),
        (WeightFormat("fp8_e4m3", 8, -1), 64, 32),
    ],
    ids=lambda v: v.describe() if isinstance(v, WeightFormat) else str(v),
)
def test_unsupported_formats_fall_back_to_dequantize(fmt, k, n):
    lin, q = _pair(fmt, k, n)
    table = fmt.kind in lut.KINDS and lut.extension() is not None  # nf4 / fp4: tests/test_lut_kernel.py
    assert q.select_kernel(torch.device("cpu")) == ("lut" if table else "dequant")
    x = torch.randn(5, k)
    torch.testing.assert_close(q(x), _reference(q, x))
    # and the reference itself is close to the float layer
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < {2: 0.8, 3: 0.3}.get(fmt.bits, 0.15)


@pytest.mark.parametrize(
    "fmt,k,n",
    [
        (WeightFormat("int", 4, 128), 172, 64),  # K not a multiple of 32
        (WeightFormat("int", 4, 48), 192, 40),  # group not a multiple of 32, N not of 16
        (WeightFormat("int", 8, 64), 256, 64),  # grouped 8-bit
        (WeightFormat("int", 8, -1), 200, 64),  # K % 16 != 0
    ],
    ids=lambda v: v.describe() if isinstance(v, WeightFormat) else str(v),
)
def test_shapes_pytorchs_kernels_refuse_run_natively(fmt, k, n):
    _need_native()
    _, q = _pair(fmt, k, n)
    assert q.select_kernel(torch.device("cpu")) == "native"
    for rows in (1, 5, 33):
        x = torch.randn(rows, k)
        torch.testing.assert_close(q(x), _reference(q, x), rtol=1e-5, atol=1e-5)


def test_forced_dequant_kernel_agrees_with_int4_kernel():
    lin = torch.nn.Linear(128, 32)
    fast = QLinear.from_linear(lin, WeightFormat("int", 4, 32), kernel="int4_cpu")
    ref = QLinear.from_linear(lin, WeightFormat("int", 4, 32), kernel="dequant")
    x = torch.randn(2, 128)
    torch.testing.assert_close(fast(x), ref(x), rtol=2e-2, atol=2e-2)


def test_packed_kernel_layout_is_rebuilt_after_loading_new_state():
    lin_a, lin_b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    fmt = WeightFormat("int", 4, 32)
    qa, qb = QLinear.from_linear(lin_a, fmt, "int4_cpu"), QLinear.from_linear(lin_b, fmt, "int4_cpu")
    x = torch.randn(1, 64)
    qa(x)  # builds and caches qa's kernel layout
    qa.load_state_dict(qb.state_dict())
    torch.testing.assert_close(qa(x), qb(x))


def test_int4_kernel_group_choice():
    from lowbit.quantized_weight import QuantizedWeight

    qw = QuantizedWeight.quantize(torch.randn(32, 4096), WeightFormat("int", 4, -1))
    assert cpu.int4_group(qw) == 256  # per-channel is expressed with repeated group scales
    qw = QuantizedWeight.quantize(torch.randn(32, 4096), WeightFormat("int", 4, 96))
    assert cpu.int4_group(qw) is None


def test_unknown_kernel_name_is_rejected():
    from lowbit.quantized_weight import QuantizedWeight

    qw = QuantizedWeight.quantize(torch.randn(16, 32), WeightFormat("int", 4, 32))
    with pytest.raises(ValueError, match="unknown kernel"):
        QLinear(qw, kernel="cuda_magic")


def test_native_kernel_with_a_fused_bias_leaves_the_bias_alone():
    _need_native()
    lin = torch.nn.Linear(64, 16)
    q = QLinear.from_linear(lin, WeightFormat("int", 4, 32))
    bias = q.bias.detach().clone()
    x = torch.randn(1, 64)
    with torch.no_grad():
        first = q(x)
        for _ in range(3):
            torch.testing.assert_close(q(x), first, rtol=0, atol=0)
    assert torch.equal(q.bias.detach(), bias)
    torch.testing.assert_close(first, _reference(q, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the integer-digit GEMV
# 4-bit codes in groups of a multiple of 32 meet the activations as three signed byte digits
# per block of 128 columns (wq_gemm.cpp): exact integer dot products, one float stage per block.

DIGIT_CASES = [  # (group, K): one group per block, split blocks (64, 192), quarter scales (32, 96, 160),
    (128, 576),  # ragged K, short last block, groups across a chunk of 16 blocks (4200)
    (128, 300),
    (64, 576),
    (64, 300),
    (192, 576),
    (256, 1000),
    (128, 4096),
    (32, 576),
    (32, 300),
    (96, 576),
    (160, 1000),
    (32, 4200),
]


def _wide_range_input(rows, k, g):
    """Activations whose 128-column blocks differ by up to 10^6 in magnitude, with an all-zero block."""
    x = torch.randn(rows, k, generator=g)
    blocks = (k + 127) // 128
    scale = 10.0 ** torch.randint(-3, 4, (rows, blocks), generator=g).double()
    x = x * scale.repeat_interleave(128, 1)[:, :k].float()
    if k > 256:
        x[:, 128:256] = 0
    return x


@pytest.fixture(params=[True, False], ids=["avx-vnni-if-present", "vpmaddubsw"])
def avx_vnni(request):
    """Both batch-1 digit kernels of the AVX2 path: AVX-VNNI where the CPU has it, and vpmaddubsw."""
    ext = wq.extension()
    if ext is None:
        pytest.skip("lowbit's CPU kernels could not be built here (no compiler?)")
    before = ext.allow_avx_vnni(request.param)
    yield request.param
    ext.allow_avx_vnni(before)


@pytest.mark.parametrize("group,k", DIGIT_CASES)
def test_digit_gemv_equals_dequantize_then_matmul_on_every_path(group, k, avx_vnni):
    _need_native()
    g = torch.Generator().manual_seed(1)
    for n in (37, 8):  # 37: groups of four weight rows and a remainder, asymmetric; 8: symmetric
        qw = QuantizedWeight.quantize(torch.randn(n, k, generator=g), WeightFormat("int", 4, group, n == 8))
        packed = wq.Packed(qw, torch.device("cpu"))
        ref = qw.dequantize().double()
        for rows in (1, 2, 3, 4, 7, 16):  # up to Packed.gemv_rows on every path
            x = _wide_range_input(rows, k, g)
            want = x.double() @ ref.t()
            for isa in wq.available_isas():
                for digits in (True, False):
                    packed.digits = digits
                    y = packed.matmul(x, isa).double()
                    rel = float((y - want).abs().max() / want.abs().max())
                    assert rel < 1e-5, (group, k, n, rows, isa, digits, rel)
                    # per output, against the size of its own terms: no row loses precision
                    terms = x.double().abs() @ ref.abs().t()
                    assert float(((y - want).abs() / terms).max()) < 1e-5, (group, k, n, rows, isa, digits)


def test_digit_gemv_is_used_and_agrees_across_paths():
    """The digit path differs from the fp32-products path only in rounding, on every instruction set;
    it takes more rows than the fp32 GEMV before the tiled BLAS path."""
    _need_native()
    g = torch.Generator().manual_seed(2)
    qw = QuantizedWeight.quantize(torch.randn(64, 512, generator=g), WeightFormat("int", 4, 128))
    packed = wq.Packed(qw, torch.device("cpu"))
    x = torch.randn(1, 512, generator=g)
    outs = {}
    for isa in wq.available_isas():
        for digits in (True, False):
            packed.digits = digits
            outs[isa, digits] = packed.matmul(x, isa)
    first = next(iter(outs.values()))
    for key, y in outs.items():
        torch.testing.assert_close(y, first, rtol=1e-5, atol=1e-5, msg=str(key))
    simd = [isa for isa in wq.available_isas() if isa != "portable"]
    if simd:  # the two arithmetic paths really are different code: their roundings differ somewhere
        assert any(not torch.equal(outs[isa, True], outs[isa, False]) for isa in simd)
    for isa in wq.available_isas():
        packed.digits = True
        digit_rows = packed.gemv_rows(wq.isa_code(isa))
        packed.digits = False
        assert packed.gemv_rows(wq.isa_code(isa)) == 4
        assert digit_rows == (16 if isa == "avx512" and digit_rows != 4 else 4)
    # other groups (here 32) take the per-row digit kernels up to 8 rows with AVX-512 VNNI, then the fused GEMM
    g32 = wq.Packed(
        QuantizedWeight.quantize(torch.randn(8, 512, generator=g), WeightFormat("int", 4, 32, True)),
        torch.device("cpu"),
    )
    for isa in wq.available_isas():
        rows = g32.gemv_rows(wq.isa_code(isa))
        assert rows == (8 if isa == "avx512" and rows != 4 else 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_digit_gemv_propagates_nan_and_inf(bad):
    _need_native()
    qw = QuantizedWeight.quantize(torch.randn(16, 256), WeightFormat("int", 4, 128))
    packed = wq.Packed(qw, torch.device("cpu"))
    x = torch.randn(2, 256)
    x[0, 5] = bad
    want = x @ qw.dequantize().t()
    for isa in wq.available_isas():
        y = packed.matmul(x, isa)
        # the row that holds it is non-finite throughout, as the reference's (an Inf meets the
        # zero-point term as Inf - Inf, so it may read NaN where the reference reads Inf)
        assert not torch.isfinite(want[0]).any() and not torch.isfinite(y[0]).any(), isa
        torch.testing.assert_close(y[1], want[1], rtol=1e-5, atol=1e-5)


def test_digit_gemv_keeps_precision_for_tiny_activations():
    """Blocks far below fp32's normal range take the fp32-products path instead of losing their digits."""
    _need_native()
    qw = QuantizedWeight.quantize(torch.randn(8, 256), WeightFormat("int", 4, 64))
    packed = wq.Packed(qw, torch.device("cpu"))
    for magnitude in (1e-35, 1e-20, 1e20, 1e30):
        x = torch.randn(1, 256) * magnitude
        want = x.double() @ qw.dequantize().double().t()
        for isa in wq.available_isas():
            y = packed.matmul(x, isa).double()
            assert float((y - want).abs().max() / want.abs().max()) < 1e-5, (magnitude, isa)


@pytest.mark.parametrize("bias", [False, True])
def test_digit_gemm_for_small_batches_equals_dequantize_then_matmul(bias):
    """Up to Packed.gemv_rows rows (16 for g128 with AVX-512 VNNI: the register-tiled digit GEMM,
    its zero-point terms as one GEMM), with weight rows beyond the last group of four; past them
    the fused dequantize-GEMM and the tiled BLAS path."""
    _need_native()
    g = torch.Generator().manual_seed(3)
    for n, k in ((37, 576), (40, 300)):
        qw = QuantizedWeight.quantize(torch.randn(n, k, generator=g), WeightFormat("int", 4, 128))
        packed = wq.Packed(qw, torch.device("cpu"))
        b = torch.randn(n, generator=g) if bias else None
        ref = qw.dequantize().double()
        for rows in (5, 6, 16, 17, 33, 65):
            x = _wide_range_input(rows, k, g)
            want = x.double() @ ref.t() + (0 if b is None else b.double())
            for isa in wq.available_isas():
                y = packed.matmul(x, isa, bias=b).double()
                rel = float((y - want).abs().max() / want.abs().max())
                assert rel < 1e-5, (n, k, rows, isa, rel)


FUSED_FORMATS = [
    WeightFormat("int", 4, 128),
    WeightFormat("int", 4, 32, True),
    WeightFormat("int", 4, 96),  # groups that straddle the kernel's 1024-column weight blocks
    WeightFormat("int", 4, -1),
    WeightFormat("int", 8, -1, True),
    WeightFormat("int", 8, 64),
]


@pytest.mark.parametrize("fmt", FUSED_FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("half_scales", [True, False], ids=["fp16 scales", "fp32 scales"])
def test_fused_gemm_equals_dequantize_then_matmul(fmt, half_scales):
    """The fused dequantize-GEMM on every SIMD path: weight blocks past 96 rows and 1024 columns
    (ragged in both), tiles of fewer than six weight rows, activation panels of every width
    (1 to 4 vectors) and padding, with a bias; the same values as the tiled BLAS path."""
    _need_native()
    simd = [isa for isa in wq.available_isas() if isa != "portable"]
    if not simd:
        pytest.skip("the fused GEMM runs on the x86 SIMD paths only")
    g = torch.Generator().manual_seed(4)
    n, k = 100, 1100
    qw = QuantizedWeight.quantize(torch.randn(n, k, generator=g), fmt)
    if not half_scales:
        qw = QuantizedWeight(qw.packed, qw.scale.float(), qw.zero, qw.fmt, qw.shape)
    packed = wq.Packed(qw, torch.device("cpu"))
    bias = torch.randn(n, generator=g)
    ref = qw.dequantize().double()
    for rows in (5, 9, 17, 40, 64, 65, 130):
        x = _wide_range_input(rows, k, g)
        want = x.double() @ ref.t() + bias.double()
        terms = x.double().abs() @ ref.abs().t() + bias.double().abs()
        for isa in simd:
            packed.fused, packed.amx = 1, 0
            y = packed.matmul(x, isa, bias=bias).double()
            assert float(((y - want).abs() / terms).max()) < 1e-5, (fmt.describe(), rows, isa)
            packed.fused = 0
            tiled = packed.matmul(x, isa, bias=bias).double()
            torch.testing.assert_close(y, tiled, rtol=1e-5, atol=1e-5 * float(terms.max()))


def test_fused_gemm_takes_the_rows_between_the_gemv_and_blas_and_propagates_nan():
    _need_native()
    ext = wq.extension()
    assert ext.fused_rows(wq.isa_code("portable")) == 0
    for isa in wq.available_isas():
        if isa != "portable":
            assert ext.fused_rows(wq.isa_code(isa)) > wq.Packed(
                QuantizedWeight.quantize(torch.randn(8, 256), WeightFormat("int", 4, 128)), torch.device("cpu")
            ).gemv_rows(wq.isa_code(isa))
    qw = QuantizedWeight.quantize(torch.randn(16, 256), WeightFormat("int", 4, 128))
    packed = wq.Packed(qw, torch.device("cpu"))
    packed.fused, packed.amx = 1, 0
    x = torch.randn(20, 256)
    x[3, 7] = float("nan")
    want = x @ qw.dequantize().t()
    for isa in wq.available_isas():
        y = packed.matmul(x, isa)
        assert torch.isnan(y[3]).all(), isa
        keep = torch.arange(20) != 3
        torch.testing.assert_close(y[keep], want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fmt", [WeightFormat("int", 4, 128), WeightFormat("int", 4, 256, True)], ids=lambda f: f.describe()
)
def test_amx_digit_gemm_equals_dequantize_then_matmul(fmt):
    """The digit GEMM on AMX tiles (CPUs with AMX-INT8 whose kernel grants the tile state): rows past
    the GEMV kernels, weight rows off the 16-row tiles, a short last block, a bias; NaN rows fall
    back to the fused path; turned off, the other paths give the same values to fp32 rounding."""
    _need_native()
    ext = wq.extension()
    if not ext.amx_usable():
        pytest.skip("no AMX-INT8 here (or the kernel does not grant the tile state)")
    g = torch.Generator().manual_seed(5)
    n, k = 37, 1100
    qw = QuantizedWeight.quantize(torch.randn(n, k, generator=g), fmt)
    packed = wq.Packed(qw, torch.device("cpu"))
    bias = torch.randn(n, generator=g)
    ref = qw.dequantize().double()
    for rows in (17, 40, 100):
        x = _wide_range_input(rows, k, g)
        want = x.double() @ ref.t() + bias.double()
        terms = x.double().abs() @ ref.abs().t() + bias.double().abs()
        y = packed.matmul(x, "avx512", bias=bias).double()
        assert float(((y - want).abs() / terms).max()) < 1e-5, rows
        before = ext.allow_amx(False)
        try:
            other = packed.matmul(x, "avx512", bias=bias).double()
        finally:
            ext.allow_amx(before)
        assert not torch.equal(y, other)  # really two different kernels
        torch.testing.assert_close(y, other, rtol=1e-5, atol=1e-5 * float(terms.max()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the row blocks and weight blocks split across threads
    try:
        x = _wide_range_input(300, k, g)
        y = packed.matmul(x, "avx512").double()
        want = x.double() @ ref.t()
        assert float(((y - want).abs() / (x.double().abs() @ ref.abs().t())).max()) < 1e-5
    finally:
        torch.set_num_threads(before)
    x = torch.randn(20, k, generator=g)
    x[3, 7] = float("nan")
    y = packed.matmul(x, "avx512")
    assert torch.isnan(y[3]).all()
    keep = torch.arange(20) != 3
    torch.testing.assert_close(y[keep], (x[keep] @ qw.dequantize().t()), rtol=1e-5, atol=1e-4)
