"""Low-bit weight GEMMs: W4A16 (float activations) and W4A8 (int8 activations).

What, for x [M, K] and a weight W [N, K] stored as int4 packed two per byte along K
(qcompile.numerics.specs.pack_int4: byte i = w[2i] & 0xF | (w[2i+1] & 0xF) << 4):
- `w4a16_gemm_*(x, w_packed, scales, zeros, group_size, bias)`: y = x @ deq(W)^T with
  deq(W)[n, k] = (w[n, k] - zeros[n, g]) * scales[n, g], g = k // group_size, computed in
  float32 exactly as specs.dequantize, then rounded to x.dtype (the tensor-core operand
  type) before the product; float32 accumulation; + bias; one cast to x.dtype.
- `w4a8_gemm_requant_*(x, w_packed, q, shift, zero_point, bias)`: acc = x @ W^T in int32
  (exact), + int32 bias, then the dyadic contract (integer only) to int8.
- `w4a8_gemm_dequant_*(x, w_packed, x_scale, w_scale, bias, out_dtype)`: the float epilogue
  ((float32(acc) * x_scale[m]) * w_scale[n]) + bias[n], one cast: the op order of the
  int8 GEMM (lowering/reference.py), so the two agree.

Why: int4 weights halve the bytes an int8 GEMM reads; decode (M = 1..16) is bound by
reading W, so W4A16 is mostly about streaming packed bytes at full bandwidth.

How the kernels unpack: a packed tile [BLOCK_N, BLOCK_K / 2] gives the low nibbles (even
k) and the high nibbles (odd k) as two tiles, and x is loaded as its even and odd columns,
so acc += x_even @ lo^T + x_odd @ hi^T: two tl.dot calls and no interleave shuffle.

Limits: group_size even and dividing K; this W4A8 kernel has per-channel weight scales only
(float group scales would need one integer accumulator per group; the group-wise W4A8 that
qcompile runs, lowering/ops.py's `linear_w4a8_grouped`, puts integer multipliers of the row
scale into the weight instead and runs the int8 GEMM on (q - zero point) * mult). int8 x
int4 products are at most 2**10, so the int32 accumulator is exact for K < 2**21.

Each op has `<op>_ref` (pure torch, exact int64 accumulation for the integer ops) and
`<op>_triton`; W4A16 also has `w4a16_gemm_cpu` (dequantize, float32 matmul). Which one a
graph runs is the op registry's choice (lowering/ops.py: `linear_w4a16`, `linear_w4a8`,
whose CPU implementations run the int4 values through the int8 CPU GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.lowering.device import check_can_launch, triton_target
from qcompile.lowering.kernels.hadamard import cast_rne
from qcompile.lowering.kernels.quantize import requantize_value
from qcompile.numerics import specs
from qcompile.numerics.dyadic import requantize

MAX_K_W4A8 = (1 << 21) - 1  # 2**10 * K < 2**31
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# --------------------------------------------------------------------------- Triton


def interpreter_dot_upcast(dtype: torch.dtype) -> bool:
    """Whether bfloat16 dot operands must be widened to float32 first.

    The Triton interpreter multiplies the raw uint16 storage of bfloat16 operands (its
    numpy has no bfloat16), so under it we widen them: bf16 -> f32 is exact and the products
    are the same, only the float32 summation order can differ from the GPU's.
    """
    return dtype == torch.bfloat16 and triton_target() == "interpreter"


@triton.jit
def float_dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation (see interpreter_dot_upcast for UPCAST)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _unpack_nibbles(packed):
    """uint8 [.., .] -> (low, high) signed int4 values as int32 (two's complement)."""
    p = packed.to(tl.int32)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    return lo - ((lo & 0x8) << 1), hi - ((hi & 0x8) << 1)


@triton.jit
def _w4a16_kernel(
    # pointers
    x_ptr,
    w_ptr,  # uint8 [N, K // 2]
    s_ptr,  # scales [N, K // G]
    z_ptr,  # zero points int8 [N, K // G] (HAS_ZEROS)
    b_ptr,  # bias [N] (HAS_BIAS)
    y_ptr,  # [M, N]: x.dtype, or float32 when SPLIT_K > 1 (atomically accumulated)
    # shapes
    M,
    N,
    K,
    G,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_ym,
    stride_yn,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,  # float32 activations: no tf32 rounding in the dot
    UPCAST: tl.constexpr,  # interpreter_dot_upcast
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # in unpacked elements; the tile reads BLOCK_K // 2 bytes a row
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = BLOCK_K // 2
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_b = tl.arange(0, HALF)  # byte index within the tile
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(pid_k * HALF, K // 2, HALF * SPLIT_K):
        kb = b0 + offs_b  # [HALF] byte index, elements 2 kb and 2 kb + 1
        kmask = kb[None, :] < K // 2
        packed = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + kb[None, :] * stride_wk,
            mask=mask_n & kmask,
            other=0,
        )  # [BLOCK_N, HALF]
        lo, hi = _unpack_nibbles(packed)
        group = (2 * kb) // G  # both nibbles of a byte share a group (G even)
        s = tl.load(
            s_ptr + offs_n[:, None] * stride_sn + group[None, :] * stride_sg,
            mask=mask_n & kmask,
            other=0.0,
        ).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(
                z_ptr + offs_n[:, None] * stride_sn + group[None, :] * stride_sg,
                mask=mask_n & kmask,
                other=0,
            ).to(tl.int32)
            lo = lo - z
            hi = hi - z
        # specs.dequantize: (q - z) * s in float32, then the operand rounding to x.dtype.
        w_lo = cast_rne(lo.to(tl.float32) * s, DOT_DTYPE)
        w_hi = cast_rne(hi.to(tl.float32) * s, DOT_DTYPE)
        x_base = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_base + (2 * kb[None, :]) * stride_xk, mask=mask_m & kmask, other=0.0)
        x_odd = tl.load(x_base + (2 * kb[None, :] + 1) * stride_xk, mask=mask_m & kmask, other=0.0)
        acc = float_dot(x_even, tl.trans(w_lo), acc, IEEE, UPCAST)
        acc = float_dot(x_odd, tl.trans(w_hi), acc, IEEE, UPCAST)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if pid_k == 0:  # split-K: only one slice adds the bias
            acc = acc + bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = mask_m & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@triton.jit
def _w4a8_kernel(
    # pointers
    x_ptr,  # int8 [M, K]
    w_ptr,  # uint8 [N, K // 2]
    b_ptr,  # int32 bias [N] (REQUANT) or float bias [N] (dequant), if HAS_BIAS
    q_ptr,  # REQUANT: int64 multipliers [N] or [1]; else x_scale float32 [M]
    r_ptr,  # REQUANT: int64 shifts [N] or [1]; else w_scale float32 [N]
    y_ptr,
    # shapes and parameters
    M,
    N,
    K,
    zero_point,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    # meta-parameters
    REQUANT: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_b = tl.arange(0, HALF)
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for b0 in range(0, K // 2, HALF):
        kb = b0 + offs_b
        kmask = kb[None, :] < K // 2
        packed = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + kb[None, :] * stride_wk,
            mask=mask_n & kmask,
            other=0,
        )  # [BLOCK_N, HALF]
        lo, hi = _unpack_nibbles(packed)
        x_base = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_base + (2 * kb[None, :]) * stride_xk, mask=mask_m & kmask, other=0)
        x_odd = tl.load(x_base + (2 * kb[None, :] + 1) * stride_xk, mask=mask_m & kmask, other=0)
        acc = tl.dot(x_even, tl.trans(lo.to(tl.int8)), acc, out_dtype=tl.int32)  # exact
        acc = tl.dot(x_odd, tl.trans(hi.to(tl.int8)), acc, out_dtype=tl.int32)
    mask_c = offs_n < N
    if REQUANT:  # integer only from here on
        acc64 = acc.to(tl.int64)
        if HAS_BIAS:
            acc64 = acc64 + tl.load(b_ptr + offs_n, mask=mask_c, other=0).to(tl.int64)[None, :]
        if PER_CHANNEL:
            q = tl.load(q_ptr + offs_n, mask=mask_c, other=0)[None, :]
            shift = tl.load(r_ptr + offs_n, mask=mask_c, other=1)[None, :]
        else:
            q = tl.load(q_ptr)
            shift = tl.load(r_ptr)
        out = requantize_value(acc64, q, shift, zero_point, QMIN, QMAX).to(tl.int8)
    else:
        x_scale = tl.load(q_ptr + offs_m, mask=offs_m < M, other=0.0)
        w_scale = tl.load(r_ptr + offs_n, mask=mask_c, other=0.0)
        out = (acc.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
        if HAS_BIAS:
            out = out + tl.load(b_ptr + offs_n, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        out = cast_rne(out, y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, out, mask=mask_m & (offs_n[None, :] < N))


def _check_weight(x, w_packed):
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(
            f"w_packed must be uint8 [N, K // 2], got {w_packed.dtype} {w_packed.dim()}-d"
        )
    if x.dim() != 2 or x.shape[1] != 2 * w_packed.shape[1]:
        raise ValueError(
            f"x must be [M, K] with K = 2 * w_packed.shape[1]; got x {tuple(x.shape)}, "
            f"w_packed {tuple(w_packed.shape)}"
        )
    if x.device != w_packed.device:
        raise ValueError(f"x on {x.device} but w_packed on {w_packed.device}")


def _check_groups(k, scales, zeros, group_size):
    n_groups = k // group_size if group_size and k % group_size == 0 else None
    if group_size is None or group_size % 2 or n_groups is None:
        raise ValueError(f"group_size must be even and divide K = {k}, got {group_size}")
    if scales.dim() != 2 or scales.shape[1] != n_groups:
        raise ValueError(
            f"scales must be [N, K // group_size = {n_groups}], got {tuple(scales.shape)}"
        )
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype.is_floating_point):
        raise ValueError("zeros must be an integer tensor shaped like scales")


BLOCK_K_FMA = 16


def w4a16_config(m: int, n: int, k: int, dtype: torch.dtype = torch.float16) -> dict:
    """Launch config for (M, N, K) and the activations' dtype: decode shapes split K to fill
    the GPU with programs.

    A heuristic, not tuned on hardware yet; bench/bench_w4.py sweeps alternatives.
    float32 activations take the exact FMA dot (IEEE, no tensor cores), which holds each
    thread's rows of x and columns of w for the whole K step in registers: BLOCK_K = 128
    spilled 16-20 KB a thread at M = 128 (sm_80 and sm_90), BLOCK_K_FMA does not.
    """
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if m <= 16 else 64
    block_k = 128 if k % 128 == 0 else 32
    if dtype == torch.float32:
        block_k = min(block_k, BLOCK_K_FMA)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while tiles * split_k < 256 and k // (block_k * split_k * 2) >= 4 and split_k < 16:
        split_k *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4)


def w4a16_gemm_triton(x, w_packed, scales, zeros=None, group_size=128, bias=None, config=None):
    check_can_launch(x)
    _check_weight(x, w_packed)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"w4a16 takes float16/bfloat16/float32 activations, got {x.dtype}")
    (m, k), n = x.shape, w_packed.shape[0]
    _check_groups(k, scales, zeros, group_size)
    cfg = dict(config or w4a16_config(m, n, k, x.dtype))
    split_k = cfg["SPLIT_K"]
    y = (torch.zeros if split_k > 1 else torch.empty)(
        (m, n), dtype=torch.float32 if split_k > 1 else x.dtype, device=x.device
    )
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    if m and n:
        _w4a16_kernel[grid](
            x, w_packed, scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, y,
            m, n, k, group_size,
            x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
            scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
            DOT_DTYPE=_TL_DTYPES[x.dtype], HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
            UPCAST=interpreter_dot_upcast(x.dtype), **cfg,
        )  # fmt: skip
    return y.to(x.dtype) if split_k > 1 else y


