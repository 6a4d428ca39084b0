"""I-BERT's integer arithmetic (qcompile/numerics/ibert.py) against exact oracles and float.

Oracles: each algorithm spelled out on Python integers, which cannot overflow, with every
rounding done on fractions.Fraction half away from zero (the one convention), so an int64
overflow, an off-by-one or another tie rule shows as a mismatch. Float checks hold the
approximations to their documented error bounds: i-exp ~3e-3 relative, the 16-bit softmax
probabilities within 2e-3 of the float softmax, i-GELU within 1.9e-2 of GELU, LayerNorm
within one output step.
"""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qcompile.numerics import ibert
from qcompile.numerics.dyadic import MultiplierRangeError
from tests.numerics.test_dyadic import round_half_away

INT8 = torch.arange(-128, 128, dtype=torch.int8)
scales = st.floats(min_value=1e-3, max_value=0.3)
zps = st.integers(min_value=-40, max_value=40)

# I-BERT's second-order fits, written out here so the folded constants are checked against
# them: exp(p) ~ A (p + B)**2 + C on (-ln 2, 0]; erf(x) ~ sign(x) (A (min(|x|, -B) + B)**2 + 1)
EXP_A, EXP_B, EXP_C = Fraction(0.3585), Fraction(1.353), Fraction(0.344)
ERF_A, ERF_B = -0.2888, -1.769
LOGIT_UNIT = Fraction(1, 2**13)
LN2 = math.floor(Fraction(math.log(2.0)) / LOGIT_UNIT)
POLY_B = math.floor(EXP_B / LOGIT_UNIT)
POLY_C = math.floor(EXP_C / (EXP_A * LOGIT_UNIT**2))
EXP_UNIT = float(EXP_A * LOGIT_UNIT**2)  # i-exp's output unit


def requant_oracle(g: int, q: int, shift: int, zp: int, qmin=-128, qmax=127) -> int:
    return min(qmax, max(qmin, round_half_away(Fraction(g * q, 2**shift)) + zp))


# ---------------------------------------------------------------- round_div


def test_round_div_ties_away_from_zero():
    a = torch.tensor([5, -5, 3, -3, 1, -1, 7, -7, 8, -8, 0, 4, -4])
    b = torch.tensor([2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 5, 8, 8])
    # 2.5 -> 3, -2.5 -> -3, 1.5 -> 2, -1.5 -> -2, 0.5 -> 1, -0.5 -> -1, 7/3 -> 2, 8/3 -> 3
    assert ibert.round_div(a, b).tolist() == [3, -3, 2, -2, 1, -1, 2, -2, 3, -3, 0, 1, -1]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(-(2**61), 2**61), st.integers(1, 2**61)), min_size=1,
                max_size=32))
@example([(2**61, 2), (-(2**61), 2**61), (-(2**61) + 1, 2), (2**61 - 1, 2**61)])
def test_round_div_is_exact_rounding(pairs):
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    assert ibert.round_div(a, b).tolist() == [round_half_away(Fraction(x, y)) for x, y in pairs]
    assert torch.equal(ibert.round_div(-a, b), -ibert.round_div(a, b))  # symmetric


# ---------------------------------------------------------------- i-sqrt, bit_length


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.integers(min_value=0, max_value=2**62 - 1), min_size=1, max_size=64))
def test_isqrt_is_floor_sqrt(values):
    n = torch.tensor(values + [0, 1, 2, 3, 4, 2**62 - 1, (2**31 - 1) ** 2], dtype=torch.int64)
    assert ibert.isqrt(n).tolist() == [math.isqrt(v) for v in n.tolist()]
    assert ibert.bit_length(n).tolist() == [v.bit_length() for v in n.tolist()]


