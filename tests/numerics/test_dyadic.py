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

from qcompile.numerics.dyadic import (
    ACC_EXACT_LIMIT,
    WIDE_SATURATION,
    MultiplierRangeError,
    quantize_multiplier,
    requantize,
    rounding_shift_wide,
)

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

    q = 2**t * odd, acc = 2**(s-1-t) * r with r odd; |acc| < 2**31 needs s-1-t <= 30 and
    q < 2**31 needs t <= 30, so s <= 61 (at s = 62 only acc = -2**31 with q = 2**30 is a
    tie: test_requantize_extremes has it).
    """
    s = draw(st.integers(1, 61))
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


# ---------------------------------------------------------------------------------------
# requantize: output dtype and argument checks
# ---------------------------------------------------------------------------------------


def test_requantize_wide_bounds_do_not_wrap():
    # an int32 clamp range: the result needs int32, which int8 would wrap to -16
    acc = torch.tensor([2008089567, -2008089567, INT32_MIN], dtype=torch.int32)
    got = requantize(acc, 2**30, 31, 0, INT32_MIN, INT32_MAX)
    assert got.dtype == torch.int32
    assert got.tolist() == [1004044784, -1004044784, -(2**30)]
    assert got.tolist() == [reference(a, 2**30, 31, 0, INT32_MIN, INT32_MAX) for a in acc.tolist()]


@pytest.mark.parametrize(
    "qmin,qmax,dtype",
    [
        (-128, 127, torch.int8),
        (0, 127, torch.int8),
        (-129, 127, torch.int16),
        (0, 255, torch.int16),
        (-(2**15), 2**15 - 1, torch.int16),
        (-(2**15) - 1, 0, torch.int32),
        (0, 2**15, torch.int32),
        (INT32_MIN, INT32_MAX, torch.int32),
        (INT32_MIN - 1, 0, torch.int64),
        (0, 2**31, torch.int64),
        (*WIDE, torch.int64),
    ],
)
def test_requantize_output_dtype_is_the_narrowest_holding_the_bounds(qmin, qmax, dtype):
    q, s = 1518500250, 31  # ~0.707
    got = requantize(torch.tensor(EXTREME_ACCS, dtype=torch.int32), q, s, 3, qmin, qmax)
    assert got.dtype == dtype
    assert got.tolist() == [reference(a, q, s, 3, qmin, qmax) for a in EXTREME_ACCS]
    # 0-d tensor bounds (the CPU epilogue passes them) give the same dtype and values
    t = requantize(torch.tensor(EXTREME_ACCS, dtype=torch.int32), q, s, 3,
                   torch.tensor(qmin), torch.tensor(qmax))  # fmt: skip
    assert t.dtype == dtype and torch.equal(t, got)


def test_requantize_explicit_out_dtype():
    acc = torch.tensor(EXTREME_ACCS, dtype=torch.int32)
    assert requantize(acc, 2**30, 31, out_dtype=torch.int64).dtype == torch.int64
    assert requantize(acc, 2**30, 31, 0, 0, 255, out_dtype=torch.uint8).tolist() == [
        reference(a, 2**30, 31, 0, 0, 255) for a in EXTREME_ACCS
    ]
    with pytest.raises(ValueError, match=r"^out_dtype is torch.int8, which holds \[-128, 127\]: "
                                         r"qmin=-2147483648 and qmax=2147483647 out of range"):
        requantize(acc, 2**30, 31, 0, INT32_MIN, INT32_MAX, out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"^out_dtype is torch.int16, .*: qmax=32768 out of"):
        requantize(acc, 2**30, 31, 0, 0, 2**15, out_dtype=torch.int16)
    with pytest.raises(ValueError, match=r"^out_dtype is torch.uint8, .*: qmin=-1 out of"):
        requantize(acc, 2**30, 31, 0, -1, 255, out_dtype=torch.uint8)
    with pytest.raises(TypeError, match="out_dtype must be an integer dtype, got torch.float32"):
        requantize(acc, 2**30, 31, out_dtype=torch.float32)


def test_requantize_rejects_crossed_and_unrepresentable_bounds():
    acc = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^need qmin <= qmax, got qmin=5, qmax=4$"):
        requantize(acc, 2**30, 31, 0, 5, 4)
    with pytest.raises(ValueError, match="no integer dtype holds"):
        requantize(acc, 2**30, 31, 0, 0, 2**63)
    with pytest.raises(ValueError, match="qmin must be a scalar"):
        requantize(acc, 2**30, 31, 0, torch.tensor([0, 1]), 127)
    with pytest.raises(TypeError, match="qmax must be an integer, got 127.5"):
        requantize(acc, 2**30, 31, 0, -128, 127.5)


Q_RULE = "0 <= q < 2\\*\\*31"


@pytest.mark.parametrize(
    "q,shift,message",
    [
        (2**31, 31, f"{Q_RULE}, got q=2147483648"),
        (-1, 31, f"{Q_RULE}, got q=-1"),
        (2**30, 0, "1 <= shift <= 62, got shift=0"),
        (2**30, 63, "1 <= shift <= 62, got shift=63"),
        (torch.tensor([2**30, 2**31]), torch.tensor([3, 3]), f"{Q_RULE}, got q=2147483648"),
        (torch.tensor([2**30, 0]), torch.tensor([62, 63]), "1 <= shift <= 62, got shift=63"),
        (torch.tensor(2**30), torch.tensor(0), "1 <= shift <= 62, got shift=0"),
    ],
)
def test_requantize_rejects_multipliers_outside_the_contract(q, shift, message):
    with pytest.raises(ValueError, match=f"^requantization needs {message}$"):
        requantize(torch.tensor([[1, 2]], dtype=torch.int32), q, shift)


def test_requantize_rejects_float_multipliers():
    acc = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(TypeError, match="q must be an integer tensor, got torch.float32"):
        requantize(acc, torch.tensor([2.0**30]), 31)
    with pytest.raises(TypeError, match="shift must be an integer, got 31.0"):
        requantize(acc, 2**30, 31.0)


def test_requantize_int64_accumulators_are_exact_up_to_the_int64_headroom():
    # |acc| <= 3 * 2**30 keeps |acc * q| + 2**61 below 2**63 even at q = 2**31 - 1, s = 62
    edge = ACC_EXACT_LIMIT
    assert edge * (2**31 - 1) + 2**61 < 2**63
    accs = [edge, -edge, edge - 1, 2**31 + 1, -(2**31) - 1]
    for q, s in [(2**31 - 1, 62), (2**31 - 1, 1), (2**30, 31), (2**30 + 1, 33)]:
        got = requantize(torch.tensor(accs, dtype=torch.int64), q, s, 0, *WIDE)
        assert got.tolist() == [reference(a, q, s, 0, *WIDE) for a in accs]
    for acc in (edge + 1, -edge - 1, 2**62):
        with pytest.raises(ValueError, match=f"requantize: \\|acc\\| reaches {abs(acc)} > 3 "):
            requantize(torch.tensor([0, acc], dtype=torch.int64), 2**30, 31)


def test_requantize_traces_under_torch_compile_with_tensor_scalars():
    # the CPU epilogue runs requantize under torch.compile(fullgraph=True) with 0-d tensor
    # q, shift and bounds: the checks that read tensor data must not break the graph
    def f(acc, q, s, lo, hi):
        return requantize(acc, q, s, 0, lo, hi, out_dtype=torch.int8)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    acc = torch.tensor(EXTREME_ACCS, dtype=torch.int32)
    args = [torch.tensor(v) for v in (2**31 - 1, 62, -5, 127)]
    assert torch.equal(compiled(acc, *args), f(acc, *args))
    assert compiled(acc, *args).tolist() == [reference(a, 2**31 - 1, 62, 0, -5, 127)
                                             for a in EXTREME_ACCS]  # fmt: skip


# ---------------------------------------------------------------------------------------
# rounding_shift_wide: |acc| < 2**62, the product acc * q beyond int64
# ---------------------------------------------------------------------------------------

WIDE_MAX = 2**62 - 1  # the largest |acc| rounding_shift_wide takes
WIDE_ACCS = [-WIDE_MAX, -WIDE_MAX + 1, -(2**61), -(2**39), INT32_MIN, -3, -1, 0, 1, 3,
             INT32_MAX, 2**39, 2**61, WIDE_MAX - 1, WIDE_MAX]


def wide_reference(acc: int, q: int, s: int) -> int:
    """round_half_away(acc * q / 2**s) by Fraction, saturated at +-2**62 (the documented
    saturation: any clamp to a range within it agrees with the exact value's)."""
    y = round_half_away(Fraction(acc) * q / 2**s)
    return max(-WIDE_SATURATION, min(WIDE_SATURATION, y))


def check_wide(accs, q, s):
    got = rounding_shift_wide(torch.tensor(accs, dtype=torch.int64), q, s).tolist()
    assert got == [wide_reference(a, q, s) for a in accs]


wide_accs = st.one_of(st.integers(-WIDE_MAX, WIDE_MAX), st.integers(-(2**40), 2**40),
                      st.sampled_from(WIDE_ACCS))
wide_qs = st.one_of(st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2**30, 2**31 - 1]))
wide_shifts = st.one_of(st.integers(1, 62), st.sampled_from([1, 30, 31, 32, 62]))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(accs=st.lists(wide_accs, min_size=1, max_size=16), q=wide_qs, s=wide_shifts)
def test_rounding_shift_wide_matches_fraction(accs, q, s):
    check_wide(accs + WIDE_ACCS, q, s)


