"""Tests for qcompile.numerics.dyadic against exact rational arithmetic (fractions.Fraction).

The contract (DESIGN.md): y = clamp(round_half_away(acc * q / 2**s) + zp, qmin, qmax) with
ZERO mismatches, ties and extremes included; 2**30 <= q < 2**31, s in 1..62, and q / 2**s
the nearest such dyadic number to M (relative error <= 2**-31).
"""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qcompile.numerics.dyadic import MultiplierRangeError, quantize_multiplier, requantize

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EXTREME_ACCS = [INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX]
WIDE = (-(2**62), 2**62)  # clamp bounds that never bind: checks the rounding alone


def round_half_away(f: Fraction) -> int:
    mag = math.floor(abs(f) + Fraction(1, 2))
    return mag if f >= 0 else -mag


def reference(acc: int, q: int, s: int, zp: int = 0, qmin: int = -128, qmax: int = 127) -> int:
    y = round_half_away(Fraction(acc) * q / 2**s) + zp
    return min(max(y, qmin), qmax)


def check(accs, q, s, zp=0, qmin=-128, qmax=127):
    """requantize on a tensor of accumulators == the exact reference, element by element."""
    acc = torch.tensor(accs, dtype=torch.int32)
    got = requantize(acc, q, s, zp, qmin, qmax, out_dtype=None).tolist()
    want = [reference(a, q, s, zp, qmin, qmax) for a in accs]
    assert got == want


# ---------------------------------------------------------------------------------------
# quantize_multiplier
# ---------------------------------------------------------------------------------------

# Log-uniform over the valid range: M in [2**-32, 2**30).
multipliers = st.floats(-32.0, 29.999).map(lambda e: 2.0**e)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(m=multipliers)
@example(m=1.0)
@example(m=2.0**-32)
@example(m=1.0 + 2.0**-31)  # mantissa * 2**31 is an exact tie: rounds away (up)
def test_quantize_multiplier_is_nearest_dyadic(m):
    q, s = quantize_multiplier(m)
    assert 2**30 <= q < 2**31 and 1 <= s <= 62
    exact = Fraction(m)
    # q is the nearest integer to M * 2**s (ties away from zero) ...
    dist = abs(exact * 2**s - q)
    assert dist <= Fraction(1, 2)
    if dist == Fraction(1, 2):
        assert q > exact * 2**s
    # ... hence the relative error bound.
    assert abs(exact - Fraction(q, 2**s)) / exact <= Fraction(1, 2**31)


def test_quantize_multiplier_tie_rounds_away():
    q, s = quantize_multiplier(1.0 + 2.0**-31)  # M * 2**30 = 2**30 + 1/2
    assert (q, s) == (2**30 + 1, 30)


@pytest.mark.parametrize(
    "m,expected",
    [
        (1.0 - 2.0**-40, (2**30, 30)),  # mantissa rounds up to 2**31: renormalised to 1.0
        (0.75 - 2.0**-45, (3 * 2**29, 31)),  # rounds to 0.75 exactly, no renormalisation
        (2.0**-32 * (1 - 2.0**-40), (2**30, 62)),  # renormalisation lands on shift 62
        (2.0**29 * (1 - 2.0**-40), (2**30, 1)),  # ... and on shift 1
    ],
)
def test_quantize_multiplier_renormalises(m, expected):
    assert quantize_multiplier(m) == expected


@pytest.mark.parametrize(
    "m",
    [2.0**30, 2.0**30 * (1 - 2.0**-40), 1e12, float("inf"), float("nan"), 0.0, -1.0],
)
def test_quantize_multiplier_rejects_large_and_invalid(m):
    with pytest.raises(MultiplierRangeError):
        quantize_multiplier(m)


@pytest.mark.parametrize("m", [2.0**-33, 2.0**-32 * (1 - 2.0**-20), 1e-30])
def test_quantize_multiplier_underflow(m):
    with pytest.raises(MultiplierRangeError, match="too small"):
        quantize_multiplier(m)
    assert quantize_multiplier(m, underflow="zero") == (0, 62)
    with pytest.raises(ValueError, match="underflow"):
        quantize_multiplier(m, underflow="clip")


def test_quantize_multiplier_tensor_matches_scalar():
    ms = torch.tensor([[1.0, 0.3], [2.0**-20, 123.456]], dtype=torch.float64)
    q, s = quantize_multiplier(ms)
    assert q.shape == s.shape == (2, 2) and q.dtype == s.dtype == torch.int64
    for (i, j), m in zip([(0, 0), (0, 1), (1, 0), (1, 1)], ms.reshape(-1).tolist(), strict=True):
        assert (q[i, j].item(), s[i, j].item()) == quantize_multiplier(m)
    with pytest.raises(MultiplierRangeError):
        quantize_multiplier(torch.tensor([0.5, 2.0**31]))