def test_isqrt_exhaustive_small_and_top_of_int64():
    # every n below 2000, every perfect square's neighbours up to 2**62, and the top of
    # int64 (beyond the 2**62 its callers need, the fixed Newton steps still reach it)
    roots = [1 << k for k in range(31)] + [2**31 - 1, 3037000499]
    n = torch.tensor(list(range(2000)) + [r * r + d for r in roots for d in (-1, 0, 1)]
                     + [2**62, 2**63 - 1])
    assert ibert.isqrt(n).tolist() == [math.isqrt(v) for v in n.tolist()]
    assert ibert.bit_length(n).tolist() == [v.bit_length() for v in n.tolist()]


# ---------------------------------------------------------------- i-exp


def iexp_oracle(d: int) -> int:
    """I-BERT i-exp on Python ints: d = -z ln2 + p, p in (-ln 2, 0], exp = poly(p) >> z."""
    d = max(d, -30 * LN2)  # flushed below 2**-30 (as the op, to bound the shift)
    z = -d // LN2
    p = d + z * LN2
    return ((p + POLY_B) ** 2 + POLY_C) >> z


def test_i_exp_constants_are_the_fit_in_logit_units():
    assert (ibert.EXP_LN2, ibert.EXP_B, ibert.EXP_C) == (LN2, POLY_B, POLY_C)
    assert 2.0**-ibert.LOGIT_BITS == LOGIT_UNIT


def test_i_exp_matches_oracle():
    # every logit difference down to the flush point and past it, and far below
    d = list(range(-31 * LN2, 1)) + [-(2**40), ibert.MASKED, -(2**62)]
    assert ibert.i_exp(torch.tensor(d)).tolist() == [iexp_oracle(v) for v in d]


def test_i_exp_close_to_exp():
    d = torch.arange(-LN2 + 1, 1)  # (-ln 2, 0]: the polynomial alone
    e, ref = ibert.i_exp(d) * EXP_UNIT, torch.exp(d.double() * 2.0**-13)
    assert ((e - ref).abs() / ref).max() < 3.2e-3  # I-BERT's fit peaks at 3.19e-3
    x = torch.linspace(-20, 0, 4001, dtype=torch.float64)
    d = torch.round(x * 2**13).long()
    e, ref = ibert.i_exp(d) * EXP_UNIT, torch.exp(d.double() * 2.0**-13)
    # the same relative error wherever exp(x) is large against the output unit (2**-z is a
    # right shift, flooring values below ~A 2**-26)
    rel = ((e - ref).abs() / ref)[x > -5]
    assert rel.max() < 4e-3
    assert (e - ref).abs().max() < 3e-3


# ---------------------------------------------------------------- softmax


def softmax_oracle(row: list[int], visible: list[bool]) -> list[int]:
    """Row max over the visible logits, i-exp, e * 2**16 / sum(e) rounded half away."""
    seen = [z for z, v in zip(row, visible) if v]
    if not seen:
        return [0] * len(row)
    top = max(seen)
    e = [iexp_oracle(z - top) if v else 0 for z, v in zip(row, visible)]
    return [round_half_away(Fraction(x << 16, sum(e))) for x in e]


@st.composite
def logit_rows(draw):
    n = draw(st.integers(1, 12))
    span = draw(st.sampled_from([2**14, 2**20, 2**39 - 1]))  # up to far beyond the flush
    cell = st.tuples(st.integers(-span, span), st.booleans())
    return draw(st.lists(st.lists(cell, min_size=n, max_size=n), min_size=1, max_size=6))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(logit_rows())
def test_softmax_probabilities_match_oracle(rows):
    z = torch.tensor([[c[0] for c in r] for r in rows])
    vis = torch.tensor([[c[1] for c in r] for r in rows])
    got = ibert.softmax_probabilities(z, vis).tolist()
    assert got == [softmax_oracle(*zip(*r)) for r in rows]


