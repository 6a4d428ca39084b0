"""quantize_int4_groups' Triton kernel vs its definition, the op's torch body
(a4_ops._int4_groups_body): v and s bit for bit, in one pass and in two, and the structure
of v (a group's values are an int4 q times the group's multiplier m in [1, 15]).

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py), so rows stay
short: K <= 256, M <= 8.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.lowering.a4_ops import _int4_groups_body
from qcompile.lowering.kernels.quantize import (
    _ONE_PASS_MAX_K,
    SCALE_EPS,
    int4_groups_block,
    quantize_int4_groups_triton,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_fast = settings(max_examples=10, deadline=None)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _definition(x: torch.Tensor, group: int, clip: float):
    """The op's body on x [..., K] as rows, its scalars 0-d float32 tensors (as
    ops._elementwise passes them): (v int8 [..., K], s float32 [...])."""
    k = x.shape[-1]
    v, s = _int4_groups_body(x.reshape(-1, k), _f32(7.0), _f32(15.0), _f32(SCALE_EPS),
                             _f32(clip), group=group)
    return v.reshape(x.shape), s.reshape(x.shape[:-1])


def _multipliers(x: torch.Tensor, s: torch.Tensor, group: int, clip: float) -> torch.Tensor:
    """m[g] = clamp(ceil((max|x[g]| * clip) / (s * 7)), 1, 15) in float32: [..., G, 1]."""
    g = x.float().reshape(*x.shape[:-1], -1, group)  # [..., G, group]
    a = g.abs().amax(dim=-1, keepdim=True) * _f32(clip)
    return torch.ceil(a / (s[..., None, None] * 7.0)).clamp(1.0, 15.0)


def _check(x: torch.Tensor, group: int, clip: float = 1.0, block_k=None):
    """The kernel equals the definition, and v is q * m group by group; returns (v, s)."""
    v, s = quantize_int4_groups_triton(x, group=group, clip=clip, block_k=block_k)
    v_ref, s_ref = _definition(x, group, clip)
    assert v.dtype == torch.int8 and v.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert torch.equal(v, v_ref) and torch.equal(s, s_ref)
    if x.numel():
        vg = v.reshape(*x.shape[:-1], -1, group).to(torch.int32)  # [..., G, group]
        m = _multipliers(x, s, group, clip).to(torch.int32)  # [..., G, 1]
        assert vg.abs().max() <= 120
        assert (vg % m == 0).all()
        q = vg // m
        assert q.min() >= -8 and q.max() <= 7
    return v, s


def _spread(m: int, n_groups: int, group: int, dtype, seed: int) -> torch.Tensor:
    """[m, n_groups * group]: groups whose magnitudes span 10**-4 .. 10**2, in a different
    order on every row (the largest group is not always the last)."""
    gen = torch.Generator().manual_seed(seed)
    mags = 10 ** torch.linspace(-4, 2, n_groups)
    order = torch.stack([torch.randperm(n_groups, generator=gen) for _ in range(m)])
    x = torch.randn(m, n_groups, group, generator=gen) * mags[order][..., None]
    return x.reshape(m, n_groups * group).to(dtype)


# ---------------------------------------------------------------- bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("group", [16, 32])
def test_groups_of_very_different_magnitudes(group, clip, dtype):
    # 6 groups: one pass; then two passes of 4 groups (the second step half past the row)
    # and of 1 group
    x = _spread(4, 6, group, dtype, seed=group)
    for block_k in (None, 4 * group, group):
        v, _ = _check(x, group, clip, block_k)
    assert (v != 0).any(dim=-1).all()  # each row's largest groups are not all rounded away


@_fast
@given(
    st.integers(1, 8), st.sampled_from([(2, 64), (4, 16), (8, 32), (16, 16), (32, 8)]),
    st.sampled_from(DTYPES), st.floats(0.5, 1.0), st.integers(0, 2**16), st.booleans(),
)  # fmt: skip
def test_random_rows(m, shape, dtype, clip, seed, two_pass):
    group, n_groups = shape
    x = torch.randn(m, group * n_groups, generator=torch.Generator().manual_seed(seed)) * 3
    _check(x.to(dtype), group, clip, block_k=2 * group if two_pass else None)


@pytest.mark.parametrize("block_k", [None, 16])
def test_zero_row_and_ties(block_k):
    """s = 1 exactly (the row's absmax is 105), so each step s * m is m and x / (s * m)
    lands on the ties the values are made of; m's ceil sits exactly on integers too."""
    # [1, 64], four groups of 16
    groups = torch.zeros(4, 16)
    # m = 15 (a = 105): x / 15 = 0.5, 1.5, 2.5, 7 and their negatives
    groups[0, :7] = torch.tensor([7.5, 22.5, 37.5, 105.0, -7.5, -22.5, -37.5])
    # m = 1 (a = 7): the ties of x itself
    groups[1, :7] = torch.tensor([0.5, 1.5, 2.5, 6.5, -0.5, -2.5, -7.0])
    # m = 2 exactly (a / 7 = 2, not rounded up): x / 2 = 0.5, 1.5, 2.5, 7
    groups[2, :4] = torch.tensor([1.0, 3.0, 5.0, -14.0])
    # a / 7 a float32 step above 2: m = 3
    groups[3, :2] = torch.tensor([14.000001, 4.5])
    x = torch.stack([groups.reshape(64), torch.zeros(64)])  # [2, 64]: a row, a zero row
    v, s = _check(x, 16, 1.0, block_k)
    assert s.tolist() == [1.0, torch.finfo(torch.float32).eps]
    g = v[0].reshape(4, 16)
    assert g[0, :7].tolist() == [0, 30, 30, 105, 0, -30, -30]  # q: 0, 2, 2, 7, 0, -2, -2
    assert g[1, :7].tolist() == [0, 2, 2, 6, 0, -2, -7]
    assert g[2, :4].tolist() == [0, 4, 4, -14]
    assert g[3, :2].tolist() == [15, 6]  # q: 5 (14.000001 / 3), 2 (1.5, a tie, to even)
    assert not v[1].any()


def test_saturation_at_clip():
    # clip 0.5: the largest values sit beyond their group's range and saturate at -8 / 7
    x = torch.tensor([[105.0, -105.0, 50.0, 7.5] * 4 + [7.0] * 16])  # [1, 32]
    v, s = _check(x, 16, 0.5)
    assert s.item() == 0.5
    assert v[0, :4].tolist() == [105, -120, 105, 15]  # m = 15: q 7, -8 (saturated), 7, 1


@pytest.mark.parametrize("block_k", [None, 48])
def test_group_that_is_not_a_power_of_two(block_k):
    # a group of 24 is loaded in 32 lanes, the last 8 masked
    _check(_spread(3, 5, 24, torch.float32, seed=3), 24, 0.9, block_k)


# ---------------------------------------------------------------- layouts and shapes


@pytest.mark.parametrize("block_k", [None, 32])
def test_strided_rows(block_k):
    base = torch.randn(128, 5, generator=torch.Generator().manual_seed(7))
    _check(base.T, 16, 0.9, block_k)  # [5, 128], strides (1, 5): the kernel reads columns
    wide = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    _check(wide[:, ::2], 32, 1.0, block_k)  # [3, 128], stride 2 along K


def test_leading_batch_dims():
    x = _spread(6, 4, 16, torch.bfloat16, seed=11).reshape(2, 3, 64)
    _check(x, 16, 0.9)
    _check(x.transpose(0, 1), 16, 0.9, block_k=32)  # [3, 2, 64], not contiguous


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_no_rows(shape):
    v, s = quantize_int4_groups_triton(torch.randn(shape), group=16)
    assert v.shape == shape and v.dtype == torch.int8
    assert s.shape == shape[:-1] and s.dtype == torch.float32


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(group=1), ValueError, "group must be an int"),
    (dict(group=True), ValueError, "group must be an int"),
    (dict(group=16.0), ValueError, "group must be an int"),
    (dict(group=48), ValueError, "not a positive multiple"),
    (dict(group=16, block_k=24), ValueError, "block_k must be"),
    (dict(group=16, block_k=48), ValueError, "block_k must be"),
    (dict(group=16, block_k=0), ValueError, "block_k must be"),
    (dict(group=16, clip=0.0), ValueError, "clip must be in"),
    (dict(group=16, clip=1.5), ValueError, "clip must be in"),
])  # fmt: skip
def test_refuses(kwargs, error, message):
    with pytest.raises(error, match=message):
        quantize_int4_groups_triton(torch.randn(2, 64), **kwargs)


