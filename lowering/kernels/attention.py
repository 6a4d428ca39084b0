"""Quantized attention in one fused kernel (flash-attention tiling, online softmax).

What: out = softmax(sm_scale * Q K^T + mask) V for int8 Q [B, Hq, Sq, D], K and V
[B, Hkv, Sk, D] with float scales (per tensor, or per head: q_scale [Hq], k_scale and
v_scale [Hkv]); Hq a multiple of Hkv (grouped-query attention: q head h reads kv head
h // (Hq // Hkv)). Output float [B, Hq, Sq, D].

How, per (batch, q head, block of BLOCK_M queries), over key blocks of BLOCK_N:
- S = Q K^T in int32 with tl.dot on int8 (exact: |S| <= D * 2**14);
- logits in log2 units, t = S * c[h] + mask * log2(e), where the one float multiplier
  c[h] = q_scale * k_scale * sm_scale * log2(e) folds the dequantization and the softmax
  scale (computed once on the host in float64);
- online softmax with a running max and sum (exp2), rescaling the accumulator;
- P V with P rounded to float16 (probabilities in [0, 1], 11-bit mantissa) and V's int8
  codes converted to float16 (exact), float32 accumulation on tensor cores; v_scale is
  applied once at the end. Choice: P as float16 rather than uint8 with scale 1/255 keeps
  the per-probability error at 2**-11 relative instead of 1/510 absolute, which matters
  for peaked rows, at the same tensor-core speed (f16 x f16 vs s8 x s8 is 2x, but P V is
  half the FLOPs of attention and the softmax dominates at these sizes anyway).

Masks: causal (top-left aligned as torch SDPA's is_causal: query i sees keys j <= i), an
additive float or boolean (True = keep, as SDPA) attn_mask broadcastable to
[B, Hq, Sq, Sk], and key_padding_mask bool [B, Sk] (True = padding, ignored, as
nn.MultiheadAttention). A query row with no visible key gives 0 (SDPA gives NaN).

Pre: q, k, v int8 with last dim contiguous or not (strides are passed), D <= 256.
Post: close to `quantized_attention_ref` (float64 softmax of the same integer logits):
only P's float16 rounding and float32 summation differ.

Which implementation a graph runs (this kernel, float SDPA on the CPU, the reference) is
the op registry's choice: lowering/ops.py, `attention_int8`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qcompile.lowering.device import check_can_launch, triton_target
from qcompile.lowering.kernels.hadamard import cast_rne

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- Triton


@triton.jit
def _attention_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    mask_ptr,  # float32 additive mask, expanded view [B, Hq, Sq, Sk] (HAS_MASK)
    kpm_ptr,  # int8 key padding [B, Sk], 1 = ignore (HAS_KPM)
    c_ptr,  # float32 [Hq]: q_scale * k_scale * sm_scale * log2(e)
    vs_ptr,  # float32 [Hq]: v_scale of the q head's kv head
    # shapes
    Hq,
    Sq,
    Sk,
    D,
    GROUP,  # Hq // Hkv
    # strides
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_pb, stride_pk,
    # meta-parameters
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < D

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh
        + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Sq) & mask_d, other=0,
    )  # int8 [BLOCK_M, BLOCK_D]  # fmt: skip
    c = tl.load(c_ptr + h)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Causal (top-left): no key beyond the block's last query is visible.
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + offs_n  # [BLOCK_N]
        kv_mask = (keys[:, None] < Sk) & mask_d
        k = tl.load(
            k_base + keys[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0
        )  # int8 [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k))  # int32 [BLOCK_M, BLOCK_N], exact
        t = s.to(tl.float32) * c
        if HAS_MASK:
            mvals = tl.load(
                mask_ptr + b * stride_mb + h * stride_mh
                + offs_m[:, None] * stride_mq + keys[None, :] * stride_mk,
                mask=(offs_m[:, None] < Sq) & (keys[None, :] < Sk), other=0.0,
            )  # fmt: skip
            t = t + mvals * 1.4426950408889634
        visible = keys[None, :] < Sk
        if CAUSAL:
            visible = visible & (keys[None, :] <= offs_m[:, None])
        if HAS_KPM:
            pad = tl.load(kpm_ptr + b * stride_pb + keys * stride_pk, mask=keys < Sk, other=1)
            visible = visible & (pad[None, :] == 0)
        t = tl.where(visible, t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead (exp2(-inf) = 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(t - m_use[:, None])  # [BLOCK_M, BLOCK_N] in [0, 1]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + keys[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0
        )  # int8 [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
        m_i = m_new
    vs = tl.load(vs_ptr + h)
    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0) * vs
    o_ptrs = (
        o_ptr + b * stride_ob + h * stride_oh
        + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    )  # fmt: skip
    tl.store(o_ptrs, cast_rne(out, o_ptr.dtype.element_ty), mask=(offs_m[:, None] < Sq) & mask_d)


# --------------------------------------------------------------------------- host side


def _per_head(scale, heads: int, name: str) -> torch.Tensor:
    """A per-tensor (scalar) or per-head [heads] scale as float64 [heads] on the CPU."""
    t = torch.as_tensor(scale, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        return t.expand(heads).clone()
    if t.numel() != heads:
        raise ValueError(f"{name} must be a scalar or have {heads} elements, got {t.numel()}")
    return t


def token_major(shape, dtype, device=None) -> torch.Tensor:
    """An empty [B, H, S, D] tensor in the [B, S, H, D] memory layout: what a quantized
    attention's int8 output is written in, so that the output projection's
    transpose(1, 2).reshape(B, S, H * D) is a view."""
    b, h, s, d = shape
    return torch.empty((b, s, h, d), dtype=dtype, device=device).transpose(1, 2)


def _check(q, k, v):
    if q.dtype != torch.int8 or k.dtype != torch.int8 or v.dtype != torch.int8:
        raise TypeError(
            f"quantized attention takes int8 q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"need q [B, Hq, Sq, D], k = v [B, Hkv, Sk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    (bq, hq, _, d), (bk, hkv, _, dk) = q.shape, k.shape
    if bq != bk or d != dk or hq % hkv:
        raise ValueError(f"batch and head dim must match and Hq % Hkv == 0; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")  # fmt: skip


def _scales(q, k, q_scale, k_scale, v_scale, sm_scale):
    """(c [Hq], vs [Hq], group): per-q-head logit multiplier (log2 units) and v scale."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    group = hq // hkv
    kv_of = torch.arange(hq) // group
    sm = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    qs = _per_head(q_scale, hq, "q_scale")
    ks = _per_head(k_scale, hkv, "k_scale")[kv_of]
    vs = _per_head(v_scale, hkv, "v_scale")[kv_of]
    return qs * ks * sm, vs, group


