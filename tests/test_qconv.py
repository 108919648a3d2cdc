"""Conv weights in QuantizedWeight (matrix view [out, in/groups*k...]) and the packed QConv module."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import QuantizedWeight, WeightFormat
from lowbit.formats import floating, integer
from lowbit.nn import QConv

# 16x8x3x3: K = 72, so g32 leaves a ragged last group of 8 and g40 one of 32
FORMATS = [
    WeightFormat("int", bits, group, sym)
    for bits in (2, 3, 4, 8)
    for group in (-1, 32, 40)
    for sym in (False, True)
]


def _bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _reference_dequant(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Integer quantize-then-dequantize of the matrix view, reshaped back: what a conv must store."""
    m = w.reshape(w.shape[0], -1).float()
    scale, zero = integer.minmax_params(m, fmt.bits, fmt.group_size, fmt.symmetric)
    return integer.fake_quantize(m, scale, zero, fmt.bits, fmt.group_size).reshape(w.shape)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_conv_weight_round_trips_in_its_matrix_view(fmt):
    w = torch.randn(16, 8, 3, 3)
    qw = QuantizedWeight.quantize(w, fmt)
    assert qw.shape == (16, 8, 3, 3) and qw.matrix_shape == (16, 72) and qw.numel == w.numel()
    assert qw.codes().shape == (16, 72)
    assert qw.scale.shape == (16, integer.num_groups(72, fmt.group_size))
    assert torch.equal(qw.dequantize(), _reference_dequant(w, fmt))
    # the conv is stored exactly as the linear of its matrix view
    flat = QuantizedWeight.quantize(w.reshape(16, -1), fmt)
    assert torch.equal(qw.packed, flat.packed) and torch.equal(qw.scale, flat.scale)
    back = QuantizedWeight.from_tensors(qw.to_tensors("conv"), "conv", fmt, qw.shape)
    assert back.shape == qw.shape
    assert torch.equal(back.codes(), qw.codes()) and torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("kind", ["nf4", "fp4", "fp8_e4m3"])
def test_float_formats_store_conv_weights_too(kind):
    w = torch.randn(8, 4, 5)  # a Conv1d weight, K = 20
    fmt = WeightFormat(kind, group_size=16)
    qw = QuantizedWeight.quantize(w, fmt)
    m = w.reshape(8, -1)
    scale = floating.absmax_scale(m, kind, 16)
    ref = floating.dequantize(floating.quantize(m, scale, kind, 16), qw.scale, kind, 16)
    assert torch.equal(qw.dequantize(), ref.reshape(w.shape))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_storage_bits_are_the_bytes_written(fmt):
    qw = QuantizedWeight.quantize(torch.randn(16, 8, 3, 3), fmt)
    assert qw.storage_bits() == _bytes(qw.to_tensors("conv")) * 8


def test_a_4bit_conv_stores_4bit_codes():
    qw = QuantizedWeight.quantize(torch.randn(16, 16, 3, 3), WeightFormat("int", 4, -1, symmetric=False))
    tensors = qw.to_tensors("conv")
    assert tensors["conv.qweight"].dtype == torch.uint8 and tensors["conv.qweight"].numel() == 16 * 144 // 2
    # codes + one fp16 scale and one 4-bit zero per output channel
    assert qw.bits_per_weight == pytest.approx(4 + (16 + 4) / 144)


def test_given_scales_are_those_of_the_matrix_view():
    w = torch.randn(6, 3, 2, 2)
    fmt = WeightFormat("int", 4, 5, symmetric=False)  # K = 12: groups 5, 5, 2
    scale, zero = integer.minmax_params(w.reshape(6, -1), 4, 5, False)
    qw = QuantizedWeight.quantize(w, fmt, scale, zero)
    assert torch.equal(qw.dequantize(), _reference_dequant(w, fmt))


def test_from_codes_keeps_the_original_shape():
    w = torch.randn(4, 2, 3)
    qw = QuantizedWeight.quantize(w, WeightFormat("int", 3, -1))
    again = QuantizedWeight.from_codes(qw.codes(), qw.scale, qw.zero, qw.fmt, shape=(4, 2, 3))
    assert again.shape == (4, 2, 3) and torch.equal(again.dequantize(), qw.dequantize())
    assert QuantizedWeight.from_codes(qw.codes(), qw.scale, qw.zero, qw.fmt).shape == (4, 6)
    with pytest.raises(ValueError, match="matrix view"):
        QuantizedWeight.from_codes(qw.codes(), qw.scale, qw.zero, qw.fmt, shape=(4, 2, 2))


