"""Triton kernels for the integer-only non-linear ops of lowering/int_ops.py (I-BERT).

What: gelu_int8 (elementwise), layernorm_int8 (one program per row, the row in
registers), and attention_int8_isoftmax (per block of queries, three sweeps over the keys:
row max of the integer logits, sum of i-exp, then the 16-bit probabilities times V).
Each computes exactly what qcompile/numerics/ibert.py computes, operation for
operation, so the integers are identical (tests/lowering/test_int_ops.py checks it in the
interpreter). All divisions have non-negative operands, where Triton's truncating
integer division equals the floor division of ibert.py.

Why three sweeps for attention: I-BERT's softmax subtracts the row maximum before i-exp
and normalises to fixed point before P V; an online (flash) softmax would rescale
partial sums by exp(m_old - m_new), which is not exact in integers. P V runs as a float32
tl.dot in IEEE mode: P <= 2**16 and |V| <= 128 keep every partial sum an integer below
2**24 (for Sk < 2**17), so it is exact, and tensor cores have no int16 x int8 product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.lowering.device import check_can_launch
from qcompile.lowering.int_ops import isoftmax_constants
from qcompile.lowering.kernels.hadamard import cast_rne
from qcompile.numerics.ibert import (
    EXP_B,
    EXP_C,
    EXP_LN2,
    EXP_MAX_SHIFT,
    ISQRT_STEPS,
    MASKED,
    SOFTMAX_BITS,
    GeluParams,
    LayerNormParams,
    integer_mask,
)


@triton.jit
def _rounding_shift(p, shift):
    """round_half_away(p / 2**shift) for int64 p (numerics.dyadic.rounding_shift)."""
    half = tl.full((), 1, tl.int64) << (shift - 1)
    mag = (tl.abs(p) + half) >> shift
    return tl.where(p < 0, -mag, mag)


# --------------------------------------------------------------------------- GELU


@triton.jit
def _gelu_int8_kernel(
    # pointers
    x_ptr, y_ptr,
    # shapes
    n,
    # integer constants (ibert.GeluParams)
    in_zp, up, q_b, q_c, q_one, q, shift, out_zp, qmin, qmax,
    # meta-parameters
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0).to(tl.int64)
    x = (x - in_zp) << up
    mag = tl.minimum(tl.abs(x), -q_b)
    poly = (mag + q_b) * (mag + q_b) + q_c
    erf = tl.where(x < 0, -poly, tl.where(x > 0, poly, 0))
    g = -x * (erf + q_one)
    y = _rounding_shift(g * q, shift) + out_zp
    y = tl.minimum(tl.maximum(y, qmin), qmax)
    tl.store(y_ptr + offs, y.to(tl.int8), mask=ok)


def gelu_int8_triton(x: torch.Tensor, p: GeluParams) -> torch.Tensor:
    check_can_launch(x)
    x = x.contiguous()
    y = torch.empty_like(x, dtype=torch.int8)
    n, block = x.numel(), 1024
    if n:
        _gelu_int8_kernel[(triton.cdiv(n, block),)](x, y, n, *p, BLOCK=block)
    return y


# --------------------------------------------------------------------------- LayerNorm


@triton.jit
def _isqrt(n, STEPS: tl.constexpr):
    """floor(sqrt(n)), int64 0 <= n < 2**62 (ibert.isqrt: the same steps)."""
    bits = tl.zeros_like(n)
    for step in tl.static_range(6):
        s = 32 >> step
        bits = tl.where((n >> (bits + s - 1)) > 0, bits + s, bits)
    x = tl.full(n.shape, 1, tl.int64) << ((bits + 1) // 2)
    for _ in tl.static_range(STEPS):
        nxt = (x + n // tl.maximum(x, 1)) // 2
        x = tl.minimum(x, nxt)
    return x


@triton.jit
def _layernorm_int8_kernel(
    # pointers
    x_ptr, y_ptr, gamma_ptr, beta_ptr,
    # shapes
    C,
    # integer constants (ibert.LayerNormParams)
    in_zp, eps, f, frac, shift, out_zp, qmin, qmax,
    # meta-parameters
    BLOCK_C: tl.constexpr,
    STEPS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    x = tl.load(x_ptr + row * C + offs, mask=ok, other=0).to(tl.int64) - in_zp
    x = tl.where(ok, x, 0)
    xc = tl.where(ok, x * C - tl.sum(x, axis=0), 0)  # [BLOCK_C], units S / C
    v = tl.sum(xc * xc, axis=0) + eps
    std = tl.maximum(_isqrt(((v << (2 * f)) // C).to(tl.int64), STEPS), 1)
    a = xc << (f + frac)
    mag = (2 * tl.abs(a) + std) // (2 * std)
    y = tl.where(a < 0, -mag, mag)
    g = tl.load(gamma_ptr + offs, mask=ok, other=0)
    b = tl.load(beta_ptr + offs, mask=ok, other=0)
    out = _rounding_shift(y * g + b, shift) + out_zp
    out = tl.minimum(tl.maximum(out, qmin), qmax)
    tl.store(y_ptr + row * C + offs, out.to(tl.int8), mask=ok)


def layernorm_int8_triton(x: torch.Tensor, p: LayerNormParams) -> torch.Tensor:
    check_can_launch(x)
    x = x.contiguous()
    C = x.shape[-1]
    y = torch.empty_like(x, dtype=torch.int8)
    rows = x.numel() // max(C, 1)
    block_c = triton.next_power_of_2(C)
    if rows:
        _layernorm_int8_kernel[(rows,)](
            x, y, p.gamma.to(x.device), p.beta.to(x.device), C, *p[2:],
            BLOCK_C=block_c, STEPS=ISQRT_STEPS, num_warps=min(16, max(1, block_c // 256)),
        )  # fmt: skip
    return y


# --------------------------------------------------------------------------- attention


@triton.jit
def _logits(q, k_base, mask_base, keys, offs_m, offs_d, Sq, Sk, D, qm, sm,
            stride_ks, stride_kd, stride_mq, stride_mk,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """(z, visible): integer logits in units 2**-13 for one key block; hidden keys MASKED."""
    k = tl.load(k_base + keys[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=(keys[:, None] < Sk) & (offs_d[None, :] < D), other=0)  # fmt: skip
    s = tl.dot(q, tl.trans(k)).to(tl.int64)  # [BLOCK_M, BLOCK_N], exact
    z = _rounding_shift(s * qm, sm)
    visible = (keys[None, :] < Sk) & (offs_m[:, None] < Sq)
    if CAUSAL:
        visible = visible & (keys[None, :] <= offs_m[:, None])
    if HAS_MASK:
        m = tl.load(mask_base + offs_m[:, None] * stride_mq + keys[None, :] * stride_mk,
                    mask=visible, other=MASKED_C)  # fmt: skip
        visible = visible & (m > MASKED_C)
        z = z + tl.where(visible, m, 0)
    return tl.where(visible, z, MASKED_C), visible


MASKED_C = tl.constexpr(MASKED)
EXP_LN2_C = tl.constexpr(EXP_LN2)
EXP_B_C = tl.constexpr(EXP_B)
EXP_C_C = tl.constexpr(EXP_C)
EXP_FLOOR_C = tl.constexpr(-EXP_MAX_SHIFT * EXP_LN2)


@triton.jit
def _i_exp(d):
    """ibert.i_exp: exp(d 2**-13) for int64 d <= 0."""
    d = tl.maximum(d, EXP_FLOOR_C)
    z = (-d) // EXP_LN2_C
    p = d + z * EXP_LN2_C
    return ((p + EXP_B_C) * (p + EXP_B_C) + EXP_C_C) >> z


@triton.jit
def _isoftmax_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr,
    mask_ptr,  # int64 logit-unit mask, expanded view [B, Hq, Sq, Sk] (HAS_MASK)
    qm_ptr, sm_ptr,  # int64 [Hq]: dyadic logit multiplier and shift
    os_ptr,  # float32 [Hq]: v_scale * 2**-16
    # shapes
    Hq, Sq, Sk, D, GROUP,
    # strides
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    # meta-parameters
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, SM_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D), other=0)  # fmt: skip
    qm = tl.load(qm_ptr + h)
    sm = tl.load(sm_ptr + h)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    # sweep 1: the row maximum of the visible logits
    m_i = tl.full((BLOCK_M,), MASKED_C, tl.int64)
    for start in range(0, hi, BLOCK_N):
        z, _ = _logits(q, k_base, mask_base, start + offs_n, offs_m, offs_d, Sq, Sk, D, qm, sm,
                       stride_ks, stride_kd, stride_mq, stride_mk, CAUSAL, HAS_MASK)
        m_i = tl.maximum(m_i, tl.max(z, axis=1))
    # sweep 2: the row sum of i-exp
    l_i = tl.zeros((BLOCK_M,), tl.int64)
    for start in range(0, hi, BLOCK_N):
        z, visible = _logits(q, k_base, mask_base, start + offs_n, offs_m, offs_d, Sq, Sk, D,
                             qm, sm, stride_ks, stride_kd, stride_mq, stride_mk, CAUSAL,
                             HAS_MASK)  # fmt: skip
        e = tl.where(visible, _i_exp(tl.minimum(z - m_i[:, None], 0)), 0)
        l_i += tl.sum(e, axis=1)
    # sweep 3: probabilities rounded to SM_BITS bits, times V (exact in float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    denom = tl.maximum(l_i, 1)[:, None]
    for start in range(0, hi, BLOCK_N):
        keys = start + offs_n
        z, visible = _logits(q, k_base, mask_base, keys, offs_m, offs_d, Sq, Sk, D, qm, sm,
                             stride_ks, stride_kd, stride_mq, stride_mk, CAUSAL, HAS_MASK)
        e = tl.where(visible, _i_exp(tl.minimum(z - m_i[:, None], 0)), 0)
        p = (2 * (e << SM_BITS) + denom) // (2 * denom)
        p = tl.where(l_i[:, None] > 0, p, 0)
        v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=(keys[:, None] < Sk) & (offs_d[None, :] < D), other=0)  # fmt: skip
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    out = acc * tl.load(os_ptr + h)
    o_ptrs = (o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
              + offs_d[None, :] * stride_od)  # fmt: skip
    tl.store(o_ptrs, cast_rne(out, o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D))


def isoftmax_attention_triton(q, k, v, q_scale, k_scale, v_scale, attn_mask, causal, sm_scale,
                              out_dtype, block_m=16, block_n=32):  # fmt: skip
    from qcompile.lowering.kernels.attention import _check

    check_can_launch(q)
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if D > 256 or Sk >= 1 << 17:
        raise ValueError(f"integer-softmax attention supports D <= 256 and Sk < 2**17 (P V "
                         f"exact in float32), got D={D}, Sk={Sk}")
    cst = isoftmax_constants(q, k, q_scale, k_scale, v_scale, sm_scale)
    qm, sm, osc = (t.to(q.device) for t in (cst.q, cst.shift, cst.out_scale))
    mask = integer_mask(attn_mask, (B, Hq, Sq, Sk), q.device)
    out = torch.empty((B, Hq, Sq, D), dtype=out_dtype, device=q.device)
    block_d = max(32, triton.next_power_of_2(D))  # int8 mma wants K >= 32
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    if out.numel():
        grid = (triton.cdiv(Sq, block_m), B * Hq)
        _isoftmax_attention_kernel[grid](
            q, k, v, out, mask if mask is not None else qm, qm, sm, osc,
            Hq, Sq, Sk, D, cst.group,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ms,
            CAUSAL=causal, HAS_MASK=mask is not None, SM_BITS=SOFTMAX_BITS,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out
