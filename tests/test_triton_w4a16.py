"""lowbit's Triton W4A16 kernel against dequantize-then-matmul in fp32.

The layout and fallback tests run everywhere (PyTorch only). The kernel tests
need a CUDA GPU (Ampere or newer) with triton; the interpreter test needs triton
and runs the kernel on CPU tensors (``TRITON_INTERPRET=1``) where there is no GPU.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowbit import QLinear, WeightFormat
from lowbit.kernels import triton_w4a16 as tw
from lowbit.quantized_weight import QuantizedWeight

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = tw.available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (Ampere or newer) and triton")

# (format, N, K, fp32 scales): ragged last groups, K % 8 != 0 (a partial last word), N off the tiles
CASES = {
    "g128-asym-ragged": (WeightFormat("int", 4, 128, False), 256, 4096 + 64, False),
    "per-channel-sym-partial-word": (WeightFormat("int", 4, -1, True), 200, 1002, False),
    "g32-sym-fp32-scales": (WeightFormat("int", 4, 32, True), 96, 512, True),
    "g64-asym-fp32-scales": (WeightFormat("int", 4, 64, False), 72, 200, True),
    "per-tensor-asym": (WeightFormat("int", 4, None, False), 48, 136, False),
}
# relative error of the result (Frobenius) against the fp32 reference: the output's rounding
# to x's dtype, and on tensor cores the weight's too
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}


def _weight(case: str) -> QuantizedWeight:
    fmt, n, k, fp32_scales = CASES[case]
    qw = QuantizedWeight.quantize(torch.randn(n, k), fmt)
    return dataclasses.replace(qw, scale=qw.scale.float()) if fp32_scales else qw


def _rel_error(y: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight, bias=None) -> float:
    want = x.double() @ qw.dequantize().double().t().to(x.device)
    if bias is not None:
        want = want + bias.double()
    return float((y.double() - want).norm() / want.norm())


@pytest.fixture(autouse=True)
def _no_autotuning(monkeypatch):
    # one configuration per bucket: the tests check results, and each tuning compiles every candidate
    monkeypatch.setenv("LOWBIT_TRITON_AUTOTUNE", "0")


@pytest.mark.parametrize("case", CASES)
def test_gpu_layout_dequantizes_to_the_stored_weight(case):
    qw = _weight(case)
    packed = tw.Packed(qw, torch.device("cpu"))
    n, k = qw.matrix_shape
    assert packed.qweight.shape == (-(-k // 8), n) and packed.qweight.dtype == torch.int32
    assert torch.equal(packed.dequantize(), qw.dequantize())


def test_supported_weights():
    def qw(fmt, k=64):
        return QuantizedWeight.quantize(torch.randn(8, k), fmt)

    assert tw.supported(qw(WeightFormat("int", 4, 128)))
    assert tw.supported(qw(WeightFormat("int", 4, -1), k=34))  # one group: any even K
    assert not tw.supported(qw(WeightFormat("int", 4, 12)))  # a word would straddle two groups
    assert not tw.supported(qw(WeightFormat("int", 4, -1), k=33))  # rows not whole bytes
    assert not tw.supported(qw(WeightFormat("int", 8, -1)))
    assert not tw.supported(qw(WeightFormat("nf4", 4, 64)))
    bf16_scales = qw(WeightFormat("int", 4, 32))
    assert tw.supported(dataclasses.replace(bf16_scales, scale=bf16_scales.scale.bfloat16()))  # a model.to(bf16)


def test_rows_fall_into_the_autotuning_buckets():
    buckets = {1: 1, 2: 16, 16: 16, 17: 32, 33: 64, 64: 64, 65: 128, 128: 128, 129: 256, 4096: 256}
    assert {m: tw.m_bucket(m) for m in buckets} == buckets
    assert set(tw.CANDIDATES) == set(buckets.values())


def test_kernel_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    packed = tw.Packed(_weight("g32-sym-fp32-scales"), torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        packed.matmul(torch.randn(2, 512))


def test_lowbit_runs_without_triton():
    """CI has no triton: importing lowbit and running a layer on CPU must not need it."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any import of triton now fails
        import torch
        from lowbit import QLinear, WeightFormat
        from lowbit.kernels import triton_w4a16
        q = QLinear.from_linear(torch.nn.Linear(64, 16), WeightFormat("int", 4, 32))
        x = torch.randn(2, 64)
        torch.testing.assert_close(q(x), x @ q.weight.t() + q.bias, rtol=1e-5, atol=1e-5)
        assert not triton_w4a16.available()
        assert q.select_kernel(torch.device("cpu")) in ("native", "dequant")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