# ---------------------------------------------------------------------------------------
# requantize against Fraction
# ---------------------------------------------------------------------------------------

int32s = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.sampled_from(EXTREME_ACCS))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    m=multipliers,
    accs=st.lists(int32s, min_size=1, max_size=32),
    zp=st.integers(-128, 127),
)
def test_requantize_matches_fraction(m, accs, zp):
    q, s = quantize_multiplier(m)
    check(accs + EXTREME_ACCS, q, s, zp)  # int8 clamp
    check(accs + EXTREME_ACCS, q, s, zp, *WIDE)  # the rounding itself, unclamped


@pytest.mark.parametrize("q", [2**30, 2**30 + 1, 2**31 - 1])
@pytest.mark.parametrize("s", [1, 2, 30, 31, 32, 61, 62])
def test_requantize_extremes(q, s):
    check(EXTREME_ACCS, q, s, 0, *WIDE)
    check(EXTREME_ACCS, q, s, -5)
    check(EXTREME_ACCS, q, s, 3, 0, 255)  # uint8-style output range


@st.composite
def exact_ties(draw):
    """(acc, q, s) with acc * q == (2k + 1) * 2**(s-1): exactly half-way between integers.

    q = 2**t * odd, acc = 2**(s-1-t) * r with r odd; |acc| < 2**31 needs s-1-t <= 30.
    """
    s = draw(st.integers(1, 62))
    t = draw(st.integers(max(0, s - 31), min(s - 1, 30)))
    # 2**(31-t) - 1 is odd, so v | 1 stays in range and q = odd * 2**t in [2**30, 2**31).
    odd = draw(st.integers(2 ** (30 - t), 2 ** (31 - t) - 1).map(lambda v: v | 1))
    q = odd << t
    r_max = (INT32_MAX >> (s - 1 - t)) - 1
    r = draw(st.integers(0, max(r_max // 2 - 1, 0))) * 2 + 1
    sign = draw(st.sampled_from([1, -1]))
    return sign * (r << (s - 1 - t)), q, s


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tie=exact_ties())
def test_requantize_exact_ties_round_away_from_zero(tie):
    acc, q, s = tie
    assert 2**30 <= q < 2**31 and INT32_MIN <= acc <= INT32_MAX
    p = acc * q
    assert abs(p) % 2**s == 2 ** (s - 1)  # truly a tie
    got = requantize(torch.tensor([acc, -acc], dtype=torch.int32), q, s, 0, *WIDE, out_dtype=None)
    away = (abs(p) + 2 ** (s - 1)) >> s
    assert got.tolist() == [away if acc > 0 else -away, -away if acc > 0 else away]
    check([acc, -acc], q, s, 0, *WIDE)


def test_requantize_small_ties_both_signs():
    # q = 2**30, s = 31: acc / 2 exactly; ties at every odd acc.
    accs = [-5, -3, -1, 1, 3, 5, INT32_MAX, INT32_MIN + 1]
    got = requantize(torch.tensor(accs, dtype=torch.int32), 2**30, 31, 0, *WIDE, out_dtype=None)
    assert got.tolist() == [-3, -2, -1, 1, 2, 3, 2**30, -(2**30)]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    ms=st.lists(multipliers, min_size=1, max_size=6),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    zp_shape=st.sampled_from(["scalar", "per_channel"]),
)
def test_requantize_per_channel_broadcast(ms, rows, seed, zp_shape):
    n = len(ms)
    q, s = quantize_multiplier(torch.tensor(ms, dtype=torch.float64))  # [N] each
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(INT32_MIN, INT32_MAX, (rows, n), generator=g, dtype=torch.int64)
    acc[0, 0] = INT32_MIN
    acc = acc.to(torch.int32)  # [M, N]
    zp = 7 if zp_shape == "scalar" else torch.arange(n, dtype=torch.int32) - 3
    got = requantize(acc, q, s, zp)
    assert got.dtype == torch.int8 and got.shape == (rows, n)
    zps = [7] * n if zp_shape == "scalar" else (torch.arange(n) - 3).tolist()
    for i in range(rows):
        for j in range(n):
            want = reference(int(acc[i, j]), int(q[j]), int(s[j]), zps[j])
            assert int(got[i, j]) == want


def test_requantize_underflowed_multiplier_gives_zero_point():
    q, s = quantize_multiplier(2.0**-40, underflow="zero")
    got = requantize(torch.tensor(EXTREME_ACCS, dtype=torch.int32), q, s, 9)
    assert got.tolist() == [9] * len(EXTREME_ACCS)


def test_requantize_rejects_float_accumulators():
    with pytest.raises(TypeError):
        requantize(torch.ones(3), 2**30, 31)