def test_weights_below_two_dimensions_are_refused():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        QuantizedWeight.quantize(torch.randn(8), WeightFormat())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        QuantizedWeight.quantize(torch.tensor(1.0), WeightFormat())


def test_from_tensors_checks_the_bytes_against_the_conv_shape():
    qw = QuantizedWeight.quantize(torch.randn(8, 4, 3, 3), WeightFormat("int", 4, -1))
    with pytest.raises(ValueError, match="uint8 were expected"):
        QuantizedWeight.from_tensors(qw.to_tensors("c"), "c", qw.fmt, (8, 4, 3, 4))


CONV2D = [
    dict(),
    dict(stride=2),
    dict(padding=1),
    dict(padding=(2, 0), stride=(1, 2)),
    dict(dilation=2, padding=2),
    dict(padding="same"),
    dict(groups=2),
    dict(groups=8),  # depthwise
]


def _check_forward(conv: nn.Module, x: torch.Tensor, fmt: WeightFormat, fn) -> QConv:
    q = QConv.from_conv(conv, fmt)
    qw = q.quantized_weight
    assert qw.shape == tuple(conv.weight.shape)
    ref = fn(x, qw.dequantize(), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.weight, qw.dequantize(), rtol=0, atol=0)
    return q


@pytest.mark.parametrize("kw", CONV2D, ids=str)
def test_qconv2d_forward_is_conv2d_with_the_dequantized_weight(kw):
    conv = nn.Conv2d(8, 8, 3, **kw)
    _check_forward(conv, torch.randn(2, 8, 9, 9), WeightFormat("int", 4, 16, symmetric=False), F.conv2d)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=3), dict(groups=3)], ids=str)
def test_qconv1d_forward_is_conv1d_with_the_dequantized_weight(kw):
    conv = nn.Conv1d(6, 9, 4, bias=False, **kw)
    _check_forward(conv, torch.randn(3, 6, 20), WeightFormat("int", 3, -1, symmetric=True), F.conv1d)


def test_dequantized_weight_is_cached_per_device_and_dtype(monkeypatch):
    q = QConv.from_conv(nn.Conv2d(4, 4, 3), WeightFormat("int", 4, -1))
    calls = []
    original = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    x = torch.randn(1, 4, 6, 6)
    q(x), q(x)
    assert len(calls) == 1
    q(x.double())
    assert len(calls) == 2
    q.float()  # moving or casting the module drops the cache
    q(x)
    assert len(calls) == 3


def test_a_weight_cached_under_inference_mode_still_trains():
    q = QConv.from_conv(nn.Conv1d(3, 5, 3), WeightFormat("int", 4, -1))
    x = torch.randn(2, 3, 8)
    with torch.inference_mode():
        q(x)
    x.requires_grad_(True)
    q(x).sum().backward()
    assert x.grad is not None and q.bias.grad is not None


@pytest.mark.parametrize("symmetric", [False, True])
def test_state_dict_round_trips_through_safetensors(tmp_path, symmetric):
    from safetensors.torch import load_file, save_file

    fmt = WeightFormat("int", 4, 32, symmetric=symmetric)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    q = QConv.from_conv(conv, fmt)
    state = q.state_dict()
    assert set(state) == {"qweight", "scales", "bias"} | (set() if symmetric else {"zeros"})
    assert state["qweight"].numel() == 16 * 72 // 2  # 4-bit codes as they are
    save_file(state, str(tmp_path / "conv.safetensors"))
    x = torch.randn(2, 8, 7, 7)
    fresh = QConv.from_conv(nn.Conv2d(8, 16, 3, padding=1), fmt)
    fresh(x)  # fill its cache: loading must drop it
    fresh.load_state_dict(load_file(str(tmp_path / "conv.safetensors")))
    assert torch.equal(fresh(x), q(x))


def test_qconv_refuses_non_zero_padding_modes():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        QConv.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), WeightFormat())


def test_qconv_refuses_a_weight_of_the_wrong_rank():
    qw = QuantizedWeight.quantize(torch.randn(4, 4, 3, 3), WeightFormat())
    with pytest.raises(ValueError, match="dims=2"):
        QConv(qw, None, dims=1)


def test_repr_reports_the_stored_bits_per_weight():
    q = QConv.from_conv(nn.Conv2d(16, 16, 3), WeightFormat("int", 4, -1, symmetric=False))
    assert f"bits_per_weight={4 + 20 / 144:.3f}" in repr(q) and "int4 per-channel asym" in repr(q)