INTERPRETER_SCRIPT = """
import dataclasses, sys
import torch, triton, triton.language as tl
from lowbit import WeightFormat
from lowbit.kernels import triton_w4a16 as tw
from lowbit.quantized_weight import QuantizedWeight

@triton.jit
def _probe(y_ptr, n):
    for i in range(0, n, 1):
        tl.store(y_ptr + i, i)

try:  # some triton / numpy pairs cannot interpret a runtime loop bound (numpy 2.4 with triton 3.6)
    _probe[(1,)](torch.zeros(2, dtype=torch.int32), 2)
except Exception as e:
    print(f"SKIP the Triton interpreter cannot run here (triton {triton.__version__}): {e}")
    sys.exit(0)

torch.manual_seed(0)
C = tw.Config
runs = [  # (format, N, K, M, x dtype, config, bias, fp32 scales)
    (WeightFormat("int", 4, 64, False), 40, 196, 1, torch.float16, C(1, 32, 16, split_k=1), True, False),
    (WeightFormat("int", 4, 64, False), 40, 196, 1, torch.float32, C(1, 32, 4, split_k=3), True, True),
    (WeightFormat("int", 4, -1, True), 40, 198, 1, torch.bfloat16, C(1, 16, 4, split_k=2), False, False),
    (WeightFormat("int", 4, 32, True), 24, 200, 3, torch.float16, C(16, 16, 16, split_k=1), True, False),
    (WeightFormat("int", 4, 128, False), 40, 392, 20, torch.float32, C(32, 16, 16, split_k=2), True, True),
    (WeightFormat("int", 4, 96, False), 24, 200, 70, torch.float16, C(64, 16, 16, split_k=0), False, False),
]
for fmt, n, k, m, dtype, cfg, with_bias, fp32 in runs:
    qw = QuantizedWeight.quantize(torch.randn(n, k), fmt)
    qw = dataclasses.replace(qw, scale=qw.scale.float()) if fp32 else qw
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if with_bias else None
    y = tw.Packed(qw, torch.device("cpu")).matmul(x, bias, cfg)
    want = x.double() @ qw.dequantize().double().t() + (0 if bias is None else bias.double())
    rel = float((y.double() - want).norm() / want.norm())
    limit = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-6}[dtype]
    assert y.dtype == dtype and y.shape == (m, n) and rel < limit, (fmt.describe(), m, dtype, cfg, rel)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernel in the tests below")
def test_interpreter_runs_every_kernel_path_on_cpu():
    """GEMV and tensor-core paths, split-K on and off, ragged groups and words, on CPU tensors.
    (bf16 runs the GEMV path only: the interpreter's bf16 tl.dot multiplies raw bits.)"""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout[5:].strip())
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# every case in fp16, bf16 and fp32 activations on one each (every combination compiles its own kernel)
DTYPE_CASES = [(case, torch.float16) for case in CASES] + [
    ("g128-asym-ragged", torch.bfloat16),
    ("g32-sym-fp32-scales", torch.float32),
]


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("case,dtype", DTYPE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_equals_dequantize_then_matmul(case, dtype, m):
    qw = _weight(case)
    packed = tw.Packed(qw, torch.device("cuda"))
    n, k = qw.matrix_shape
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda") if m % 2 else None
    y = packed.matmul(x, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel_error(y, x, qw, bias) < TOLERANCE[dtype]


def _decode_like_weight() -> QuantizedWeight:
    """g128 asym, K and N multiples of 128 like the benchmark's layers: Triton compiles a kernel per
    block sizes and divisibility of its integer arguments, so the benchmark then reuses these."""
    return QuantizedWeight.quantize(torch.randn(512, 4096), WeightFormat("int", 4, 128))


@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 128])
def test_every_autotuning_candidate_is_correct(m):
    """Whichever configuration the tuner keeps, split-K on and off, the result is the same."""
    qw = _decode_like_weight()
    packed = tw.Packed(qw, torch.device("cuda"))
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    for cfg in tw.CANDIDATES[tw.m_bucket(m)]:
        for split in (1, 0):
            y = packed.matmul(x, config=dataclasses.replace(cfg, split_k=split))
            assert _rel_error(y, x, qw) < TOLERANCE[torch.float16], (str(cfg), split)


@needs_gpu
def test_autotuned_configuration_is_kept_and_correct(monkeypatch):
    monkeypatch.delenv("LOWBIT_TRITON_AUTOTUNE")
    qw = _decode_like_weight()
    packed = tw.Packed(qw, torch.device("cuda"))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    before = len(tw._TUNED)
    y = packed.matmul(x)
    assert len(tw._TUNED) == before + 1
    assert _rel_error(y, x, qw) < TOLERANCE[torch.float16]
    assert packed.config_for(x).split_k > 0  # the tuned choice, not the automatic split


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_qlinear_auto_picks_the_triton_kernel_on_cuda(dtype):
    lin = torch.nn.Linear(4096 + 64, 192)
    q = QLinear.from_linear(lin, WeightFormat("int", 4, 128))
    assert q.select_kernel(torch.device("cpu")) in ("native", "dequant")  # CPU unchanged
    q = q.to("cuda", dtype)
    assert q.select_kernel(torch.device("cuda")) == "triton_w4a16"
    for shape in [(1, 4160), (3, 5, 4160), (128, 4160)]:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 192)
        assert _rel_error(y.reshape(-1, 192), x.reshape(-1, 4160), q.quantized_weight, q.bias) < TOLERANCE[dtype]


