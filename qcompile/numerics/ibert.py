"""I-BERT's integer-only non-linear arithmetic: i-GELU, LayerNorm with i-sqrt, i-exp and
the fixed-point softmax, each written once.

What: after I-BERT (S. Kim, A. Gholami, Z. Yao, M. W. Mahoney, K. Keutzer, "I-BERT:
Integer-only BERT Quantization", ICML 2021). Every constant the data path needs
(polynomial coefficients in the input's units, multipliers, shifts, integer gamma and
beta) is derived from the float scales once, on the host (`gelu_params`,
`layernorm_params`, `fit_multiplier`): what a compiler folds. The data path then uses
integer add, multiply, shift, compare and non-negative floor division only.

Rounding, one convention everywhere: every rounding is half away from zero, as the dyadic
contract (numerics/dyadic.py `rounding_shift` for powers of two, `round_div` here for
other divisors); floors appear only where the algorithm defines them (i-exp's
z = floor(-d / ln 2), i-sqrt's Newton steps, the folded constants).

Who uses it: the reference and CPU implementations of lowering/int_ops.py call these
functions; the Triton kernels (lowering/kernels/int_nonlinear.py) spell the same
operations in the same order, and tests hold them to these functions bit for bit.

Error against float (tests/numerics/test_ibert.py and tests/lowering/test_int_ops.py
assert the bounds; bench/integer_nonlinear_error.py measures them on all-MiniLM-L6-v2):
i-GELU's polynomial is within 1.9e-2 of exact GELU (I-BERT's fit; worst near |x| ~ 1.8
and at 0+) plus the output's rounding; LayerNorm is exact up to the rounding of its
output (>= 17 fractional bits inside); i-exp is within ~3e-3 relative of exp, and the
16-bit probabilities within ~4e-3 of the float softmax's.

Pre: integer tensors (computed in int64); scales positive. Post: integer tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from qcompile.numerics.dyadic import MultiplierRangeError, rounding_shift

# I-BERT's second-order fits: exp(p) ~ A_EXP (p + B_EXP)**2 + C_EXP on p in (-ln 2, 0];
# erf(x) ~ sign(x) (A_ERF (min(|x|, -B_ERF) + B_ERF)**2 + 1).
A_EXP, B_EXP, C_EXP = 0.3585, 1.353, 0.344
A_ERF, B_ERF = -0.2888, -1.769
EXP_MAX_SHIFT = 30  # exp(x) for x < -30 ln 2 is flushed to the value at -30 ln 2 (~1e-9)
GELU_UNIT_BITS = 10  # i-erf's input unit S / sqrt 2 is brought to <= 2**-10 by a left shift
LOGIT_BITS = 13  # softmax logits are integers in units of 2**-13 (i-exp precision ~1e-4)
SOFTMAX_BITS = 16  # probabilities in units of 2**-16, as I-BERT's fixed-point softmax
LN_Y_BITS = 23  # |normalised value| * 2**frac stays below 2**23 (so y * gamma < 2**54)
LN_GAMMA_BITS = 30  # the largest integer gamma / S_out is about 2**30


def fit_multiplier(m: float, max_acc: int) -> tuple[int, int]:
    """(q, shift) with m ~= q / 2**shift and max_acc * q < 2**62, so round(acc * q / 2**shift)
    is exact in int64 for |acc| <= max_acc: the dyadic contract's 31-bit q when the
    accumulator fits 31 bits, else q keeps 62 - bits(max_acc) bits (still one rounding).
    """
    if not (math.isfinite(m) and m > 0):
        raise MultiplierRangeError(f"multiplier must be finite and > 0, got {m!r}")
    bits = min(31, 62 - int(max_acc).bit_length())
    wide = bits
    mant, exp = math.frexp(m)  # m = mant 2**exp, mant in [0.5, 1)
    if wide - exp > 62:  # a tiny multiplier: fewer bits of q, so that the shift is 62
        wide = 62 + exp
    # one rounding: mant * 2**wide is exact in float64 (a power-of-two scaling); below
    # 2**-63, m * 2**62 rounds to 0
    q, shift = (math.floor(mant * 2.0**wide + 0.5), wide - exp) if wide >= 0 else (0, 62)
    if wide > 0 and q == 1 << wide:
        q, shift = q >> 1, shift - 1
    if bits < 12 or shift < 1 or q == 0:
        raise MultiplierRangeError(f"multiplier {m!r} does not fit next to a {max_acc}-bounded "
                                   "accumulator in int64")
    return q, shift


def round_div(a: Tensor, b: Tensor) -> Tensor:
    """round(a / b), ties away from zero, for b > 0: the one rounding division of these ops
    (the dyadic contract's convention). Non-negative floor divisions only, so C-style
    truncating division (the Triton kernels) gives the same result."""
    mag = torch.div(2 * a.abs() + b, 2 * b, rounding_mode="floor")
    return torch.where(a < 0, -mag, mag)


# ---------------------------------------------------------------- i-GELU


class GeluParams(NamedTuple):
    """gelu_int8's integer constants (its arguments after x, in order)."""

    in_zp: int
    up: int  # input left shift: i-erf's unit is (S / 2**up) / sqrt 2 <= 2**-GELU_UNIT_BITS
    q_b: int  # floor(B_ERF / S_e)
    q_c: int  # floor(1 / (A_ERF S_e**2))
    q_one: int  # floor(1 / S_erf): 1 in erf's units
    q: int  # dyadic multiplier from GELU's integer scale to the output scale
    shift: int
    out_zp: int
    qmin: int
    qmax: int


def _gelu_core(x: Tensor, q_b: int, q_c: int, q_one: int) -> Tensor:
    """I-BERT i-GELU on int64 x, constants folded: -x (erf(x S / sqrt 2) / S_erf + q_one).
    i-erf: sign(x) ((min(|x|, -q_b) + q_b)**2 + q_c), scale S_erf = A_ERF S_e**2 < 0."""
    mag = torch.clamp(x.abs(), max=-q_b)
    poly = (mag + q_b) * (mag + q_b) + q_c  # i-erf of |x|, scale S_erf < 0
    erf = torch.where(x < 0, -poly, torch.where(x > 0, poly, torch.zeros_like(poly)))
    return -x * (erf + q_one)  # scale -S S_erf / 2 > 0


def gelu_params(in_scale: float, in_zp: int, out_scale: float, out_zp: int, qmin: int = -128,
                qmax: int = 127, in_range: tuple[int, int] | None = None) -> GeluParams:
    """Compile time: the constants of y = GELU(S_in (x - zp_in)) requantized to S_out.

    The input is shifted left so i-erf's polynomial constants carry >= 10 fractional bits
    (I-BERT feeds it int32 matmul outputs; an int8 input's scale alone can be coarse).
    Every value the op can produce is evaluated here (at most 256 inputs) to bound the
    accumulator, so the requantization provably fits int64.
    """
    lo, hi = in_range or (qmin, qmax)
    up = max(0, math.ceil(math.log2(in_scale / math.sqrt(2.0) * 2.0**GELU_UNIT_BITS)))
    s = in_scale / 2.0**up  # exact: a power-of-two division
    s_e = s / math.sqrt(2.0)  # GELU takes erf(x / sqrt 2): i-erf reads x in units S / sqrt 2
    q_b = math.floor(B_ERF / s_e)
    q_c = math.floor(1.0 / (A_ERF * s_e * s_e))
    s_erf = A_ERF * s_e * s_e
    q_one = math.floor(1.0 / s_erf)
    xs = torch.bitwise_left_shift(torch.arange(lo, hi + 1, dtype=torch.int64) - in_zp, up)
    max_acc = int(_gelu_core(xs, q_b, q_c, q_one).abs().max())
    q, shift = fit_multiplier(-s * s_erf / 2.0 / out_scale, max(max_acc, 1))
    return GeluParams(int(in_zp), up, q_b, q_c, q_one, q, shift, int(out_zp), qmin, qmax)


def gelu(x: Tensor, p: GeluParams) -> Tensor:
    """int8 x -> int8 GELU: i-GELU of (x - in_zp) << up, then
    clamp(round_half_away(g * q / 2**shift) + out_zp)."""
    g = _gelu_core(torch.bitwise_left_shift(x.to(torch.int64) - p.in_zp, p.up), p.q_b, p.q_c,
                   p.q_one)
    y = rounding_shift(g * p.q, p.shift) + p.out_zp
    return y.clamp(p.qmin, p.qmax).to(torch.int8)


# ---------------------------------------------------------------- LayerNorm with i-sqrt


class LayerNormParams(NamedTuple):
    """layernorm_int8's integer constants (gamma, beta: int64 [C]; then its int arguments)."""

    gamma: Tensor  # round(gamma / S_out * 2**(shift - frac))
    beta: Tensor  # round(beta / S_out * 2**shift), clamped where the output saturates anyway
    in_zp: int
    eps: int  # round(eps * C**3 / S_in**2): eps in the units of sum(xc**2)
    f: int  # fractional bits of the integer standard deviation
    frac: int  # fractional bits of the normalised value
    shift: int
    out_zp: int
    qmin: int
    qmax: int


def bit_length(n: Tensor) -> Tensor:
    """Bits of each non-negative int64 (0 for 0): a six-step binary search on shifts."""
    bits = torch.zeros_like(n)
    for step in (32, 16, 8, 4, 2, 1):
        bits = torch.where(torch.bitwise_right_shift(n, bits + step - 1) > 0, bits + step, bits)
    return bits


ISQRT_STEPS = 7  # from x0 <= 2 sqrt(n) < 2**32, Newton reaches floor(sqrt(n)) in <= 6 steps


def isqrt(n: Tensor) -> Tensor:
    """floor(sqrt(n)) for int64 0 <= n < 2**62: I-BERT's i-sqrt (Newton from a power of two
    above sqrt(n)) with a fixed number of steps, so kernels need no data-dependent loop.
    The floored iterates decrease to floor(sqrt(n)) and never fall below it."""
    x = torch.bitwise_left_shift(torch.ones_like(n), torch.div(bit_length(n) + 1, 2,
                                                               rounding_mode="floor"))
    for _ in range(ISQRT_STEPS):
        nxt = torch.div(x + torch.div(n, x.clamp(min=1), rounding_mode="floor"), 2,
                        rounding_mode="floor")
        x = torch.minimum(x, nxt)
    return x


def layernorm_params(in_scale: float, in_zp: int, channels: int, weight: Tensor | None,
                     bias: Tensor | None, eps: float, out_scale: float, out_zp: int,
                     qmin: int = -128, qmax: int = 127,
                     in_range: tuple[int, int] | None = None) -> LayerNormParams:
    """Compile time: the constants of int8 LayerNorm over the last dim of C channels.

    With x = q - zp and xc = C x - sum(x) (exact centring, units S / C):
      y = xc / sqrt(V / C),  V = sum(xc**2) + eps C**3 / S**2       (the LayerNorm, exactly)
    computed as std = isqrt((V << 2f) // C) ~ 2**f sqrt(V / C) and
    y_fx = round(xc << (f + frac) / std); out = round((y_fx g_c + b_c) / 2**shift) + zp_out.
    f and frac are the largest that keep every intermediate in int64 for any int8 row.
    """
    lo, hi = in_range or (qmin, qmax)
    c = int(channels)
    xc_max = c * (hi - lo)  # |C x_i - sum(x)| <= C (max - min)
    eps_int = round(eps * c**3 / in_scale**2)
    v_max = c * xc_max * xc_max + eps_int
    if v_max.bit_length() > 61:
        raise ValueError(f"layernorm_int8: {c} channels overflow int64 statistics")
    frac = LN_Y_BITS - (c.bit_length() + 1) // 2  # |y| <= sqrt(C - 1) < 2**ceil(bits(C) / 2)
    f = min((62 - v_max.bit_length()) // 2, 60 - xc_max.bit_length() - frac)
    if f < 0 or frac < 8:
        raise ValueError(f"layernorm_int8: no fixed point fits {c} channels")
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    b = torch.zeros(c, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    g_max = float(w.abs().max()) / out_scale
    gbits = LN_GAMMA_BITS - math.ceil(math.log2(g_max)) if g_max > 0 else LN_GAMMA_BITS
    shift = min(gbits + frac, 50)  # 50: |y g| + |b| < 2**55 + 2**61 (see the beta clamp)
    if shift < 1:
        raise ValueError(f"layernorm_int8: gamma / output scale {g_max} is too large")
    gamma = torch.round(w / out_scale * 2.0 ** (shift - frac)).to(torch.int64)
    # beta beyond |y g| + 2**(shift + 10) saturates the output either way: clamping it keeps
    # the result and bounds p = y g + b inside int64
    bound = (gamma.abs() << LN_Y_BITS) + (1 << (shift + 10))
    beta = torch.round(b / out_scale * 2.0**shift).clamp(-(2.0**61), 2.0**61).to(torch.int64)
    beta = torch.maximum(torch.minimum(beta, bound), -bound)
    return LayerNormParams(gamma, beta, int(in_zp), eps_int, f, frac, shift, int(out_zp),
                           qmin, qmax)


def layernorm(x: Tensor, p: LayerNormParams) -> Tensor:
    """Integer LayerNorm over the last dim (algorithm: `layernorm_params`); x int8, or the
    wide int64 residual sum of `residual_sum`."""
    x = x.to(torch.int64) - p.in_zp  # [..., C]
    c = x.shape[-1]
    xc = x * c - x.sum(dim=-1, keepdim=True)
    v = (xc * xc).sum(dim=-1, keepdim=True) + p.eps
    std = isqrt(torch.div(torch.bitwise_left_shift(v, 2 * p.f), c, rounding_mode="floor"))
    y = round_div(torch.bitwise_left_shift(xc, p.f + p.frac), std.clamp(min=1))
    out = rounding_shift(y * p.gamma.to(x.device) + p.beta.to(x.device), p.shift) + p.out_zp
    return out.clamp(p.qmin, p.qmax).to(torch.int8)


def residual_sum(acc: Tensor, acc_q: Tensor, acc_shift: Tensor, r: Tensor, r_zp: int, r_q: int,
                 r_shift: int, bound: int) -> Tensor:
    """int64 h = acc * acc_q[c] / 2**acc_shift[c] + (r - r_zp) r_q / 2**r_shift, each side
    rounded once, clamped to +-bound: a linear's int32 accumulator (scale s_x s_w[c]) and an
    int8 residual brought to one fine scale s_h (I-BERT adds residuals in int32)."""
    dev = acc.device
    h = rounding_shift(acc.to(torch.int64) * acc_q.to(dev), acc_shift.to(dev))
    h = h + rounding_shift((r.to(torch.int64) - r_zp) * r_q, r_shift)
    return h.clamp(-bound, bound)


# ---------------------------------------------------------------- i-exp and softmax

# i-exp's constants for logits in units of 2**-LOGIT_BITS
_U = 2.0**-LOGIT_BITS
EXP_LN2 = math.floor(math.log(2.0) / _U)
EXP_B = math.floor(B_EXP / _U)
EXP_C = math.floor(C_EXP / (A_EXP * _U * _U))
MASKED = -(1 << 40)  # additive mask values at or below this (in logit units) hide the key


def i_exp(d: Tensor) -> Tensor:
    """exp(d 2**-13) for int64 d <= 0, in units A_EXP 2**-26 (I-BERT i-exp)."""
    d = torch.clamp(d, min=-EXP_MAX_SHIFT * EXP_LN2)
    z = torch.div(-d, EXP_LN2, rounding_mode="floor")
    p = d + z * EXP_LN2  # (-ln 2, 0]
    return torch.bitwise_right_shift((p + EXP_B) * (p + EXP_B) + EXP_C, z)


def integer_mask(attn_mask: Tensor | None, shape, device) -> Tensor | None:
    """The additive mask in logit units, int64 broadcast to shape; MASKED hides a key.
    The boundary conversion of a float input (bool masks convert exactly)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        m = torch.where(attn_mask.to(device), zero, torch.full_like(zero, MASKED))
    else:
        m = torch.round(attn_mask.to(device, torch.float64) * 2.0**LOGIT_BITS)
        m = torch.nan_to_num(m, nan=MASKED, neginf=MASKED, posinf=-MASKED)
        m = m.clamp(MASKED, -MASKED).to(torch.int64)
    return m.expand(shape)


def softmax_probabilities(z: Tensor, visible: Tensor) -> Tensor:
    """I-BERT's fixed-point softmax over the last dim of integer logits z (units
    2**-LOGIT_BITS): subtract the row max, i-exp, then e * 2**SOFTMAX_BITS / sum(e)
    rounded half away; hidden entries (visible False) and empty rows give 0."""
    z = torch.where(visible, z, torch.full_like(z, MASKED))
    zmax = z.amax(dim=-1, keepdim=True)
    e = torch.where(visible, i_exp(torch.clamp(z - zmax, max=0)), torch.zeros_like(z))
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, round_div(e << SOFTMAX_BITS, total.clamp(min=1)), 0)
