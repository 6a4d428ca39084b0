"""Activation quantization kernels: static per-tensor, dyadic requantization, dynamic
per-token, per-token after an online Hadamard transform, and int4 per token in scaled groups.

What, for x [..., K]:
- `quantize_per_tensor_*(x, scale, zp)`: q = clamp(round(x / scale) + zp), float scale
  (static, calibrated). Same arithmetic as qcompile.numerics.specs.quantize: float32
  IEEE division by the float32 scale, round half to even. `quantize_int16_triton` is the
  same kernel writing int16, zero point 0 (the int16 activations of lowering/a16_ops.py).
- `requantize_int_*(acc, q, shift, zp)`: int32 -> int8 by the dyadic contract
  (qcompile.numerics.dyadic.requantize), in int64 integer arithmetic only.
- `quantize_per_token_*(x, clip)`: symmetric dynamic per-row quantization in one pass over
  x: scale[m] = max((absmax(x[m]) * clip) / qmax, eps) exactly as
  specs.dynamic_per_token_qparams (clip a float32; 1.0, the default, multiplies exactly:
  no clipping), then q as above. Returns (int8 [..., K], float32 scale [...]).
- `quantize_per_token_asym_*(x, clip)`: the same with an asymmetric spec: each row's
  [min, max] (times clip, stretched to include 0) onto [qmin, qmax] with a zero point per
  row, as specs.dynamic_per_token_qparams; returns (int8, float32 scale, int32 zero point).
- `quantize_per_token_int4_packed_*(x, clip, symmetric)`: quantize_per_token (or its
  asymmetric form) at 4 bits, the values packed two per byte along K as they are made
  (specs.pack_int4's layout): what the packed W4A4 GEMM reads (lowering/kernels/gemm_w4a4.py).
- `hadamard_quantize_per_token_*(x)`: quantize_per_token(H x / sqrt(K)) fused: the row is
  rotated in registers (lowering/kernels/hadamard.py) and never written in float.
- `quantize_int4_groups_triton(x, group, clip)`: int4 per token in groups of `group` along
  K, each group's step the row's scale times an integer multiplier m in [1, 15]: a[g] =
  max|x[g]| * clip, s = max(max_g a[g] / 105, eps), m[g] = clamp(ceil(a[g] / (s * 7)), 1,
  15), v = clamp(round(x / (s * m[g])), -8, 7) * m[g]; returns (int8 v [..., K], float32 s
  [...]). Its definition (the reference the tests compare with) is the op's torch body,
  lowering/a4_ops.py `_int4_groups_body`.

Why: these sit in front of every integer GEMM; fusing absmax, scale and rounding (and the
rotation) into one read of x keeps them memory-bound at one pass.

Rounding inside the kernels is done on |y| with floor and an explicit tie test, because
Triton has no portable rint and the (y + 0.5) trick is wrong just below 0.5. Division is
tl.math.div_rn (IEEE), not `/`, which compiles to the approximate div.full.f32 on NVIDIA.

Every kernel has `<op>_triton` (CUDA or the interpreter) and `<op>_ref` (pure torch, the
definition); their integer outputs are bit-identical. Which implementation a graph runs is
the op registry's choice (lowering/ops.py: `quantize`, and the per-token step of
`linear_dynamic`; lowering/a4_ops.py: `quantize_per_token_int4`), never this module's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.lowering.device import check_can_launch
from qcompile.lowering.kernels.hadamard import (
    hadamard_launch_meta,
    hadamard_tile,
    hadamard_transform_cpu,
    norm_factor,
    small_hadamard,
)
from qcompile.numerics import specs
from qcompile.numerics.dyadic import check_multiplier, check_output_range, requantize

SCALE_EPS = specs.SCALE_EPS
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ONE_PASS_MAX_K = 16384  # longest row quantize_per_token holds in registers
# quantize_int4_groups: q in [-8, 7], a group's multiplier in [1, 15], so |q * m| <= 120
_GROUP_QMAX = 7
_GROUP_MULT_MAX = 15


def _range(bits: int) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 storage), got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check_float(x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a float16/bfloat16/float32 activation, got {x.dtype}")


# --------------------------------------------------------------------------- Triton


@triton.jit
def round_half_even(y):
    """round(y) for float32 y, ties to even, exact for every finite y (as torch.round)."""
    a = tl.abs(y)
    r = tl.floor(a)
    d = a - r  # exact: r <= a < r + 1, and r >= a / 2 when a >= 1
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)
    return tl.where(y < 0, -r, r)


@triton.jit
def quantize_float(x, scale, zero_point, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """clamp(round(x / scale) + zp) for float32 x, as specs.quantize: a float32 integer."""
    q = round_half_even(tl.math.div_rn(x, scale)) + zero_point
    return tl.minimum(tl.maximum(q, QMIN), QMAX)


@triton.jit
def quantize_value(x, scale, zero_point, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """int8 clamp(round(x / scale) + zp) for float32 x, as specs.quantize."""
    return quantize_float(x, scale, zero_point, QMIN, QMAX).to(tl.int8)


@triton.jit
def _quantize_per_tensor_kernel(
    # pointers
    x_ptr,
    q_ptr,  # int8 or int16
    # shapes and parameters
    M,
    K,
    scale,  # float32
    zero_point,
    # strides
    stride_xm,
    stride_xk,
    stride_qm,
    stride_qk,
    # meta-parameters
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    offs_k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)[None, :]
    mask = (offs_m < M) & (offs_k < K)
    x = tl.load(x_ptr + offs_m * stride_xm + offs_k * stride_xk, mask=mask).to(tl.float32)
    q = quantize_float(x, scale, zero_point, QMIN, QMAX)  # int zp promotes to float32
    q = q.to(q_ptr.dtype.element_ty)  # exact: an integer within the storage's range
    tl.store(q_ptr + offs_m * stride_qm + offs_k * stride_qk, q, mask=mask)


@triton.jit
def requantize_value(acc, q, shift, zero_point, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """The dyadic contract on int64: clamp(round_half_away(acc * q / 2**shift) + zp)."""
    p = acc.to(tl.int64) * q.to(tl.int64)
    shift = shift.to(tl.int64)
    half = tl.full(p.shape, 1, tl.int64) << (shift - 1)
    mag = (tl.abs(p) + half) >> shift  # |p| < 2**62, so |p| + 2**61 does not overflow
    y = tl.where(p < 0, -mag, mag) + zero_point
    return tl.minimum(tl.maximum(y, QMIN), QMAX)


@triton.jit
def _requantize_kernel(
    # pointers
    acc_ptr,
    q_ptr,  # int64 [N] (PER_CHANNEL) or [1]
    shift_ptr,  # int64, like q
    out_ptr,
    # shapes and parameters
    M,
    N,
    zero_point,
    # strides
    stride_am,
    stride_an,
    stride_om,
    stride_on,
    # meta-parameters
    PER_CHANNEL: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
    mask = (offs_m < M) & (offs_n < N)
    acc = tl.load(acc_ptr + offs_m * stride_am + offs_n * stride_an, mask=mask, other=0)
    if PER_CHANNEL:
        q = tl.load(q_ptr + offs_n, mask=offs_n < N, other=0)  # [1, BLOCK_N]
        shift = tl.load(shift_ptr + offs_n, mask=offs_n < N, other=1)
    else:
        q = tl.load(q_ptr)
        shift = tl.load(shift_ptr)
    y = requantize_value(acc, q, shift, zero_point, QMIN, QMAX)
    tl.store(out_ptr + offs_m * stride_om + offs_n * stride_on, y.to(tl.int8), mask=mask)


@triton.jit
def row_range(a, b, SYMMETRIC: tl.constexpr):
    """(lo, hi) over the values of two blocks (a row's even and odd elements, or one block
    twice), stretched to include 0: symmetric, (-absmax, absmax) (max(-lo, hi) is all
    row_qparams reads of them); else (min, max)."""
    if SYMMETRIC:
        m = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))
        return -m, m
    lo = tl.minimum(tl.minimum(tl.min(a, axis=0), tl.min(b, axis=0)), 0.0)
    return lo, tl.maximum(tl.maximum(tl.max(a, axis=0), tl.max(b, axis=0)), 0.0)


@triton.jit
def merge_range(lo, hi, step_lo, step_hi, SYMMETRIC: tl.constexpr):
    """The range so far joined with a step's (symmetric: lo is -hi, one value carried)."""
    hi = tl.maximum(hi, step_hi)
    if SYMMETRIC:
        return -hi, hi
    return tl.minimum(lo, step_lo), hi


