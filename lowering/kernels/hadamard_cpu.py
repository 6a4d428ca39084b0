"""The online Hadamard transform on CPU: one C++ kernel, butterflies over vectors.

What: y = x @ H_n^T / sqrt(n) over the last dim of float32 rows [M, n], the contract of
hadamard_transform. H_n = H_a (x) H_b (`block_split`: a a power of two, b = m 2^j filling
whole vectors, H_b = hadamard_matrix(b)), so with each row viewed as [a, b]:
- every row of b floats is multiplied by H_b (b broadcast-multiply-adds of b lanes: the
  entries are +-1, so every product is exact and only the sums round);
- then the Sylvester butterflies over a: log2(a) stages of (u + w, u - w) on pairs of
  b-float rows, the scale 1 / sqrt(n) applied with the last store.
One pass over each row, which stays in L1; OpenMP over rows.
Why: the BLAS route (two GEMMs through a float32 intermediate, the `cpu` implementation)
spends n (a + b) multiply-adds a row where this spends n b + n log2(a) adds, and moves
the intermediate through memory: w4a8 all-MiniLM-L6-v2 spent 90 of 220 ms per batch in
its online Hadamards that way (2 AVX512 cores).
Not exact (nor is any implementation of this float op): float32 sums in another order than
the float64 reference, within the op's tolerance.
Built on first use by Inductor's C++ toolchain (its compiler, ISA flags and disk cache),
like lowering/kernels/attention_cpu.py; plain C++ loops the compiler vectorizes for
whatever ISA Inductor targets (AVX2, AVX-512, NEON).
"""

from __future__ import annotations

import functools
import math

import torch

from qcompile.lowering.kernels.cpp_build import builds, load_kernel

SIMD_BLOCK = 16  # floats: one AVX-512 vector, two AVX2 / four NEON ones

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <vector>

using Vec = at::vec::Vectorized<float>;

// f(i, count) over [0, b) in vectors of Vec::size() floats, a partial one at the end
template <typename F>
static inline void each(int64_t b, F f) {
    const int64_t V = Vec::size();
    int64_t i = 0;
    for (; i + V <= b; i += V) f(i, V);
    if (i < b) f(i, b - i);
}

extern "C" void kernel(const float* x, float* y, const float* hb, const int64_t rows,
                       const int64_t a, const int64_t b, const float scale,
                       const int64_t threads)
{
    const int64_t n = a * b;
    const Vec sc(scale);
    #pragma omp parallel num_threads(threads)
    {
        std::vector<float> t(n);
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float* xr = x + r * n;
            float* yr = y + r * n;
            float* v = t.data();
            float* dst = a == 1 ? yr : v;
            const Vec s1(a == 1 ? scale : 1.0f);
            // H_b on each [b] row: v[p][:] = sum_j hb[j][:] * x[p][j] (hb holds H_b^T)
            for (int64_t p = 0; p < a; p++) {
                const float* xp = xr + p * b;
                float* vp = dst + p * b;
                each(b, [&](int64_t i, int64_t cnt) {
                    Vec acc = Vec::loadu(hb + i, cnt) * Vec(xp[0]);
                    for (int64_t j = 1; j < b; j++)
                        acc = at::vec::fmadd(Vec::loadu(hb + j * b + i, cnt), Vec(xp[j]), acc);
                    (acc * s1).store(vp + i, cnt);
                });
            }
            // Sylvester butterflies over a, on rows of b floats; the last stage scales
            // and stores to y
            for (int64_t h = 1; h < a; h *= 2) {
                const bool last = 2 * h >= a;
                float* out = last ? yr : v;
                const Vec m = last ? sc : Vec(1.0f);
                for (int64_t s = 0; s < a; s += 2 * h) {
                    for (int64_t k = s; k < s + h; k++) {
                        const float* u = v + k * b;
                        const float* w = v + (k + h) * b;
                        float* ou = out + k * b;
                        float* ow = out + (k + h) * b;
                        each(b, [&](int64_t i, int64_t cnt) {
                            const Vec p = Vec::loadu(u + i, cnt), q = Vec::loadu(w + i, cnt);
                            ((p + q) * m).store(ou + i, cnt);
                            ((p - q) * m).store(ow + i, cnt);
                        });
                    }
                }
            }
        }
    }
}
"""

_ARGTYPES = ["const float*", "float*", "const float*", "const int64_t", "const int64_t",
             "const int64_t", "const float", "const int64_t"]


def block_split(n: int) -> tuple[int, int]:
    """(a, b): n = a * b, a a power of two, b = m * 2**j (hadamard_factor's m) the smallest
    such block that fills whole vectors (a multiple of SIMD_BLOCK floats) or is at least
    two of them (or n itself). Measured (4096 rows, 2 AVX512 cores): n = 1536 with b = 12 /
    24 / 48: 9.0 / 7.2 / 5.3 ms; 2048 with b = 8 / 16 / 32: 28.6 / 14.0 / 15.0 ms."""
    from qcompile.hadamard import hadamard_factor

    b = hadamard_factor(n)[1]
    while b % SIMD_BLOCK and b < 2 * SIMD_BLOCK and n // b > 1:
        b *= 2
    return n // b, b


# The kernel beats the BLAS route (two GEMMs, ops.py) where the dense block is small.
# Measured (4096 rows, 2 AVX512 cores, interleaved, median ms, kernel / BLAS): n = 384
# 1.9 / 2.6, 768 4.2 / 6.0, 1536 6.0 / 8.6, 2048 7.7 / 24.2, 4096 28.5 / 58.8, 5632 54.8 /
# 90.2, 14336 148 / 292; but b = 172 (1376, 11008: 43 * 4 has no smaller block) 22.3 / 12.7
# and 219 / 179.
FWHT_MAX_BLOCK = 64


def fwht_suits(n: int) -> bool:
    """Whether this kernel is the faster CPU route for rows of n (a Hadamard size)."""
    return block_split(n)[1] <= FWHT_MAX_BLOCK


@functools.lru_cache(maxsize=16)
def _block_t(b: int) -> torch.Tensor:
    """H_b^T in float32 (entries +-1)."""
    from qcompile.hadamard import hadamard_matrix

    return hadamard_matrix(b, torch.float64).T.contiguous().to(torch.float32)


@functools.cache
def _kernel():
    return load_kernel(_ARGTYPES, _SOURCE)


@functools.cache
def fwht_cpu_available() -> bool:
    """Inductor's C++ toolchain builds the kernel here (once per process; cached on disk)."""
    return builds(lambda: _kernel(), "CPU Hadamard kernel",
                  "online Hadamards run as two BLAS GEMMs (same values, slower for large sizes)")


def hadamard_transform_fwht(x: torch.Tensor) -> torch.Tensor:
    """hadamard_transform's contract for float CPU tensors (module docstring), in x.dtype."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).to(torch.float32).contiguous()
    y = torch.empty_like(rows)
    if rows.numel():
        a, b = block_split(n)
        _kernel()(rows, y, _block_t(b), rows.shape[0], a, b, 1.0 / math.sqrt(n),
                  torch.get_num_threads())
    return y.reshape(x.shape).to(x.dtype)