def _w4a8_launch(
    x, w_packed, bias, a, b, out, zero_point, requant, per_channel, qmin, qmax, config
):
    check_can_launch(x)
    (m, k), n = x.shape, w_packed.shape[0]
    cfg = dict(config or dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=128, num_warps=4))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    if m and n:
        _w4a8_kernel[grid](
            x, w_packed, bias if bias is not None else a, a, b, out, m, n, k, int(zero_point),
            x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
            out.stride(0), out.stride(1),
            REQUANT=requant, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
            QMIN=qmin, QMAX=qmax, enable_fp_fusion=False, **cfg,
        )  # fmt: skip
    return out


def _check_w4a8(x, w_packed):
    _check_weight(x, w_packed)
    if x.dtype != torch.int8:
        raise TypeError(f"w4a8 takes int8 activations, got {x.dtype}")
    if x.shape[1] > MAX_K_W4A8:
        raise ValueError(f"K = {x.shape[1]} overflows the int32 accumulator (max {MAX_K_W4A8})")


def w4a8_gemm_requant_triton(
    x, w_packed, q, shift, zero_point=0, bias=None, qmin=-128, qmax=127, config=None
):
    _check_w4a8(x, w_packed)
    q_t = torch.as_tensor(q, dtype=torch.int64, device=x.device).reshape(-1)
    s_t = torch.as_tensor(shift, dtype=torch.int64, device=x.device).reshape(-1)
    n = w_packed.shape[0]
    per_channel = q_t.numel() != 1
    if per_channel and (q_t.numel() != n or s_t.numel() != n):
        raise ValueError(f"per-channel q/shift must have N = {n} elements")
    if bias is not None and bias.dtype != torch.int32:
        raise TypeError(f"the requantizing epilogue takes an int32 bias, got {bias.dtype}")
    out = torch.empty((x.shape[0], n), dtype=torch.int8, device=x.device)
    return _w4a8_launch(x, w_packed, bias, q_t, s_t, out, zero_point, True, per_channel,
                        qmin, qmax, config)  # fmt: skip