def test_refuses_other_inputs():
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        quantize_int4_groups_triton(torch.randn(2, 64, dtype=torch.float64), group=16)
    with pytest.raises(ValueError, match="not a positive multiple"):
        quantize_int4_groups_triton(torch.randn(2, 0), group=16)


def test_one_pass_up_to_the_register_limit():
    assert int4_groups_block(256, 16) == 16  # every group: one pass
    assert int4_groups_block(96, 24) == 4  # 4 groups of 24 in 32 lanes each
    assert int4_groups_block(2 * _ONE_PASS_MAX_K, 16) == _ONE_PASS_MAX_K // 16  # two passes
    assert int4_groups_block(_ONE_PASS_MAX_K, 24) == _ONE_PASS_MAX_K // 32  # padded lanes


# past the one-pass limit (fast enough interpreted: numpy runs each step whole)
def test_long_row_takes_two_passes_by_default():
    x = _spread(2, 2 * _ONE_PASS_MAX_K // 32, 32, torch.float16, seed=13)  # [2, 32768]
    _check(x, 32, 0.9)


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, group", [(4096, 16), (11008, 32), (40960, 128)])
def test_cuda_long_rows(dtype, k, group):
    # compiled: div_rn and ceil as the GPU does them, and the default two-pass rows
    x = _spread(8, k // group, group, dtype, seed=k).cuda()
    v, s = quantize_int4_groups_triton(x, group=group, clip=0.9)
    v_ref, s_ref = _definition(x.cpu(), group, 0.9)
    assert torch.equal(v.cpu(), v_ref) and torch.equal(s.cpu(), s_ref)