def test_softmax_ties_masks_and_empty_rows():
    ones = torch.ones(1, 2**17, dtype=torch.bool)
    # 2**17 equal logits: each exactly half a unit of 2**-16, rounded away from zero
    assert ibert.softmax_probabilities(torch.zeros(1, 2**17, dtype=torch.int64),
                                       ones).unique().tolist() == [1]
    z = torch.tensor([[0, 0, 0, 0], [5, 10**9, 5, 7], [3, 1, 4, 1], [0, -7, 9, 2]])
    vis = torch.tensor([[True, True, True, False], [True, False, True, False],
                        [False] * 4, [True, True, True, True]])
    p = ibert.softmax_probabilities(z, vis)
    assert p[0].tolist() == [21845, 21845, 21845, 0]  # 65536 / 3, the hidden key gets 0
    assert p[1].tolist() == [32768, 0, 32768, 0]  # a hidden larger logit is not the max
    assert p[2].tolist() == [0, 0, 0, 0]  # nothing visible: all 0, no division by 0
    assert p.tolist() == [softmax_oracle(r, v) for r, v in zip(z.tolist(), vis.tolist())]


@pytest.mark.parametrize("amp", [3.0, 10.0])
def test_softmax_probabilities_close_to_float(amp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 77, generator=g, dtype=torch.float64) * amp
    z = torch.round(x * 2**13).long()
    p = ibert.softmax_probabilities(z, torch.ones_like(z, dtype=torch.bool))
    assert p.dtype == torch.int64
    ref = torch.softmax(z.double() * 2.0**-13, dim=-1)
    assert (p * 2.0**-16 - ref).abs().max() < 2e-3
    assert (p.sum(-1) * 2.0**-16 - 1).abs().max() < 1e-3
    # one logit 1000 above the others: exactly one-hot
    one = torch.tensor([[0, -1000 * 2**13, -1000 * 2**13]])
    assert ibert.softmax_probabilities(one, torch.ones_like(one, dtype=torch.bool)).tolist() \
        == [[65536, 0, 0]]


# ---------------------------------------------------------------- fit_multiplier


@settings(max_examples=150, deadline=None, derandomize=True)
@given(m=st.floats(-30.0, 10.0).map(lambda e: 2.0**e), acc_bits=st.integers(1, 50))
@example(m=1.0 - 2.0**-33, acc_bits=31)  # rounds up to 2**31: q halves, shift drops by one
@example(m=1.0 + 2.0**-31, acc_bits=31)  # m 2**30 ends in an exact half: rounds up
def test_fit_multiplier_is_one_rounding_within_the_headroom(m, acc_bits):
    max_acc = (1 << acc_bits) - 1
    q, shift = ibert.fit_multiplier(m, max_acc)
    bits = min(31, 62 - acc_bits)
    assert 1 <= shift <= 62 and max_acc * q < 2**62
    assert 2 ** (bits - 1) <= q < 2**bits  # every bit the headroom allows
    assert q == round_half_away(Fraction(m) * 2**shift)


def test_fit_multiplier_examples():
    assert ibert.fit_multiplier(1.0 - 2.0**-33, 2**31 - 1) == (2**30, 30)
    assert ibert.fit_multiplier(1.0 + 2.0**-31, 2**31 - 1) == (2**30 + 1, 30)  # a tie: up
    assert ibert.fit_multiplier(0.75, 255) == (3 * 2**29, 31)


def test_fit_multiplier_tiny_is_one_rounding():
    """A multiplier below 2**-31 keeps shift 62 with fewer bits of q, rounded once (rounding
    to 31 bits first, then to shift 62, rounded a value just under half a unit up)."""
    k = 3 << 21
    m = (k + 0.5 - 2.0**-10) * 2.0**-62  # m 2**62 = k + 0.499...: rounds to k
    assert ibert.fit_multiplier(m, 100) == (k, 62)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(m=st.floats(-50.0, -31.5).map(lambda e: 2.0**e), acc_bits=st.integers(1, 31))
def test_fit_multiplier_tiny_keeps_shift_62(m, acc_bits):
    max_acc = (1 << acc_bits) - 1
    q, shift = ibert.fit_multiplier(m, max_acc)
    assert shift == 62 and max_acc * q < 2**62
    assert abs(Fraction(m) * 2**62 - q) <= 1  # to the final unit