@needs_gpu
def test_act_order_layer_gathers_its_input_before_the_kernel():
    qw = QuantizedWeight.quantize(torch.randn(64, 512), WeightFormat("int", 4, 128))
    perm = torch.randperm(512)
    q = QLinear(qw, torch.randn(64), in_perm=perm).to("cuda", torch.float16)
    assert q.select_kernel(torch.device("cuda")) == "triton_w4a16"
    for rows in (1, 40):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
        want = x.double() @ q.weight.double().t() + q.bias.double()  # weight in the input's channel order
        assert float((q(x).double() - want).norm() / want.norm()) < TOLERANCE[torch.float16]


@needs_gpu
def test_gradients_reach_the_input_through_the_kernel():
    q = QLinear.from_linear(torch.nn.Linear(256, 64), WeightFormat("int", 4, 64)).to("cuda")
    for rows in (1, 40):
        x = torch.randn(rows, 256, device="cuda", requires_grad=True)
        q(x).square().sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        (x_ref @ q.weight.t() + q.bias).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_a_group_the_kernel_cannot_run_falls_back_to_dequantize():
    q = QLinear.from_linear(torch.nn.Linear(96, 32), WeightFormat("int", 4, 12)).to("cuda")
    assert q.select_kernel(torch.device("cuda")) == "dequant"
    x = torch.randn(2, 96, device="cuda")
    torch.testing.assert_close(q(x), x @ q.weight.t() + q.bias, rtol=1e-5, atol=1e-5)
