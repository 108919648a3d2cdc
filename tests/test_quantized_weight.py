import pytest
import torch

from lowbit import QuantizedWeight, WeightFormat


def test_storage_accounting_counts_codes_scales_and_zeros_exactly():
    w = torch.randn(64, 256)
    qw = QuantizedWeight.quantize(w, WeightFormat("int", 4, 128, symmetric=False))
    # 64*256 codes at 4 bits, 64*2 fp16 scales, 64*2 zeros at 4 bits
    assert qw.storage_bits() == 64 * 256 * 4 + 128 * 16 + 128 * 4
    assert qw.bits_per_weight == pytest.approx(4 + 20 / 128)


def test_symmetric_weights_store_no_zero_points():
    qw = QuantizedWeight.quantize(torch.randn(16, 64), WeightFormat("int", 3, 32, symmetric=True))
    assert qw.zero is None
    assert qw.storage_bits() == 16 * 64 * 3 + 16 * 2 * 16


def test_scales_fall_back_to_fp32_when_fp16_cannot_hold_them():
    w = torch.randn(4, 32) * 1e-7
    qw = QuantizedWeight.quantize(w, WeightFormat("int", 4, -1))
    assert qw.scale.dtype == torch.float32
    assert (qw.dequantize() - w).abs().max() <= qw.scale.float().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        QuantizedWeight.quantize(w, WeightFormat())


def test_tensors_round_trip():
    qw = QuantizedWeight.quantize(torch.randn(10, 172), WeightFormat("int", 3, 64))
    back = QuantizedWeight.from_tensors(qw.to_tensors("layer"), "layer", qw.fmt, qw.shape)
    assert torch.equal(back.dequantize(), qw.dequantize())