@pytest.mark.parametrize("m, max_acc", [
    (0.0, 10), (-1.0, 10), (math.nan, 10), (math.inf, 10), (-math.inf, 10),
    (2.0**40, 2**31),  # shift below 1
    (2.0**-80, 10),  # q rounds to 0
    (1.0, 2**51),  # fewer than 12 bits of q left next to the accumulator
])
def test_fit_multiplier_refuses(m, max_acc):
    with pytest.raises(MultiplierRangeError):
        ibert.fit_multiplier(m, max_acc)


# ---------------------------------------------------------------- i-GELU


def erf_oracle(t: int, p: ibert.GeluParams) -> int:
    """i-erf of t in units S_erf < 0: sign(t) ((min(|t|, -q_b) + q_b)**2 + q_c)."""
    poly = (min(abs(t), -p.q_b) + p.q_b) ** 2 + p.q_c
    return poly if t > 0 else -poly if t < 0 else 0


def gelu_oracle(x: int, p: ibert.GeluParams) -> int:
    """i-GELU's integer on Python ints: t = (x - zp) << up, then -t (i-erf(t) + 1 / S_erf)."""
    t = (x - p.in_zp) << p.up
    return -t * (erf_oracle(t, p) + p.q_one)


def gelu_units(in_scale: float, up: int) -> tuple[float, float]:
    """(S_erf, S_g): i-erf's unit (negative) and the unit of gelu_oracle's integer."""
    s = in_scale / 2**up
    s_e = s / math.sqrt(2.0)
    s_erf = ERF_A * s_e * s_e
    return s_erf, -s * s_erf / 2


@settings(max_examples=40, deadline=None, derandomize=True)
@given(s_in=scales, zp_in=zps, s_out=scales, zp_out=zps)
def test_gelu_matches_oracle_and_float(s_in, zp_in, s_out, zp_out):
    p = ibert.gelu_params(s_in, zp_in, s_out, zp_out)
    # the folded constants mean what they say: erf's unit S / 2**up / sqrt 2 <= 2**-10
    up = max(0, math.ceil(math.log2(s_in / math.sqrt(2.0) * 2**10)))
    s_e = s_in / 2**up / math.sqrt(2.0)
    s_erf, s_g = gelu_units(s_in, up)
    assert (p.up, p.q_b, p.q_c, p.q_one) == (up, math.floor(ERF_B / s_e),
                                             math.floor(1 / s_erf), math.floor(1 / s_erf))
    assert abs(p.q / 2**p.shift / (s_g / s_out) - 1) < 2**-20  # the multiplier: S_g / S_out
    y = ibert.gelu(INT8, p)
    assert y.dtype == torch.int8
    assert y.tolist() == [requant_oracle(gelu_oracle(x, p), p.q, p.shift, zp_out)
                          for x in range(-128, 128)]
    # within i-GELU's polynomial error (I-BERT's fit: < 1.9e-2) + the output rounding
    x = (INT8.double() - zp_in) * s_in
    lo, hi = (-128 - zp_out) * s_out, (127 - zp_out) * s_out
    for approximate in ("none", "tanh"):
        ref = F.gelu(x, approximate=approximate).clamp(lo, hi)
        err = ((y.double() - zp_out) * s_out - ref).abs().max().item()
        assert err <= 1.9e-2 + 1e-3 * (approximate == "tanh") + 0.5 * s_out + 1e-9


def test_gelu_extreme_scales_fit_int64():
    for s_in, s_out in ((1.0, 1e-3), (1e-4, 1e-4), (0.5, 0.5), (2e-3, 0.1)):
        p = ibert.gelu_params(s_in, 0, s_out, 0)
        g = [gelu_oracle(x, p) for x in range(-128, 128)]
        assert max(abs(v) for v in g) * p.q < 2**62
        assert ibert.gelu(INT8, p).tolist() == [requant_oracle(v, p.q, p.shift, 0) for v in g]


