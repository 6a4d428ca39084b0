"""Fast Walsh-Hadamard transform over the last dim: y = x @ H_n^T / sqrt(n).

What: for n = 2**k * m with H_n = H_{2**k} (x) H_m (qcompile.hadamard.hadamard_factor), a
row x [n] is a tile X [P = 2**k, m] (x[p * m + j] = X[p, j]) and
    Y = H_P X H_m^T / sqrt(n):
one dense m x m product on the columns (m <= 172, skipped when m == 1), then k butterfly
stages on the rows, then the normalisation. O(n (m + k)) work instead of O(n**2).

Why: online rotations (QuaRot) put a Hadamard transform in front of the MLP down-projection
and on q/k; it must cost about as much as a copy.

Numerics: everything is computed in float32 whatever the input dtype, in a fixed order that
the torch CPU path (`hadamard_transform_cpu`) reproduces operation for operation, so the
two are bit-identical. The dense stage multiplies by +-1 (exact), so FMA contraction on
the GPU cannot change a result either. Against the float64 reference the error is a few
float32 ulps of |x| * sqrt(n) (log2(n) + m rounded additions).

Pre: x float16 / bfloat16 / float32, last dim n a Hadamard size. Post: same shape and
dtype as x (or out_dtype).

Which implementation a graph runs is the op registry's choice (lowering/ops.py,
`hadamard_transform`: this kernel, or one dense float32 matmul on the CPU).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from qcompile.hadamard import hadamard_factor, hadamard_matrix
from qcompile.lowering.device import check_can_launch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def small_hadamard(m: int, device: torch.device) -> torch.Tensor:
    """H_m as float32 [m, m] on device, cached: the kernels read it (it is tiny)."""
    return hadamard_matrix(m, torch.float32).to(device)


def norm_factor(n: int) -> float:
    # Rounded to float32 once, on the host, so the kernel and the CPU path multiply by the
    # same float32 number.
    return float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))


# --------------------------------------------------------------------------- Triton


@triton.jit
def cast_rne(y, DTYPE: tl.constexpr):
    """float32 -> DTYPE rounding to nearest even, identically on GPU and in the interpreter.

    The interpreter truncates float32 -> bfloat16 (numpy has no bfloat16), so that case is
    done on the bits: add 0x7FFF plus the lowest kept bit, keep the high half. NaN stays
    NaN, overflow goes to inf, as cvt.rn.bf16.f32 does.
    """
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)


@triton.jit
def hadamard_tile(
    row_ptr,  # first element of one row x [n]
    h_ptr,  # H_m, float32 [m, m] row-major
    stride_k,
    m,
    P: tl.constexpr,  # 2**k
    MP: tl.constexpr,  # next power of two >= m (padding columns come out 0)
    LOG_P: tl.constexpr,
    DENSE: tl.constexpr,  # m > 1
):
    """H_P X H_m^T for one row, unnormalised: float32 [P, MP], columns >= m are zero."""
    offs_p = tl.arange(0, P)[:, None]  # [P, 1]
    offs_i = tl.arange(0, MP)[None, :]  # [1, MP]
    if DENSE:
        # Y[:, i] = sum_j X[:, j] * H[i, j], j ascending: an outer product per column of X.
        # Columns are re-read from cache rather than extracted from registers.
        y = tl.zeros((P, MP), dtype=tl.float32)
        for j in range(0, m):
            x_j = tl.load(row_ptr + (offs_p * m + j) * stride_k).to(tl.float32)  # [P, 1]
            h_j = tl.load(h_ptr + offs_i * m + j, mask=offs_i < m, other=0.0)  # [1, MP]
            y = y + x_j * h_j
    else:
        y = tl.load(row_ptr + (offs_p * MP + offs_i) * stride_k).to(tl.float32)
    # Butterflies over P: pairs (a, b) at distance h = 2**s become (a + b, a - b). h is
    # spelled out in the shapes: a `h: tl.constexpr` would be reassigned on every unrolled
    # stage, which the GPU compiler rejects (the interpreter does not).
    for s in tl.static_range(LOG_P):
        y = tl.reshape(y, (P // (2 << s), 2, (1 << s) * MP))
        a, b = tl.split(tl.permute(y, (0, 2, 1)))  # [P / 2h, h * MP] each
        y = tl.permute(tl.join(a + b, a - b), (0, 2, 1))
        y = tl.reshape(y, (P, MP))
    return y


@triton.jit
def _hadamard_kernel(
    # pointers
    x_ptr,
    h_ptr,
    y_ptr,
    # shapes
    m,
    norm,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    # meta-parameters
    P: tl.constexpr,
    MP: tl.constexpr,
    LOG_P: tl.constexpr,
    DENSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = hadamard_tile(x_ptr + row * stride_xm, h_ptr, stride_xk, m, P, MP, LOG_P, DENSE)
    y = y * norm
    offs_p = tl.arange(0, P)[:, None]
    offs_i = tl.arange(0, MP)[None, :]
    out = y_ptr + row * stride_ym + (offs_p * m + offs_i) * stride_yk
    tl.store(out, cast_rne(y, y_ptr.dtype.element_ty), mask=offs_i < m)


def hadamard_launch_meta(n: int) -> dict:
    pow2, m = hadamard_factor(n)
    mp = triton.next_power_of_2(m)
    # The whole row lives in registers: more warps for longer rows (~16 floats a thread).
    warps = min(16, max(1, pow2 * mp // 512))
    meta = dict(P=pow2, MP=mp, LOG_P=pow2.bit_length() - 1, DENSE=m > 1, num_warps=warps)
    return meta, m


def hadamard_transform_triton(x: torch.Tensor, out_dtype: torch.dtype | None = None):
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1). x [..., n]."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hadamard_transform takes float16/bfloat16/float32, got {x.dtype}")
    check_can_launch(x)
    n = x.shape[-1]
    meta, m = hadamard_launch_meta(n)
    x2 = x.reshape(-1, n)  # [M, n]; a view when possible, strides passed as they are
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    if x2.shape[0]:
        _hadamard_kernel[(x2.shape[0],)](
            x2,
            small_hadamard(m, x.device),
            y,
            m,
            norm_factor(n),
            x2.stride(0),
            x2.stride(1),
            y.stride(0),
            y.stride(1),
            **meta,
        )
    return y.reshape(x.shape)


# --------------------------------------------------------------------------- torch


def hadamard_transform_cpu(x: torch.Tensor, out_dtype: torch.dtype | None = None):
    """Torch FWHT with the kernel's exact float32 operation order (bit-identical to it)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hadamard_transform takes float16/bfloat16/float32, got {x.dtype}")
    n = x.shape[-1]
    pow2, m = hadamard_factor(n)
    lead = x.shape[:-1]
    xt = x.reshape(-1, pow2, m).to(torch.float32)  # [M, P, m]
    if m > 1:
        h = small_hadamard(m, x.device)
        y = torch.zeros_like(xt)
        for j in range(m):  # ascending j, as the kernel accumulates
            y = y + xt[:, :, j : j + 1] * h[:, j]
    else:
        y = xt.clone()
    half = 1
    while half < pow2:
        y = y.reshape(-1, pow2 // (2 * half), 2, half, m)  # [M, P / 2h, 2, h, m]
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        half *= 2
    y = y.reshape(-1, n) * torch.tensor(norm_factor(n), dtype=torch.float32)
    return y.reshape(*lead, n).to(out_dtype or x.dtype)


def hadamard_transform_ref(x: torch.Tensor, out_dtype: torch.dtype | None = None):
    """Reference: (x @ H_n^T / sqrt(n)) in float64, cast to out_dtype (default x.dtype)."""
    n = x.shape[-1]
    h = hadamard_matrix(n, torch.float64).to(x.device)
    return ((x.to(torch.float64) @ h.T) / math.sqrt(n)).to(out_dtype or x.dtype)


__all__ = [
    "hadamard_transform_cpu",
    "hadamard_transform_ref",
    "hadamard_transform_triton",
]
