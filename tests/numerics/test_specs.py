"""Tests for qcompile.numerics.specs: int4 packing layout, QuantSpec, quantize/dequantize."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.numerics.specs import (
    SCALE_EPS,
    QuantSpec,
    choose_qparams,
    compute_qparams,
    dequantize,
    dynamic_per_token_qparams,
    expand_qparam,
    fake_quantize,
    pack_int4,
    quantize,
    unpack_int4,
    weight_spec,
)


def test_pack_int4_layout_is_low_nibble_first():
    # The Triton kernels rely on this exact layout: element 2i low, 2i+1 high.
    x = torch.tensor([[1, 2, -1, -8, 7, 0]], dtype=torch.int8)
    p = pack_int4(x)
    assert p.dtype == torch.uint8 and p.shape == (1, 3)
    assert p.tolist() == [[0x21, 0x8F, 0x07]]


def test_pack_int4_every_pair():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    lo = vals.repeat_interleave(16)
    hi = vals.repeat(16)
    x = torch.stack((lo, hi), dim=-1).reshape(1, -1)  # [1, 512]: every (lo, hi) pair
    p = pack_int4(x)
    pairs = zip(lo.tolist(), hi.tolist(), strict=True)
    expected = [(a & 0xF) | ((b & 0xF) << 4) for a, b in pairs]
    assert p.reshape(-1).tolist() == expected
    assert torch.equal(unpack_int4(p), x)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    half_k=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(lead, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 8, (*lead, 2 * half_k), generator=g, dtype=torch.int8)
    p = pack_int4(x)
    assert p.shape == (*lead, half_k)
    assert torch.equal(unpack_int4(p), x)


def test_pack_int4_rejects_odd_k():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bad", [8, -9, 100])
def test_pack_int4_rejects_out_of_range(bad):
    x = torch.zeros(4, dtype=torch.int8)
    x[1] = bad
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(x)


def test_pack_int4_rejects_wrong_dtype():
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


# ---------------------------------------------------------------------------------------
# QuantSpec
# ---------------------------------------------------------------------------------------


def test_spec_ranges():
    assert (QuantSpec().qmin, QuantSpec().qmax) == (-128, 127)
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)


def test_spec_validation():
    with pytest.raises(ValueError, match="per_token"):  # the error lists the known names
        QuantSpec(granularity="per_row")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="per_group")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="per_channel", group_size=64)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=16)


def test_weight_spec_defaults():
    assert weight_spec(8) == QuantSpec(bits=8, granularity="per_channel", axis=0)
    assert weight_spec(4) == QuantSpec(bits=4, granularity="per_group", group_size=128)
    assert weight_spec(4, group_size=32).group_size == 32


# ---------------------------------------------------------------------------------------
# quantize / dequantize properties
# ---------------------------------------------------------------------------------------

SPECS = [
    QuantSpec(),
    QuantSpec(symmetric=False),
    QuantSpec(granularity="per_channel", axis=0),
    QuantSpec(granularity="per_channel", axis=-1, symmetric=False),
    QuantSpec(granularity="per_token"),
    QuantSpec(granularity="per_token", symmetric=False, bits=4),
    QuantSpec(bits=4, granularity="per_group", group_size=8),
    QuantSpec(bits=4, granularity="per_group", group_size=4, symmetric=False),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    spec=st.sampled_from(SPECS),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    log_mag=st.floats(-6, 6),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_is_at_most_half_a_step(spec, rows, groups, log_mag, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 8 * groups, generator=g) + offset) * 10.0**log_mag
    scale, zp = choose_qparams(x, spec)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == torch.int8
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    if spec.symmetric:
        assert (zp == 0).all()
        assert int(q.min()) >= -spec.qmax  # observed values never need the extra -2**(b-1)
    deq = dequantize(q, scale, zp, spec)
    step = expand_qparam(scale, x.shape, spec)
    assert ((x - deq).abs() <= step * (0.5 + 1e-5)).all()
    # 0.0 is exactly representable whatever the range.
    zeros = torch.zeros_like(x)
    assert torch.equal(fake_quantize(zeros, scale, zp, spec), zeros)


def test_rounding_is_half_to_even():
    spec = QuantSpec()
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 126.5])
    q = quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), spec)
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 0, 126]


def test_out_of_range_values_clamp_to_full_signed_range():
    spec = QuantSpec()
    scale, zp = compute_qparams(-1.0, 1.0, spec)
    assert scale.item() == pytest.approx(1.0 / 127)
    q = quantize(torch.tensor([-1.0, 1.0, -5.0, 5.0]), scale, zp, spec)
    assert q.tolist() == [-127, 127, -128, 127]


def test_asymmetric_range_is_stretched_to_include_zero():
    spec = QuantSpec(symmetric=False)
    scale, zp = compute_qparams(2.0, 5.0, spec)  # all positive: becomes [0, 5]
    assert zp.item() == -128
    assert scale.item() == pytest.approx(5.0 / 255)
    x = torch.tensor([0.0, 2.0, 5.0])
    assert quantize(x, scale, zp, spec).tolist() == [-128, -128 + 102, 127]


def test_all_zero_tensor_gets_a_nonzero_scale():
    for spec in (QuantSpec(), QuantSpec(symmetric=False)):
        scale, zp = choose_qparams(torch.zeros(3, 4), spec)
        assert scale.item() == SCALE_EPS
        assert (quantize(torch.zeros(3, 4), scale, zp, spec) == zp).all()


def test_compute_qparams_rejects_bad_ranges():
    with pytest.raises(ValueError, match="finite"):
        compute_qparams(float("-inf"), 1.0, QuantSpec())
    with pytest.raises(ValueError, match="min > max"):
        compute_qparams(1.0, -1.0, QuantSpec())


def test_qparam_shapes_per_granularity():
    x = torch.randn(2, 3, 16)
    assert choose_qparams(x, QuantSpec())[0].shape == ()
    assert choose_qparams(x, QuantSpec(granularity="per_channel", axis=1))[0].shape == (3,)
    assert choose_qparams(x, QuantSpec(granularity="per_token"))[0].shape == (2, 3)
    spec = QuantSpec(bits=4, granularity="per_group", group_size=4)
    assert choose_qparams(x, spec)[0].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="does not divide"):
        choose_qparams(torch.randn(2, 10), spec)
    with pytest.raises(ValueError, match="per_token scale must have shape"):
        quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32),
                 QuantSpec(granularity="per_token"))


def test_per_group_scales_refer_to_consecutive_columns():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=2)
    w = torch.tensor([[1.0, -7.0, 0.5, 0.25]])
    scale, _ = choose_qparams(w, spec)
    assert torch.equal(scale, torch.tensor([[1.0, 0.5 / 7]]))  # float32 0.5 / 7


def test_dynamic_per_token_is_row_absmax():
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    scale, zp = dynamic_per_token_qparams(x)
    assert scale.shape == (2, 5) and (zp == 0).all()
    expected = x.float().abs().amax(dim=-1) / 127
    assert torch.equal(scale, expected)
    with pytest.raises(ValueError, match="per_token"):
        dynamic_per_token_qparams(x, QuantSpec())


def test_fake_quantize_keeps_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    spec = QuantSpec(granularity="per_token")
    y = fake_quantize(x, *dynamic_per_token_qparams(x, spec), spec)
    assert y.dtype == torch.bfloat16
    assert (y.float() - x.float()).abs().max() < 0.05 * x.float().abs().max()
