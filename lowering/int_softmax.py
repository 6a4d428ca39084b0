"""Integer-only non-linear ops (I-BERT): exp, softmax, sqrt, LayerNorm and GELU.

What: the pieces an integer-only transformer needs where the float path would use
softmax, LayerNorm and GELU, after I-BERT (S. Kim, A. Gholami, Z. Yao, M. W. Mahoney,
K. Keutzer, "I-BERT: Integer-only BERT Quantization", ICML 2021). Each op takes an integer
tensor q with a real scale S (x = q * S) and returns an int64 tensor with a new scale.
At run time only integer tensor ops are used (add, multiply, shift, floor division,
compare); the float scale enters only through integer constants computed once from it
(what a compiler folds at compile time).

Why: `options={"integer_softmax": True, ...}` style recipes keep activations integer
through the non-linear ops instead of dequantizing around a float island.

Accuracy (measured in tests/lowering/test_attention_kernel.py against float): the
second-order polynomials are I-BERT's, so the approximation error is theirs: i-exp about
3e-3 relative on [-ln 2, 0] (so everywhere), softmax about 5e-3 absolute at input scale
1e-2 and 6e-4 at 1e-3; i-erf is poor near 0 (0.096 at 0+, by design of the fit) but
i-GELU multiplies it by x and stays within ~2e-2 absolute. LayerNorm is limited by its
fixed-point output (frac_bits) and integer weights (weight_bits): ~1e-3.

Pre: int tensors (any integer dtype; computed in int64). Scales positive floats small
enough that the integer constants carry precision (S <~ 1e-2 for exp/GELU inputs).
"""

from __future__ import annotations

import math

import torch

# I-BERT's second-order fits: exp(p) ~ A_EXP (p + B_EXP)**2 + C_EXP on p in (-ln 2, 0];
# erf(x) ~ sign(x) (A_ERF (min(|x|, -B_ERF) + B_ERF)**2 + 1).
A_EXP, B_EXP, C_EXP = 0.3585, 1.353, 0.344
A_ERF, B_ERF = -0.2888, -1.769
EXP_MAX_SHIFT = 30  # exp(x) for x < -30 ln 2 is flushed to the value at -30 ln 2 (~1e-9)


def _floordiv(a: torch.Tensor, b) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _round_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """round(a / b) for b > 0, ties towards +inf, integer only."""
    return _floordiv(2 * a + b, 2 * b)


def _bit_length(n: torch.Tensor) -> torch.Tensor:
    """Number of bits of each non-negative int64 (0 for 0), integer only."""
    bits = torch.zeros_like(n)
    for k in range(63):
        bits += (torch.bitwise_right_shift(n, k) > 0).to(n.dtype)
    return bits


