"""Property tests of the numeric formats (pure functions, no models)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import WeightFormat, floating, integer, packing

settings.register_profile("lowbit", max_examples=60, deadline=None)
settings.load_profile("lowbit")

bits_st = st.integers(2, 8)


def _weights(seed: int, rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * scale


@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 10_000))
def test_pack_unpack_round_trips(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packing.packed_nbytes(n, bits)
    assert torch.equal(packing.unpack(packed, bits, n), codes)


def test_pack_4bit_puts_first_code_in_low_nibble():
    assert packing.pack(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]


def test_pack_3bit_uses_three_bytes_per_eight_codes():
    codes = torch.arange(8, dtype=torch.uint8)
    assert packing.pack(codes, 3).numel() == 3


@given(
    bits=bits_st,
    rows=st.integers(1, 6),
    cols=st.integers(1, 200),
    group=st.sampled_from([-1, 1, 7, 32, 64, 128]),
    symmetric=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_dequantize_is_within_half_a_step_inside_the_range(bits, rows, cols, group, symmetric, seed):
    w = _weights(seed, rows, cols)
    scale, zero = integer.minmax_params(w, bits, group, symmetric)
    codes = integer.quantize(w, scale, zero, bits, group)
    assert int(codes.max()) <= (1 << bits) - 1
    deq = integer.dequantize(codes, scale, zero, group)
    step = integer.expand_groups(scale, cols, group)
    z = integer.expand_groups(zero, cols, group)
    lo, hi = -z * step, ((1 << bits) - 1 - z) * step  # the representable range
    inside = (w >= lo - step / 2) & (w <= hi + step / 2)
    # min-max ranges leave only rounding slack outside: the zero point's rounding shifts the grid by up
    # to half a step, the scale's fp16 rounding by 2^-11 of the range (a 3-weight row can have 1 of 3 out)
    slack = step * (0.5 + (1 << bits) * 2.0**-11 + 1e-3)
    assert bool(((w >= lo - slack) & (w <= hi + slack)).all())
    assert bool(((deq - w).abs() <= step / 2 + 1e-5 * step)[inside].all())


@given(bits=bits_st, group=st.sampled_from([-1, 5, 32]), symmetric=st.booleans(), seed=st.integers(0, 1000))
def test_zero_is_exactly_representable(bits, group, symmetric, seed):
    w = _weights(seed, 4, 40) + 3.0  # all positive: zero lies outside the data range
    w[:, ::3] = 0.0
    scale, zero = integer.minmax_params(w, bits, group, symmetric)
    deq = integer.fake_quantize(w, scale, zero, bits, group)
    assert bool((deq[:, ::3] == 0).all())


@given(bits=bits_st, seed=st.integers(0, 1000), far=st.floats(1.5, 100.0))
def test_codes_stay_in_range_for_values_outside_it(bits, seed, far):
    w = _weights(seed, 3, 16)
    scale, zero = integer.minmax_params(w, bits, -1, False)
    codes = integer.quantize(w * far, scale, zero, bits, -1)
    assert int(codes.min()) >= 0 and int(codes.max()) <= (1 << bits) - 1


def test_ragged_last_group_has_its_own_range():
    w = torch.ones(2, 172) * 0.01
    w[:, 160:] = 5.0  # the ragged last group of 44 (128 + 44) holds large values
    scale, zero = integer.minmax_params(w, 4, 128, False)
    assert scale.shape == (2, 2)
    deq = integer.fake_quantize(w, scale, zero, 4, 128)
    assert (deq[:, :128] - w[:, :128]).abs().max() <= scale[0, 0] / 2


def test_per_tensor_has_one_scale():
    w = _weights(0, 8, 16)
    scale, zero = integer.minmax_params(w, 8, None, True)
    assert scale.shape == (1, 1)
    assert (integer.fake_quantize(w, scale, zero, 8, None) - w).abs().max() <= scale.item() / 2


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_group_size_must_be_positive_or_minus_one(bad):
    with pytest.raises(ValueError, match="group_size"):
        WeightFormat("int", 4, bad)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(ValueError, match="2 to 8"):
        WeightFormat("int", bits, 128)


def test_nf4_levels_are_the_qlora_table_and_round_to_nearest():
    levels = floating.codebook("nf4")
    assert levels.numel() == 16 and levels[0] == -1 and levels[7] == 0 and levels[15] == 1
    x = torch.tensor([-0.99, 0.0, 0.08, 0.5626, 0.9])
    codes = floating.quantize_codebook(x, levels)
    ref = (x[:, None] - levels[None]).abs().argmin(-1)
    assert torch.equal(codes.long(), ref)


def test_fp4_e2m1_values_and_bit_layout():
    book = floating.codebook("fp4")
    assert book[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert book[0b1111].item() == -6.0


@pytest.mark.parametrize("kind", ["nf4", "fp4", "fp8_e4m3", "fp8_e5m2"])
@given(seed=st.integers(0, 1000), group=st.sampled_from([-1, 16, 50]))
def test_block_absmax_formats_keep_the_block_maximum(kind, seed, group):
    w = _weights(seed, 3, 100)
    scale = floating.absmax_scale(w, kind, group)
    deq = floating.dequantize(floating.quantize(w, scale, kind, group), scale, kind, group)
    blocks = integer.to_groups(w, group)
    dblocks = integer.to_groups(deq, group)
    idx = blocks.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(dblocks.gather(-1, idx), blocks.gather(-1, idx), rtol=0.07, atol=1e-6)


def test_fp8_e4m3_relative_error_is_small():
    w = _weights(1, 16, 64)
    scale = floating.absmax_scale(w, "fp8_e4m3", -1)
    deq = floating.dequantize(floating.quantize(w, scale, "fp8_e4m3", -1), scale, "fp8_e4m3", -1)
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < 0.04