@triton.jit
def row_qparams(lo, hi, clip, QMIN: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
                SYMMETRIC: tl.constexpr):
    """(scale, zero point as a float32 integer) of a row whose min and max (each stretched to
    include 0) are lo and hi, as specs.dynamic_per_token_qparams: the range times clip,
    then compute_qparams, in its op order."""
    lo = lo * clip
    hi = hi * clip
    if SYMMETRIC:
        scale = tl.maximum(tl.math.div_rn(tl.maximum(-lo, hi), QMAX * 1.0), EPS)
        zp = 0.0
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, (QMAX - QMIN) * 1.0), EPS)
        zp = QMIN - round_half_even(tl.math.div_rn(lo, scale))
        zp = tl.minimum(tl.maximum(zp, QMIN * 1.0), QMAX * 1.0)
    return scale, zp


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr,
    q_ptr,
    scale_ptr,
    zp_ptr,  # int32 [M], written where not SYMMETRIC
    # shapes and parameters
    K,
    clip,  # float32 in (0, 1]: the range is clip times the row's (1.0: the row's)
    # strides
    stride_xm,
    stride_xk,
    stride_qm,
    stride_qk,
    # meta-parameters
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,  # BLOCK_K >= K: the row is read once and kept in registers
    SYMMETRIC: tl.constexpr,  # zero point 0, the scale from absmax; else per-row zero points
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    # masked lanes read 0.0, which the range (stretched to include 0) holds anyway
    if ONE_PASS:
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        lo, hi = row_range(x, x, SYMMETRIC)
    else:
        lo = tl.min(tl.zeros((BLOCK_K,), dtype=tl.float32), axis=0)  # a 0-d float32
        hi = lo
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
            step_lo, step_hi = row_range(x.to(tl.float32), x.to(tl.float32), SYMMETRIC)
            lo, hi = merge_range(lo, hi, step_lo, step_hi, SYMMETRIC)
    scale, zp = row_qparams(lo, hi, clip, QMIN, QMAX, EPS, SYMMETRIC)
    tl.store(scale_ptr + row, scale)
    if not SYMMETRIC:
        tl.store(zp_ptr + row, zp.to(tl.int32))
    if ONE_PASS:
        tl.store(q_row + offs * stride_qk, quantize_value(x, scale, zp, QMIN, QMAX), offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
            q = quantize_value(x.to(tl.float32), scale, zp, QMIN, QMAX)
            tl.store(q_row + (k0 + offs) * stride_qk, q, mask=k0 + offs < K)


@triton.jit
def pack_nibbles(lo, hi):
    """Two int4 values (int32 in [-8, 7]) -> one uint8 byte, lo in the low nibble, hi in the
    high one: the layout of qcompile.numerics.specs.pack_int4."""
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)


