"""Requantization of exact float32 accumulators to int8 in one C++ pass (CPU, any ISA).

What: y[m, n] = clamp(round_half_away((acc[m, n] + offset[n]) * q[n] / 2**shift[n]) + zp,
qmin, qmax), bit for bit `dyadic.requantize`, for a float32 acc that holds exact integers
(|acc| <= 2**24, the float32 routes' output) and an exact float32 offset (bias - zp_term,
|offset| <= 2**24): the contract of `cpu.requantize_f32`, whose proof this follows. Per
element a float32 candidate round((acc + offset) * float32(q 2**-shift)) (three roundings:
|t - exact| < |t| 2**-22.3); where t lies within |t| 2**-21 of a half-integer (and below
512, past which the clamp saturates either way) the element is recomputed on the spot in
scalar int64 (|x q| < 2**56 for |x| <= 2**25: no overflow).

Why: on CPUs without AVX-512 (ATen emulates int64 vector multiplies and shifts there) the
q / k / v linears that requantize into an int8 attention spent longer in Inductor's
compiled candidate, its per-block flags, a `nonzero` and the Python around them (2.3 ms
for a [4096, 384] accumulator, plus ~0.8 ms of calls) than in a third of their GEMM.
This kernel reads the accumulator once and fixes doubtful elements where it finds them.

Written with ATen's `Vectorized<float>`, so Inductor's C++ toolchain builds it for the ISA
it builds its own kernels for (AVX2, AVX-512, NEON, scalar). Without a compiler, callers
keep the eager path (`kernel_builds`).
"""

from __future__ import annotations

import functools

import torch

from qcompile.lowering.kernels.cpp_build import builds, load_kernel

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>

using Vec = at::vec::Vectorized<float>;

// dyadic.requantize of the integer x (|x| <= 2**25), exactly: |x q| < 2**56, s in 1..62
static inline int8_t exact(const int64_t x, const int64_t q, const int64_t s, const float zp,
                           const float lo, const float hi) {
    const int64_t p = x * q;
    const int64_t mag = ((p < 0 ? -p : p) + ((int64_t)1 << (s - 1))) >> s;
    const int64_t r = (p < 0 ? -mag : mag) + (int64_t)zp;
    return (int8_t)std::min<int64_t>((int64_t)hi, std::max<int64_t>((int64_t)lo, r));
}

// the candidate of one element, scalar, the same operations as the vector loop's
static inline int8_t one(const float a, const float o, const float m, const int64_t q,
                         const int64_t s, const float zp, const float lo, const float hi) {
    const float t = (a + o) * m;
    const float r = std::nearbyint(t);
    const float at = std::abs(t);
    if (std::abs(t - r) > 0.5f - at * 0x1p-21f && at < 512.f)
        return exact((int64_t)a + (int64_t)o, q, s, zp, lo, hi);
    return (int8_t)std::min(hi, std::max(lo, r + zp));
}

extern "C" void kernel(const float* acc, const float* off, const float* mult,
                       const int64_t* q, const int64_t* sh, int8_t* out,
                       const int64_t M, const int64_t N, const int64_t ars, const int64_t ors,
                       const float* zlh, const int64_t threads)
{
    const float zp = zlh[0], lo = zlh[1], hi = zlh[2];
    constexpr int64_t L = Vec::size();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float* a = acc + m * ars;
        int8_t* y = out + m * ors;
        int64_t n = 0;
        for (; n + L <= N; n += L) {
            const Vec va = Vec::loadu(a + n), vo = Vec::loadu(off + n);
            const Vec t = (va + vo) * Vec::loadu(mult + n);
            const Vec r = t.round();  // half to even
            const Vec at = t.abs();
            const Vec doubtful = ((t - r).abs() > Vec(0.5f) - at * Vec(0x1p-21f))
                                 & (at < Vec(512.f));
            const Vec c = at::vec::minimum(at::vec::maximum(r + Vec(zp), Vec(lo)), Vec(hi));
            at::vec::convert<int8_t>(c).store(y + n, L);
            // lanes of doubtful that are not zero: recomputed exactly (about one element
            // in a thousand on real data)
            for (int bits = ~doubtful.zero_mask() & ((1 << L) - 1); bits; bits &= bits - 1) {
                const int64_t j = n + __builtin_ctz(bits);
                y[j] = exact((int64_t)a[j] + (int64_t)off[j], q[j], sh[j], zp, lo, hi);
            }
        }
        for (; n < N; n++) y[n] = one(a[n], off[n], mult[n], q[n], sh[n], zp, lo, hi);
    }
}
"""

_ARGTYPES = ["const float*", "const float*", "const float*", "const int64_t*",
             "const int64_t*", "int8_t*", "const int64_t", "const int64_t", "const int64_t",
             "const int64_t", "const float*", "const int64_t"]


@functools.cache
def kernel_builds() -> bool:
    """Inductor's C++ toolchain builds the kernel here (once per process; cached on disk)."""
    return builds(lambda: _kernel(), "CPU requantization kernel", "requantization runs eagerly")


@functools.cache
def _kernel():
    return load_kernel(_ARGTYPES, _SOURCE)


def requantize_f32_cpu(acc: torch.Tensor, offset: torch.Tensor, mult: torch.Tensor,
                       q: torch.Tensor, shift: torch.Tensor, zp: int, qmin: int,
                       qmax: int) -> torch.Tensor:
    """The module's function on acc float32 [M, N] (rows of any stride, unit column stride)
    with per-column offset, mult (float32), q and shift (int64), all [N] and contiguous."""
    m, n = acc.shape
    if acc.stride(1) != 1:
        acc = acc.contiguous()
    out = torch.empty((m, n), dtype=torch.int8)
    if out.numel():
        zlh = torch.tensor([zp, qmin, qmax], dtype=torch.float32)
        _kernel()(acc, offset, mult, q, shift, out, m, n, acc.stride(0), n, zlh,
                  torch.get_num_threads())
    return out