def _additive_mask(attn_mask, shape, device):
    """attn_mask (float additive or bool keep) -> float32 expanded to shape, or None."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), device=attn_mask.device)
        attn_mask = torch.where(attn_mask, zero, torch.full((), float("-inf"), device=device))
    return attn_mask.to(device=device, dtype=torch.float32).expand(shape)


def quantized_attention_triton(
    q, k, v, q_scale, k_scale, v_scale, *, causal=False, attn_mask=None,
    key_padding_mask=None, sm_scale=None, out_dtype=torch.float16, block_m=None, block_n=None,
):  # fmt: skip
    check_can_launch(q)
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported by the fused kernel")
    c, vs, group = _scales(q, k, q_scale, k_scale, v_scale, sm_scale)
    c = (c * LOG2E).to(torch.float32).to(q.device)
    vs = vs.to(torch.float32).to(q.device)
    mask = _additive_mask(attn_mask, (B, Hq, Sq, Sk), q.device)
    kpm = None if key_padding_mask is None else key_padding_mask.to(q.device, torch.int8)
    out = torch.empty((B, Hq, Sq, D), dtype=out_dtype, device=q.device)
    block_d = max(32, triton.next_power_of_2(D))  # int8 mma wants K >= 32
    block_m = block_m or (64 if triton_target() == "cuda" else 16)
    block_n = block_n or (64 if triton_target() == "cuda" else 16)
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    ps = kpm.stride() if kpm is not None else (0, 0)
    grid = (triton.cdiv(Sq, block_m), B * Hq)
    if out.numel():
        _attention_kernel[grid](
            q, k, v, out, mask if mask is not None else c, kpm if kpm is not None else c, c, vs,
            Hq, Sq, Sk, D, group,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ms, *ps,
            CAUSAL=causal, HAS_MASK=mask is not None, HAS_KPM=kpm is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=4 if block_d <= 64 else 8,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- torch


def quantized_attention_ref(
    q, k, v, q_scale, k_scale, v_scale, *, causal=False, attn_mask=None,
    key_padding_mask=None, sm_scale=None, out_dtype=torch.float16,
):  # fmt: skip
    """The definition, in float64: softmax(S * q_scale * k_scale * sm_scale + mask) (V *
    v_scale), S = Q K^T of the int8 codes; rows with no visible key give 0."""
    _check(q, k, v)
    dtype = torch.float64
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    c, vs, group = _scales(q, k, q_scale, k_scale, v_scale, sm_scale)
    kf = k.to(dtype).repeat_interleave(group, dim=1)  # [B, Hq, Sk, D]
    vf = v.to(dtype).repeat_interleave(group, dim=1)
    s = q.to(dtype) @ kf.transpose(-1, -2)  # [B, Hq, Sq, Sk], exact integers
    t = s * c.to(dtype=dtype, device=q.device)[None, :, None, None]
    mask = _additive_mask(attn_mask, (B, Hq, Sq, Sk), q.device)
    if mask is not None:
        t = t + mask.to(dtype)
    visible = torch.ones((B, Hq, Sq, Sk), dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.to(q.device, torch.bool)[:, None, None, :]
    t = t.masked_fill(~visible, float("-inf"))
    # no key at all (Sk = 0): every row is empty, and amax needs a non-empty dim
    row_max = t.amax(dim=-1, keepdim=True) if Sk else t.new_zeros((B, Hq, Sq, 1))
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(t - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = torch.where(denom > 0, p / denom, torch.zeros_like(p))  # empty rows -> 0
    out = (p @ vf) * vs.to(dtype=dtype, device=q.device)[None, :, None, None]
    return out.to(out_dtype)