@triton.jit
def _quantize_per_token_int4_packed_kernel(
    # pointers
    x_ptr,
    p_ptr,  # uint8 [M, K // 2]: element 2b in the low nibble of byte b, 2b + 1 in the high
    scale_ptr,
    zp_ptr,  # int32 [M], written where not SYMMETRIC
    # shapes and parameters
    K,  # even
    clip,  # float32 in (0, 1]: the range is clip times the row's (1.0: the row's)
    # strides
    stride_xm,
    stride_xk,
    stride_pm,
    stride_pk,
    # meta-parameters
    EPS: tl.constexpr,
    BLOCK_B: tl.constexpr,  # bytes (pairs of elements) a step
    ONE_PASS: tl.constexpr,  # BLOCK_B >= K // 2: the row is read once, kept in registers
    SYMMETRIC: tl.constexpr,  # zero point 0, the scale from absmax; else per-row zero points
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    p_row = p_ptr + row * stride_pm
    half = K // 2
    offs = tl.arange(0, BLOCK_B)  # byte b holds the elements 2b (even) and 2b + 1 (odd)
    if ONE_PASS:
        mask = offs < half
        x_even = tl.load(x_row + (2 * offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + (2 * offs + 1) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        lo, hi = row_range(x_even, x_odd, SYMMETRIC)
    else:
        lo = tl.min(tl.zeros((BLOCK_B,), dtype=tl.float32), axis=0)  # a 0-d float32
        hi = lo
        for b0 in range(0, half, BLOCK_B):
            mask = b0 + offs < half
            x_even = tl.load(x_row + (2 * (b0 + offs)) * stride_xk, mask=mask, other=0.0)
            x_odd = tl.load(x_row + (2 * (b0 + offs) + 1) * stride_xk, mask=mask, other=0.0)
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
            step_lo, step_hi = row_range(x_even, x_odd, SYMMETRIC)
            lo, hi = merge_range(lo, hi, step_lo, step_hi, SYMMETRIC)
    scale, zp = row_qparams(lo, hi, clip, -8, 7, EPS, SYMMETRIC)
    tl.store(scale_ptr + row, scale)
    if not SYMMETRIC:
        tl.store(zp_ptr + row, zp.to(tl.int32))
    if ONE_PASS:
        q_even = quantize_float(x_even, scale, zp, -8, 7).to(tl.int32)  # exact: an integer
        q_odd = quantize_float(x_odd, scale, zp, -8, 7).to(tl.int32)
        tl.store(p_row + offs * stride_pk, pack_nibbles(q_even, q_odd), mask=mask)
    else:
        for b0 in range(0, half, BLOCK_B):
            mask = b0 + offs < half
            x_even = tl.load(x_row + (2 * (b0 + offs)) * stride_xk, mask=mask, other=0.0)
            x_odd = tl.load(x_row + (2 * (b0 + offs) + 1) * stride_xk, mask=mask, other=0.0)
            q_even = quantize_float(x_even.to(tl.float32), scale, zp, -8, 7).to(tl.int32)
            q_odd = quantize_float(x_odd.to(tl.float32), scale, zp, -8, 7).to(tl.int32)
            tl.store(p_row + (b0 + offs) * stride_pk, pack_nibbles(q_even, q_odd), mask=mask)


@triton.jit
def load_groups(x_row, g0, n_groups, stride_xk, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                BLOCK_G: tl.constexpr):
    """Groups g0 .. g0 + BLOCK_G - 1 of a row as float32 [BLOCK_G, GROUP_P], a group a row
    (0.0 past the row's last group and in the lanes GROUP .. GROUP_P - 1), with the elements'
    offsets along K and the mask of the real ones."""
    offs_g = g0 + tl.arange(0, BLOCK_G)[:, None]
    offs_j = tl.arange(0, GROUP_P)[None, :]
    offs = offs_g * GROUP + offs_j  # [BLOCK_G, GROUP_P]
    mask = (offs_g < n_groups) & (offs_j < GROUP)
    x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0)
    return x.to(tl.float32), offs, mask


@triton.jit
def group_absmax(x, clip):
    """a[g] = max|x[g, :]| * clip, [BLOCK_G] float32: the max, then one rounded product (the
    padding's 0.0 moves no max)."""
    return tl.max(tl.abs(x), axis=1) * clip


@triton.jit
def group_values(x, a, scale, QMAX: tl.constexpr, MULT_MAX: tl.constexpr):
    """int8 q * m for the groups x [BLOCK_G, GROUP_P] with clipped absmaxes a [BLOCK_G]:
    m = clamp(ceil(a / (scale * QMAX)), 1, MULT_MAX), q = clamp(round(x / (scale * m)),
    -QMAX - 1, QMAX), each product rounded to float32 before it divides."""
    m = tl.ceil(tl.math.div_rn(a, scale * (QMAX * 1.0)))
    m = tl.minimum(tl.maximum(m, 1.0), MULT_MAX * 1.0)  # a = 0 (padding too): m = 1
    q = quantize_float(x, (scale * m)[:, None], 0.0, -QMAX - 1, QMAX)
    return (q * m[:, None]).to(tl.int8)  # exact: |q * m| <= (QMAX + 1) * MULT_MAX


@triton.jit
def _quantize_int4_groups_kernel(
    # pointers
    x_ptr,
    v_ptr,  # int8 [M, K]: q * m
    scale_ptr,  # float32 [M]
    # shapes and parameters
    K,  # a multiple of GROUP
    clip,  # float32 in (0, 1]: each group's range is clip times its absmax
    # strides
    stride_xm,
    stride_xk,
    stride_vm,
    stride_vk,
    # meta-parameters
    QMAX: tl.constexpr,  # q in [-QMAX - 1, QMAX]
    MULT_MAX: tl.constexpr,  # m in [1, MULT_MAX]
    EPS: tl.constexpr,
    GROUP: tl.constexpr,  # elements along K sharing a multiplier
    GROUP_P: tl.constexpr,  # GROUP's next power of two: the lanes a group is loaded in
    BLOCK_G: tl.constexpr,  # groups a step
    ONE_PASS: tl.constexpr,  # BLOCK_G >= K // GROUP: the row is read once, kept in registers
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    v_row = v_ptr + row * stride_vm
    n_groups = K // GROUP
    if ONE_PASS:
        x, offs, mask = load_groups(x_row, 0, n_groups, stride_xk, GROUP, GROUP_P, BLOCK_G)
        a = group_absmax(x, clip)  # [BLOCK_G]
        a_max = tl.max(a, axis=0)
    else:
        a_max = tl.max(tl.zeros((BLOCK_G,), dtype=tl.float32), axis=0)  # a 0-d float32
        for g0 in range(0, n_groups, BLOCK_G):
            x, offs, mask = load_groups(x_row, g0, n_groups, stride_xk, GROUP, GROUP_P, BLOCK_G)
            a_max = tl.maximum(a_max, tl.max(group_absmax(x, clip), axis=0))
    scale = tl.maximum(tl.math.div_rn(a_max, QMAX * MULT_MAX * 1.0), EPS)
    tl.store(scale_ptr + row, scale)
    if ONE_PASS:
        tl.store(v_row + offs * stride_vk, group_values(x, a, scale, QMAX, MULT_MAX), mask=mask)
    else:
        # each step's absmaxes again, from the same values: the same a[g] as pass 1's
        for g0 in range(0, n_groups, BLOCK_G):
            x, offs, mask = load_groups(x_row, g0, n_groups, stride_xk, GROUP, GROUP_P, BLOCK_G)
            v = group_values(x, group_absmax(x, clip), scale, QMAX, MULT_MAX)
            tl.store(v_row + offs * stride_vk, v, mask=mask)


@triton.jit
def _hadamard_quantize_kernel(
    # pointers
    x_ptr,
    h_ptr,
    q_ptr,
    scale_ptr,
    # shapes
    m,
    norm,
    # strides
    stride_xm,
    stride_xk,
    stride_qm,
    # meta-parameters
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    EPS: tl.constexpr,
    P: tl.constexpr,
    MP: tl.constexpr,
    LOG_P: tl.constexpr,
    DENSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = hadamard_tile(x_ptr + row * stride_xm, h_ptr, stride_xk, m, P, MP, LOG_P, DENSE)
    y = y * norm  # [P, MP], padding columns are 0 and do not move the absmax
    amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), EPS)
    tl.store(scale_ptr + row, scale)
    offs_p = tl.arange(0, P)[:, None]
    offs_i = tl.arange(0, MP)[None, :]
    q = quantize_value(y, scale, 0.0, QMIN, QMAX)
    tl.store(q_ptr + row * stride_qm + offs_p * m + offs_i, q, mask=offs_i < m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K], a view when the strides allow (the kernels take strides)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def quantize_per_tensor_triton(x, scale, zero_point=0, *, bits=8):
    qmin, qmax = _range(bits)
    return _quantize_per_tensor(x, scale, zero_point, qmin, qmax, torch.int8)


def quantize_int16_triton(x, scale, qmin=-(1 << 15), qmax=(1 << 15) - 1):
    """int16 clamp(round(x / scale), qmin, qmax), zero point 0: the per-tensor kernel with
    int16 storage (the int16 activations of lowering/a16_ops.py)."""
    qmin, qmax = int(qmin), int(qmax)  # constexprs of the kernel
    check_output_range(qmin, qmax, torch.int16, what="quantize_int16's output")
    return _quantize_per_tensor(x, scale, 0, qmin, qmax, torch.int16)


def _quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype):
    check_can_launch(x)
    _check_float(x)
    if not x.numel():  # nothing to launch for, and [-1, K] is ambiguous when K = 0
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    x2 = _rows(x)  # [M, K]
    q = torch.empty(x2.shape, dtype=dtype, device=x.device)
    M, K = x2.shape
    block_m, block_k = 16, min(1024, triton.next_power_of_2(max(K, 1)))
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    if x2.numel():
        _quantize_per_tensor_kernel[grid](
            x2, q, M, K, float(torch.tensor(float(scale), dtype=torch.float32)),
            int(zero_point), x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
            QMIN=qmin, QMAX=qmax, BLOCK_M=block_m, BLOCK_K=block_k,
        )  # fmt: skip
    return q.reshape(x.shape)


def requantize_int_triton(acc, q, shift, zero_point=0, qmin=-128, qmax=127):
    check_can_launch(acc)
    if acc.dtype != torch.int32:
        raise TypeError(f"requantize_int takes int32 accumulators, got {acc.dtype}")
    qmin, qmax = int(qmin), int(qmax)  # constexprs of the kernel
    check_output_range(qmin, qmax, torch.int8, what="requantize_int's output")
    if not any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in (q, shift)):
        # per-tensor values are checked here; per-channel vectors by their maker (reading
        # them back would sync a GPU on every call), as in lowering.epilogue.bind_operands
        check_multiplier(q, shift)
    q_t = torch.as_tensor(q, dtype=torch.int64, device=acc.device).reshape(-1)
    s_t = torch.as_tensor(shift, dtype=torch.int64, device=acc.device).reshape(-1)
    a2 = _rows(acc)  # [M, N]
    M, N = a2.shape
    per_channel = q_t.numel() != 1
    if per_channel and (q_t.numel() != N or s_t.numel() != N):
        raise ValueError(f"per-channel q/shift must have {N} elements, got {q_t.numel()}")
    out = torch.empty(a2.shape, dtype=torch.int8, device=acc.device)
    block_m, block_n = 16, min(256, triton.next_power_of_2(max(N, 1)))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    if a2.numel():
        _requantize_kernel[grid](
            a2, q_t, s_t, out, M, N, int(zero_point),
            a2.stride(0), a2.stride(1), out.stride(0), out.stride(1),
            PER_CHANNEL=per_channel, QMIN=qmin, QMAX=qmax, BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
    return out.reshape(acc.shape)


def _clip32(clip) -> float:
    """clip as the float32 the kernels multiply by (Triton passes a Python float as float32;
    rounded here once, as torch.tensor(clip, dtype=float32) rounds it for the reference)."""
    clip = float(clip)
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1] (1.0: no clipping), got {clip!r}")
    return float(torch.tensor(clip, dtype=torch.float32))