@pytest.mark.parametrize("scale", [1e-2, 1e-3])
def test_gelu_integer_close_to_gelu_before_rounding(scale):
    # the i-GELU integer before requantization, on wide inputs covering [-6, 6]
    n = round(6 / scale)
    p = ibert.gelu_params(scale, 0, 0.05, 0, in_range=(-n, n))
    x = torch.arange(-n, n + 1)
    g = ibert._gelu_core(x << p.up, p.q_b, p.q_c, p.q_one)
    assert g.tolist() == [gelu_oracle(v, p) for v in x.tolist()]
    s_erf, s_g = gelu_units(scale, p.up)
    assert (g * s_g - F.gelu(x.double() * scale)).abs().max() < 1.9e-2  # I-BERT: ~1.8e-2
    # i-erf alone: poor near 0 by design of the fit (0.096 at 0+), good away from it
    erf = torch.tensor([erf_oracle(v, p) for v in (x << p.up).tolist()]) * s_erf
    err = (erf - torch.erf(x.double() * scale / math.sqrt(2.0))).abs()
    assert err.max() < 0.1
    assert err[x.abs() * scale / math.sqrt(2.0) > 1].max() < 2e-2


# ---------------------------------------------------------------- LayerNorm


def layernorm_oracle(row: list[int], p: ibert.LayerNormParams) -> list[int]:
    """The LayerNorm algorithm (ibert.layernorm_params) in Python integers."""
    c = len(row)
    x = [v - p.in_zp for v in row]
    total = sum(x)
    xc = [c * v - total for v in x]
    v = sum(t * t for t in xc) + p.eps
    std = max(1, math.isqrt((v << (2 * p.f)) // c))
    out = []
    for t, g, b in zip(xc, p.gamma.tolist(), p.beta.tolist()):
        y = round_half_away(Fraction(t << (p.f + p.frac), std))
        o = round_half_away(Fraction(y * g + b, 2**p.shift)) + p.out_zp
        out.append(min(p.qmax, max(p.qmin, o)))
    return out


@settings(max_examples=30, deadline=None, derandomize=True)
@given(c=st.sampled_from([8, 64, 384, 1024]), s_in=scales, zp_in=zps, s_out=scales,
       zp_out=zps, seed=st.integers(0, 2**16), spread=st.sampled_from([1, 4, 127]))
def test_layernorm_matches_oracle_and_float(c, s_in, zp_in, s_out, zp_out, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(c, generator=g) * 0.5 + 1, torch.randn(c, generator=g) * 0.3
    x = (torch.randint(-spread, spread + 1, (3, c), generator=g) + zp_in).clamp(-128, 127)
    x = x.to(torch.int8)
    p = ibert.layernorm_params(s_in, zp_in, c, w, b, 1e-5, s_out, zp_out)
    y = ibert.layernorm(x, p)
    assert y.dtype == torch.int8
    assert y.tolist() == [layernorm_oracle(r, p) for r in x.tolist()]
    # LayerNorm is computed to >= 17 fractional bits: at most one output step off the
    # float LayerNorm rounded to the output scale (a rounding tie away)
    ref = F.layer_norm((x.double() - zp_in) * s_in, (c,), w.double(), b.double(), 1e-5)
    ref_q = (torch.round(ref / s_out) + zp_out).clamp(-128, 127)
    assert (y.double() - ref_q).abs().max() <= 1


@pytest.mark.parametrize("s_out", [0.06, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("scale, mag", [(0.05, 1.0), (1e-3, 1.0), (0.1, 30.0), (5e-3, 100.0)])
def test_layernorm_wide_input(scale, mag, affine, s_out):
    # int64 inputs (a residual sum) over +-R, up to R ~ 7e4 for 384 channels; an output
    # step of 1e-3 holds the normalisation to 1e-3 where the output does not saturate
    g = torch.Generator().manual_seed(2)
    x = torch.round((torch.randn(6, 384, generator=g, dtype=torch.float64) * mag + 0.5)
                    / scale).long()
    w = torch.randn(384, generator=g) * 0.5 + 1 if affine else None
    b = torch.randn(384, generator=g) * 0.1 if affine else None
    r = int(x.abs().max())
    p = ibert.layernorm_params(scale, 0, 384, w, b, 1e-5, s_out, 0, in_range=(-r, r))
    y = ibert.layernorm(x, p)
    assert y.tolist() == [layernorm_oracle(row, p) for row in x.tolist()]
    ref = F.layer_norm(x.double() * scale, (384,), None if w is None else w.double(),
                       None if b is None else b.double(), 1e-5)
    assert (y.double() - torch.round(ref / s_out).clamp(-128, 127)).abs().max() <= 1


def test_layernorm_rounds_a_normalised_tie_away_from_zero():
    # 4 channels summing to -+1: channel 0 has xc = +-1 and sum(xc**2) puts the integer std
    # at exactly 2**(f + frac + 1), so its normalised value is +-1/2 in units 2**-frac; an
    # output unit of 2**-21 (= 2**-frac) shows that rounding, the other channels saturate
    p = ibert.layernorm_params(1.0, 0, 4, None, None, 0.0, 2.0**-21, 0,
                               in_range=(-(1 << 21), 1 << 21))
    assert (p.f, p.frac, p.eps) == (5, 21, 0)
    row = [0, 527279, 1147214, -1674492]
    x = torch.tensor([row, [-v for v in row]])
    y = ibert.layernorm(x, p)
    assert y.tolist() == [[-1, 127, 127, -128], [1, -128, -128, 127]]
    assert y.tolist() == [layernorm_oracle(r, p) for r in x.tolist()]


def test_layernorm_params_reject_what_cannot_fit():
    with pytest.raises(ValueError, match="overflow"):
        ibert.layernorm_params(0.1, 0, 1 << 17, None, None, 1e-5, 0.1, 0)
    # 384 channels of inputs up to ~3.5e8 (S = 1e-6 for values ~100): int64 statistics
    # cannot hold them; callers bound the wide input first (residual_sum's clamp)
    with pytest.raises(ValueError, match="overflow"):
        ibert.layernorm_params(1e-6, 0, 384, None, None, 1e-5, 0.06, 0,
                               in_range=(-(35 * 10**7), 35 * 10**7))


# ---------------------------------------------------------------- residual sum


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), n=st.integers(1, 8), r_zp=st.integers(-128, 127),
       r_q=st.integers(1, 2**31 - 1), r_shift=st.integers(1, 62), bound=st.integers(1, 2**40))
def test_residual_sum_matches_oracle(data, n, r_zp, r_q, r_shift, bound):
    accs = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31), 2**31 - 1]))
    acc = data.draw(st.lists(st.lists(accs, min_size=n, max_size=n), min_size=1, max_size=3))
    r = data.draw(st.lists(st.lists(st.integers(-128, 127), min_size=n, max_size=n),
                           min_size=len(acc), max_size=len(acc)))
    acc_q = data.draw(st.lists(st.integers(1, 2**30), min_size=n, max_size=n))
    acc_shift = data.draw(st.lists(st.integers(1, 62), min_size=n, max_size=n))
    h = ibert.residual_sum(torch.tensor(acc, dtype=torch.int32), torch.tensor(acc_q),
                           torch.tensor(acc_shift), torch.tensor(r, dtype=torch.int8), r_zp,
                           r_q, r_shift, bound)
    assert h.dtype == torch.int64
    want = [[min(bound, max(-bound, round_half_away(Fraction(a * q, 2**s))
                            + round_half_away(Fraction((v - r_zp) * r_q, 2**r_shift))))
             for a, q, s, v in zip(a_row, acc_q, acc_shift, r_row)]
            for a_row, r_row in zip(acc, r)]
    assert h.tolist() == want