@pytest.mark.parametrize("q", [0, 1, 2**30, 2**30 + 1, 2**31 - 1])
@pytest.mark.parametrize("s", [1, 2, 29, 30, 31, 32, 33, 61, 62])
def test_rounding_shift_wide_extremes(q, s):
    check_wide(WIDE_ACCS, q, s)


@st.composite
def wide_ties(draw):
    """(acc, q, s) with |acc| q = (2k + 1) 2**(s-1): exactly half-way. q = odd 2**t, acc =
    r 2**(s-1-t) with r odd and |acc| < 2**62."""
    s = draw(st.integers(1, 62))
    t = draw(st.integers(0, min(s - 1, 30)))
    odd = draw(st.integers(0, 2 ** (30 - t) - 1)) * 2 + 1  # q = odd 2**t < 2**31
    r_max = (WIDE_MAX >> (s - 1 - t)) - 1
    r = draw(st.integers(0, max(r_max // 2 - 1, 0))) * 2 + 1
    return draw(st.sampled_from([1, -1])) * (r << (s - 1 - t)), odd << t, s


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tie=wide_ties())
def test_rounding_shift_wide_ties_round_away_from_zero(tie):
    acc, q, s = tie
    assert abs(acc) <= WIDE_MAX and 0 < q < 2**31
    assert (abs(acc) * q) % 2**s == 2 ** (s - 1)  # truly a tie
    check_wide([acc, -acc], q, s)


def test_rounding_shift_wide_saturates_only_beyond_2_62():
    # shift 1, q = 2**31 - 1: |acc| q / 2 passes 2**62 from |acc| ~ 2**32
    edge = (2**63) // (2**31 - 1)  # the largest acc with acc * q <= 2**63
    got = rounding_shift_wide(torch.tensor([edge, -edge, edge + 1, WIDE_MAX]), 2**31 - 1, 1)
    assert got.tolist() == [wide_reference(a, 2**31 - 1, 1) for a in (edge, -edge, edge + 1,
                                                                      WIDE_MAX)]
    assert got[-1] == WIDE_SATURATION and abs(got[0]) <= WIDE_SATURATION


@settings(max_examples=50, deadline=None, derandomize=True)
@given(rows=st.integers(1, 3), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_rounding_shift_wide_per_channel(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**62) + 1, 2**62, (rows, n), generator=g, dtype=torch.int64)
    acc[0, 0] = -WIDE_MAX
    q = torch.randint(0, 2**31, (n,), generator=g)
    s = torch.randint(1, 63, (n,), generator=g)
    got = rounding_shift_wide(acc, q, s)
    want = [[wide_reference(int(acc[i, j]), int(q[j]), int(s[j])) for j in range(n)]
            for i in range(rows)]
    assert got.tolist() == want


def test_rounding_shift_wide_agrees_with_requantize_where_both_apply():
    accs = torch.tensor(EXTREME_ACCS, dtype=torch.int32)
    for q, s in [(2**31 - 1, 62), (2**30, 31), (1518500250, 33), (2**30 + 7, 1)]:
        narrow = requantize(accs, q, s, 0, *WIDE, out_dtype=torch.int64)
        assert torch.equal(rounding_shift_wide(accs.to(torch.int64), q, s), narrow)


@pytest.mark.parametrize(
    "acc,q,shift,error,message",
    [
        (torch.tensor([1], dtype=torch.int32), 2**30, 31, TypeError, "acc must be an int64"),
        (torch.tensor([1.0]), 2**30, 31, TypeError, "acc must be an integer tensor"),
        (torch.tensor([2**62]), 2**30, 31, ValueError, "below 2\\*\\*62, got 4611686018427387904"),
        (torch.tensor([-(2**63)]), 2**30, 31, ValueError, "below 2\\*\\*62"),
        (torch.tensor([1]), 2**31, 31, ValueError, "0 <= q < 2\\*\\*31"),
        (torch.tensor([1]), -1, 31, ValueError, "0 <= q < 2\\*\\*31"),
        (torch.tensor([1]), 2**30, 0, ValueError, "1 <= shift <= 62"),
        (torch.tensor([1]), 2**30, 63, ValueError, "1 <= shift <= 62"),
        (torch.tensor([[1, 2]]), torch.tensor([1, 2, 3]), 31, ValueError, "does not broadcast"),
    ],
)
def test_rounding_shift_wide_refuses_what_it_cannot_do_exactly(acc, q, shift, error, message):
    with pytest.raises(error, match=message):
        rounding_shift_wide(acc, q, shift)