def quantize_per_token_triton(x, *, bits=8, clip=1.0, block_k=None):
    """block_k below K forces the two-pass (long-row) variant; tests use it."""
    q, scale, _ = _per_token_triton(x, bits, clip, block_k, symmetric=True)
    return q, scale


def quantize_per_token_asym_triton(x, *, bits=8, clip=1.0, block_k=None):
    """quantize_per_token_asym_ref's (q, scale, zero point int32 [...]) in one pass."""
    return _per_token_triton(x, bits, clip, block_k, symmetric=False)


def _per_token_triton(x, bits, clip, block_k, symmetric):
    check_can_launch(x)
    _check_float(x)
    qmin, qmax = _range(bits)
    clip = _clip32(clip)
    x2 = _rows(x)  # [M, K]
    M, K = x2.shape
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    zp = torch.zeros(M, dtype=torch.int32, device=x.device)
    if block_k is None:
        block_k = min(triton.next_power_of_2(max(K, 1)), _ONE_PASS_MAX_K)
    if M:
        _quantize_per_token_kernel[(M,)](
            x2, q, scale, zp, K, clip, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
            QMIN=qmin, QMAX=qmax, EPS=SCALE_EPS, BLOCK_K=block_k, ONE_PASS=block_k >= K,
            SYMMETRIC=symmetric, num_warps=min(16, max(1, block_k // 512)),
        )  # fmt: skip
    rows = x.shape[:-1]
    return q.reshape(x.shape), scale.reshape(rows), zp.reshape(rows)


def int4_packed_block(k: int, symmetric: bool) -> int:
    """Bytes a step of the packing per-token kernel: the whole row up to 8192 (one pass),
    else 8192, or 4096 where asymmetric (its two passes carry min and max: sm_80 spilled
    at 8192 with float32 rows)."""
    block = min(triton.next_power_of_2(max(k // 2, 1)), _ONE_PASS_MAX_K // 2)
    return block // 2 if not symmetric and block < k // 2 else block


def quantize_per_token_int4_packed_triton(x, *, clip=1.0, block_b=None, symmetric=True):
    """quantize_per_token_triton(x, bits=4, clip=clip) with the int4 values packed two per
    byte along K (specs.pack_int4's layout) in the same pass: (uint8 [..., K // 2], float32
    [...]); symmetric=False: quantize_per_token_asym_triton's, packed, and its zero points
    int32 [...] third. block_b (bytes a step) below K // 2 forces the two-pass (long-row)
    variant; tests use it."""
    check_can_launch(x)
    _check_float(x)
    clip = _clip32(clip)
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"packing int4 needs an even K (two values a byte), got K = {k}")
    x2 = _rows(x)  # [M, K]
    M = x2.shape[0]
    p = torch.empty((M, k // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    zp = torch.zeros(M, dtype=torch.int32, device=x.device)
    if block_b is None:
        block_b = int4_packed_block(k, symmetric)
    if M and k:
        _quantize_per_token_int4_packed_kernel[(M,)](
            x2, p, scale, zp, k, clip, x2.stride(0), x2.stride(1), p.stride(0), p.stride(1),
            EPS=SCALE_EPS, BLOCK_B=block_b, ONE_PASS=block_b >= k // 2, SYMMETRIC=symmetric,
            num_warps=min(16, max(1, block_b // 256)),
        )  # fmt: skip
    out = (p.reshape(*x.shape[:-1], k // 2), scale.reshape(x.shape[:-1]))
    return out if symmetric else (*out, zp.reshape(x.shape[:-1]))


def int4_groups_block(k: int, group: int) -> int:
    """Groups a step of quantize_int4_groups: every group of the row while the row's padded
    groups fit _ONE_PASS_MAX_K lanes (one pass), else as many as fit (a power of two)."""
    lanes = triton.next_power_of_2(group)
    return min(triton.next_power_of_2(k // group), max(1, _ONE_PASS_MAX_K // lanes))


def quantize_int4_groups_triton(x, *, group, clip=1.0, block_k=None):
    """quantize_int4_groups (lowering/a4_ops.py) in one program a row: (int8 v [..., K],
    float32 s [...]) for float x [..., K], K a positive multiple of group (an int in 2 ..
    _ONE_PASS_MAX_K; a power of two loads no padding lanes). block_k (elements a step, a
    power-of-two number of groups) below K forces the two-pass (long-row) variant; tests
    use it."""
    check_can_launch(x)
    _check_float(x)
    clip = _clip32(clip)
    if isinstance(group, bool) or not isinstance(group, int) or \
            not 2 <= group <= _ONE_PASS_MAX_K:
        raise ValueError(f"group must be an int in 2..{_ONE_PASS_MAX_K} (elements along K "
                         f"sharing a multiplier, held in registers), got {group!r}")
    k = x.shape[-1] if x.dim() else 0
    if k == 0 or k % group:
        raise ValueError(f"K = {k} is not a positive multiple of the group size {group}")
    if block_k is None:
        block_g = int4_groups_block(k, group)
    else:
        block_g = block_k // group
        if block_k % group or block_g < 1 or block_g & (block_g - 1):
            raise ValueError(f"block_k must be a power-of-two number of groups of {group}, "
                             f"got {block_k}")
    x2 = _rows(x)  # [M, K]
    M = x2.shape[0]
    v = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    lanes = triton.next_power_of_2(group)
    if M:
        _quantize_int4_groups_kernel[(M,)](
            x2, v, scale, k, clip, x2.stride(0), x2.stride(1), v.stride(0), v.stride(1),
            QMAX=_GROUP_QMAX, MULT_MAX=_GROUP_MULT_MAX, EPS=SCALE_EPS, GROUP=group,
            GROUP_P=lanes, BLOCK_G=block_g, ONE_PASS=block_g >= k // group,
            num_warps=min(16, max(1, block_g * lanes // 512)),
        )  # fmt: skip
    return v.reshape(x.shape), scale.reshape(x.shape[:-1])


def hadamard_quantize_per_token_triton(x, *, bits=8):
    check_can_launch(x)
    _check_float(x)
    qmin, qmax = _range(bits)
    n = x.shape[-1]
    meta, m = hadamard_launch_meta(n)
    x2 = _rows(x)  # [M, n]
    M = x2.shape[0]
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _hadamard_quantize_kernel[(M,)](
            x2, small_hadamard(m, x.device), q, scale, m, norm_factor(n),
            x2.stride(0), x2.stride(1), q.stride(0),
            QMIN=qmin, QMAX=qmax, EPS=SCALE_EPS, **meta,
        )  # fmt: skip
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


# --------------------------------------------------------------------------- torch


def quantize_per_tensor_ref(x, scale, zero_point=0, *, bits=8):
    """specs.quantize with a per-tensor spec: clamp(round(x / scale) + zp), float32."""
    spec = specs.QuantSpec(bits=bits, symmetric=zero_point == 0)
    s = torch.tensor(float(scale), dtype=torch.float32)
    return specs.quantize(x, s, torch.tensor(int(zero_point), dtype=torch.int32), spec)


def requantize_int_ref(acc, q, shift, zero_point=0, qmin=-128, qmax=127):
    """qcompile.numerics.dyadic.requantize (per-tensor ints or per-channel [N] tensors)
    into int8 storage: bounds outside int8 are refused, as by the kernel."""
    check_output_range(int(qmin), int(qmax), torch.int8, what="requantize_int's output")
    return requantize(acc, q, shift, zero_point, qmin, qmax, out_dtype=torch.int8)


def quantize_per_token_ref(x, *, bits=8, clip=1.0):
    """specs.dynamic_per_token_qparams + specs.quantize: (int8 [..., K], float32 [...])."""
    spec = specs.QuantSpec(bits=bits, granularity="per_token")
    scale, zp = specs.dynamic_per_token_qparams(x, spec, clip=clip)
    return specs.quantize(x, scale, zp, spec), scale


def quantize_per_token_asym_ref(x, *, bits=8, clip=1.0):
    """quantize_per_token_ref with an asymmetric spec: each row's range [min, max] (times
    clip, stretched to include 0) onto [qmin, qmax], a zero point per row: (int8 [..., K],
    float32 [...], int32 [...])."""
    spec = specs.QuantSpec(bits=bits, granularity="per_token", symmetric=False)
    scale, zp = specs.dynamic_per_token_qparams(x, spec, clip=clip)
    return specs.quantize(x, scale, zp, spec), scale, zp


def quantize_per_token_int4_packed_ref(x, *, clip=1.0, symmetric=True):
    """specs.pack_int4 of quantize_per_token_ref(x, bits=4, clip=clip): (uint8 [..., K // 2],
    float32 [...]); symmetric=False: of quantize_per_token_asym_ref's, its zero points
    third."""
    if not symmetric:
        q, scale, zp = quantize_per_token_asym_ref(x, bits=4, clip=clip)
        return specs.pack_int4(q), scale, zp
    q, scale = quantize_per_token_ref(x, bits=4, clip=clip)
    return specs.pack_int4(q), scale


def hadamard_quantize_per_token_ref(x, *, bits=8):
    """quantize_per_token_ref of the float32 rotation (the kernel's rotation is bit-identical
    to hadamard_transform_cpu, so the integer outputs are too)."""
    return quantize_per_token_ref(hadamard_transform_cpu(x, torch.float32), bits=bits)
