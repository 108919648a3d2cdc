"""Every QLinear kernel path against the dequantize-then-matmul reference."""

import pytest
import torch

from lowbit import QLinear, WeightFormat
from lowbit.kernels import avx512, cpu


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


@pytest.mark.parametrize("fmt", [*INT4_FORMATS, WeightFormat("int", 4, 96)], ids=lambda f: f.describe())
@pytest.mark.parametrize("n", [64, 40])
def test_int4_avx512_kernel_matches_reference(fmt, n):
    _need_avx512()
    lin = torch.nn.Linear(288, n)  # 288 = 2*128 + 32: a ragged last group for g128
    q = QLinear.from_linear(lin, fmt)
    for shape in [(1, 288), (3, 288), (2, 4, 288)]:
        x = torch.randn(shape)
        assert q.select_kernel(x.device, x.numel() // 288) == "int4_avx512"
        torch.testing.assert_close(q(x), _reference(q, x), rtol=2e-2, atol=2e-2)


def test_avx512_fp32_path_is_exact_to_fp32_rounding():
    _need_avx512()
    q = QLinear.from_linear(torch.nn.Linear(512, 48), WeightFormat("int", 4, 128))
    x = torch.randn(5, 512)
    y = avx512.int4_gemv(x, q.quantized_weight, q.quantized_weight.zero, use_bf16=False)
    torch.testing.assert_close(y, x @ q.weight.t(), rtol=1e-5, atol=1e-5)


def test_large_batches_switch_from_avx512_to_the_aten_kernel():
    _need_avx512()
    q = QLinear.from_linear(torch.nn.Linear(256, 64), WeightFormat("int", 4, 128))
    cpu_dev = torch.device("cpu")
    assert q.select_kernel(cpu_dev, rows=8) == "int4_avx512"
    assert q.select_kernel(cpu_dev, rows=9) == "int4_cpu"
    x = torch.randn(64, 256)
    torch.testing.assert_close(q(x), _reference(q, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_cpu_kernel_matches_reference(symmetric):
    _, q = _pair(WeightFormat("int", 8, -1, symmetric), k=208, n=40)
    assert q.select_kernel(torch.device("cpu")) == "int8_cpu"
    x = torch.randn(4, 7, 208)
    torch.testing.assert_close(q(x), _reference(q, x), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize(
    "fmt,k,n",
    [
        (WeightFormat("int", 4, 128), 172, 64),  # K not a multiple of 32
        (WeightFormat("int", 4, 48), 192, 40),  # group not a multiple of 32, N not of 16
        (WeightFormat("int", 3, 32), 256, 64),
        (WeightFormat("int", 2, 16), 96, 32),
        (WeightFormat("int", 8, 64), 256, 64),  # grouped 8-bit has no packed CPU kernel
        (WeightFormat("int", 8, -1), 200, 64),  # the int8 kernel needs K % 16 == 0
        (WeightFormat("nf4", 4, 64), 256, 64),
        (WeightFormat("fp4", 4, 32), 64, 32),
        (WeightFormat("fp8_e4m3", 8, -1), 64, 32),
    ],
    ids=lambda v: v.describe() if isinstance(v, WeightFormat) else str(v),
)
def test_unsupported_shapes_and_formats_fall_back_to_dequantize(fmt, k, n):
    lin, q = _pair(fmt, k, n)
    assert q.select_kernel(torch.device("cpu")) == "dequant"
    x = torch.randn(5, k)
    torch.testing.assert_close(q(x), _reference(q, x))
    # and the reference itself is close to the float layer
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < {2: 0.8, 3: 0.3}.get(fmt.bits, 0.15)


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
