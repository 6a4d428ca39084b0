"""Tests for qcompile.numerics.specs: int4 packing layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.numerics.specs import pack_int4, unpack_int4


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
    expected = [((a & 0xF) | ((b & 0xF) << 4)) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
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