def w4a8_gemm_dequant_triton(
    x, w_packed, x_scale, w_scale, bias=None, out_dtype=torch.float16, config=None
):
    _check_w4a8(x, w_packed)
    m, n = x.shape[0], w_packed.shape[0]
    xs = x_scale.to(torch.float32).reshape(m).contiguous()
    ws = w_scale.to(torch.float32).reshape(n).contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    return _w4a8_launch(x, w_packed, bias, xs, ws, out, 0, False, False, 0, 0, config)


# --------------------------------------------------------------------------- torch


def dequantize_w4(w_packed, scales, zeros=None, group_size=128):
    """deq(W) float32 [N, K] through specs.dequantize (per-group spec)."""
    q = specs.unpack_int4(w_packed)  # int8 [N, K]
    _check_groups(q.shape[1], scales, zeros, group_size)
    spec = specs.QuantSpec(bits=4, symmetric=zeros is None, granularity="per_group",
                           group_size=group_size)  # fmt: skip
    z = zeros if zeros is not None else torch.zeros(scales.shape, dtype=torch.int32)
    return specs.dequantize(q, scales, z.to(q.device), spec)


def w4a16_gemm_ref(x, w_packed, scales, zeros=None, group_size=128, bias=None):
    """float64 x @ deq(W).to(x.dtype)^T (+ bias), cast once to x.dtype."""
    w = dequantize_w4(w_packed, scales, zeros, group_size).to(x.dtype)  # operand rounding
    y = x.to(torch.float64) @ w.to(torch.float64).T
    if bias is not None:
        y = y + bias.to(torch.float32).to(torch.float64)
    return y.to(x.dtype)