def int_sqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) exactly, for non-negative integers (I-BERT Algorithm 4, i-sqrt).

    Newton's iteration x <- floor((x + floor(n / x)) / 2) from x0 = 2**ceil(bits(n) / 2) >=
    sqrt(n); the sequence decreases until it reaches floor(sqrt(n)), where it stops
    decreasing.
    """
    n = n.to(torch.int64)
    if (n < 0).any():
        raise ValueError("int_sqrt needs non-negative integers")
    x = torch.bitwise_left_shift(torch.ones_like(n), _floordiv(_bit_length(n) + 1, 2))
    while True:
        nxt = torch.where(x > 0, _floordiv(x + _floordiv(n, x.clamp(min=1)), 2), x)
        done = nxt >= x
        if bool(done.all()):
            return torch.where(n == 0, torch.zeros_like(x), x)
        x = torch.where(done, x, nxt)


def int_exp(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """exp(q * scale) for q <= 0: (int64 q_out, scale_out). I-BERT Algorithm 2 (i-exp).

    x = -z ln2 + p with z = floor(-x / ln2), p in (-ln2, 0]; exp(x) = 2**-z exp(p), exp(p)
    by the polynomial (integer, with constants floor(b / S) and floor(c / (a S**2))) and
    2**-z by a right shift. (I-BERT shifts left by n - z instead; the right shift keeps a
    row sum of many exps inside int64, at the cost of an absolute floor of about
    scale_out = 0.3585 * scale**2 on tiny values, irrelevant to a softmax.)
    """
    q_ln2 = math.floor(math.log(2.0) / scale)
    if q_ln2 < 1:
        raise ValueError(f"scale {scale} too coarse for i-exp (needs scale < ln 2)")
    q = torch.clamp(q.to(torch.int64), min=-EXP_MAX_SHIFT * q_ln2)
    z = _floordiv(-q, q_ln2)
    p = q + z * q_ln2  # (-q_ln2, 0]
    q_b = math.floor(B_EXP / scale)
    q_c = math.floor(C_EXP / (A_EXP * scale * scale))
    poly = (p + q_b) * (p + q_b) + q_c  # scale A_EXP * S**2
    return torch.bitwise_right_shift(poly, z), A_EXP * scale * scale


def int_softmax(
    q: torch.Tensor, scale: float, dim: int = -1, out_bits: int = 16
) -> tuple[torch.Tensor, float]:
    """softmax(q * scale) along dim: (int64 in [0, 2**out_bits], 2**-out_bits).

    I-BERT Algorithm 2's softmax: subtract the row max (integer), i-exp, then integer
    division by the row sum (rounded) in fixed point with out_bits fractional bits.
    """
    q = q.to(torch.int64)
    e, _ = int_exp(q - q.amax(dim=dim, keepdim=True), scale)
    total = e.sum(dim=dim, keepdim=True)
    return _round_div(e * (1 << out_bits), total), 2.0**-out_bits


def int_erf(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """erf(q * scale): (int64, scale_out) with scale_out < 0 (I-BERT's i-erf, Algorithm 3)."""
    q = q.to(torch.int64)
    q_b = math.floor(B_ERF / scale)  # negative
    q_c = math.floor(1.0 / (A_ERF * scale * scale))  # negative: A_ERF < 0
    mag = torch.clamp(q.abs(), max=-q_b)
    poly = (mag + q_b) * (mag + q_b) + q_c
    return torch.sign(q) * poly, A_ERF * scale * scale


def int_gelu(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """GELU(q * scale) = x (1 + erf(x / sqrt 2)) / 2: (int64, scale_out > 0). I-BERT i-GELU.

    With erf = q_erf * S_erf (S_erf < 0) and q_one = floor(1 / S_erf):
    GELU = q S (q_erf + q_one) S_erf / 2, returned as (-q (q_erf + q_one), -S S_erf / 2).
    """
    q = q.to(torch.int64)
    q_erf, s_erf = int_erf(q, scale / math.sqrt(2.0))
    q_one = math.floor(1.0 / s_erf)
    return -q * (q_erf + q_one), -scale * s_erf / 2.0


def int_layernorm(
    q: torch.Tensor,
    scale: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    frac_bits: int = 12,
    weight_bits: int = 12,
) -> tuple[torch.Tensor, float]:
    """LayerNorm over the last dim with integer statistics and i-sqrt (I-BERT Section 3.5).

    Centering uses xc = C q - sum(q) (exact, no rounded mean), var_C = sum(xc**2) / C, and
    std = i-sqrt(var_C * 4**f) with f chosen from the data's magnitude to keep ~31 bits;
    y = round(xc * 2**(f + frac_bits) / std) is the normalised value in fixed point.
    The affine part uses integer weights round(w * 2**weight_bits) and bias
    round(b * 2**(frac_bits + weight_bits)), precomputed. Returns (int64, scale_out).
    Large inputs are first shifted right (rounded) so that |xc| <= 2**25, which keeps every
    intermediate inside int64 (LayerNorm is scale-invariant; only eps sees the new scale).
    """
    q = q.to(torch.int64)
    c = q.shape[-1]
    if c >= 1 << 20:
        raise ValueError(f"int_layernorm supports at most 2**20 channels, got {c}")
    top_q = int(_bit_length(q.abs().max()).item()) if q.numel() else 0
    u = max(0, top_q + c.bit_length() + 1 - 25)
    if u:
        q = torch.bitwise_right_shift(q + (1 << (u - 1)), u)  # round half up
        scale = scale * 2.0**u
    xc = q * c - q.sum(dim=-1, keepdim=True)  # units scale / C
    var_c = _floordiv((xc * xc).sum(dim=-1, keepdim=True), c)  # units (scale / C)**2 * C**2
    var_c = var_c + round(eps * c * c / (scale * scale))
    top = int(_bit_length(var_c.max()).item()) if var_c.numel() else 0
    f = max(0, (62 - top) // 2 - 1)  # fractional bits of std that still fit in int64
    f = min(f, 62 - frac_bits - 26)  # and keep xc * 2**(f + frac_bits) inside int64
    std = int_sqrt(torch.bitwise_left_shift(var_c, 2 * f)).clamp(min=1)
    y = _round_div(torch.bitwise_left_shift(xc, f + frac_bits), std)  # scale 2**-frac_bits
    if weight is None and bias is None:
        return y, 2.0**-frac_bits
    w = torch.ones(c) if weight is None else weight.detach().double().cpu()
    w_int = torch.round(w * 2.0**weight_bits).to(torch.int64).to(q.device)
    out = y * w_int
    if bias is not None:
        b_int = torch.round(bias.detach().double().cpu() * 2.0 ** (frac_bits + weight_bits))
        out = out + b_int.to(torch.int64).to(q.device)
    return out, 2.0 ** -(frac_bits + weight_bits)


__all__ = ["int_erf", "int_exp", "int_gelu", "int_layernorm", "int_softmax", "int_sqrt"]