def _unpack_int4_fast(w_packed):
    """specs.unpack_int4 with int8 shifts only (4x faster on CPU): the low nibble is
    sign-extended by shifting it to the top of the byte and back (arithmetic shift)."""
    u = w_packed.view(torch.int8)
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(u, 4), 4)
    hi = torch.bitwise_right_shift(u, 4)
    return torch.stack((lo, hi), dim=-1).reshape(w_packed.shape[0], -1)  # [N, K]


def w4a16_gemm_cpu(x, w_packed, scales, zeros=None, group_size=128, bias=None):
    """Dequantize (same float32 arithmetic as specs.dequantize, in place, per group by
    broadcasting instead of repeat_interleave) and multiply in float32."""
    _check_weight(x, w_packed)
    (n, k), g = (w_packed.shape[0], x.shape[1]), group_size
    _check_groups(k, scales, zeros, g)
    w = _unpack_int4_fast(w_packed).view(n, k // g, g).to(torch.float32)  # [N, G, g]
    if zeros is not None:
        w.sub_(zeros.to(torch.float32)[:, :, None])
    w.mul_(scales.to(torch.float32)[:, :, None])
    w = w.view(n, k)
    if x.dtype != torch.float32:
        w = w.to(x.dtype).to(torch.float32)  # the kernel's operand rounding
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def w4a8_acc_ref(x, w_packed):
    """Exact int64 x @ W^T for int8 x [M, K] and packed int4 W [N, K // 2]."""
    return x.to(torch.int64) @ specs.unpack_int4(w_packed).to(torch.int64).T


def _requant_epilogue(acc, q, shift, zero_point, bias, qmin, qmax):
    acc = acc.to(torch.int64) + (bias.to(torch.int64) if bias is not None else 0)
    return requantize(acc, q, shift, zero_point, qmin, qmax)


def _dequant_epilogue(acc, x_scale, w_scale, bias, out_dtype):
    y = (acc.to(torch.float32) * x_scale.float()[:, None]) * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def w4a8_gemm_requant_ref(x, w_packed, q, shift, zero_point=0, bias=None, qmin=-128, qmax=127):
    """dyadic.requantize(x @ W^T + bias) with the exact int64 accumulator."""
    return _requant_epilogue(w4a8_acc_ref(x, w_packed), q, shift, zero_point, bias, qmin, qmax)


def w4a8_gemm_dequant_ref(x, w_packed, x_scale, w_scale, bias=None, out_dtype=torch.float16):
    """((float32(acc) * x_scale[m]) * w_scale[n]) + bias[n], one cast."""
    return _dequant_epilogue(w4a8_acc_ref(x, w_packed), x_scale, w_scale, bias, out_dtype)
