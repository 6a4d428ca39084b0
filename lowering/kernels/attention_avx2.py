"""Quantized attention on x86 CPUs with AVX2 and no AVX512-VNNI: int8 Q K^T in `vpmaddwd`
int16 pairs, one C++ kernel per call.

What: attention_int8's contract, as the VNNI kernel (lowering/kernels/attention_cpu.py,
whose module docstring describes the masks, grouped heads and int8 output): out =
softmax(c[h] * (Q K^T) + mask) (V * vs[h]), float32 rows or int8 codes quantized as they
are stored.

How, per (batch, q head), on one thread (OpenMP hands out a batch's heads at a time):
- K is packed once into pairs of int16 per 32-bit word, [D / 2][keys] (eight keys'
  16-byte rows at a time, an 8 x 8 transpose of words), V converted to float32 (exact);
- per block of 4 queries, over the keys the mask keeps for any of them (from the first,
  rounded down to 16, to the last: as the VNNI kernel, the skipped keys have P = 0 exactly):
  S = Q K^T exactly in int32 with `vpmaddwd` (signed 16-bit pairs summed into int32: no
  saturation, no offset; |S| <= D * 2**14), 16 keys x 4 queries in 8 registers;
- logits t = float32(S) * c[h] + mask, softmax in float32 (ATen's vectorized exp), P V in
  float32 FMAs, vs[h] / sum applied once per row; rows stored as float32 or quantized as
  qcompile's quantize does (true division, round half to even, zero point, clamp).
Why: without VNNI, attention_int8's other CPU implementation is float SDPA on the
dequantized inputs, no faster than float attention; this kernel starts from the int8 codes
(no dequantizing pass), skips padded keys and quantizes its rows for the output
projection. One all-MiniLM-L6-v2 layer (32 x 12 heads x 128 x 32, the bench's padding) on
2 Zen 3 cores: 6.1 ms against 13.2 ms for float SDPA (8.6 ms unpadded). Per perf, a third
of it is P V (float32 FMAs), a fifth each Q K^T and the exponentials.

Not exact: like every implementation of attention_int8, only S is integer.
Built on first use by Inductor's C++ toolchain with the flags Inductor builds its own CPU
kernels with (AVX2 or AVX-512), cached on disk; CPUs without AVX2 use `cpu-sdpa`.
"""

from __future__ import annotations

import functools

import torch

from qcompile.lowering.kernels.attention_cpu import (
    BLOCK_KEYS,
    HEAD_LOOP,
    KERNEL_HEAD,
    KERNEL_HEAD_ARGTYPES,
    NEXT_HEAD_PREFETCH,
    PREFETCH_ROW_AND_OUT,
)
from qcompile.lowering.kernels.cpp_build import builds, load_kernel

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

constexpr int64_t R = 4;  // queries per block
using Vec = at::vec::Vectorized<float>;

// the first n of 16 bytes at p, zeros after them (one whole load where all 16 are there)
static inline __m128i bytes16(const void* p, const int64_t n) {
    if (n >= 16) return _mm_loadu_si128((const __m128i*)p);
    alignas(16) uint8_t t[16] = {};
    if (n > 0) std::memcpy(t, p, n);
    return _mm_load_si128((const __m128i*)t);
}

// all ones in lanes [0, n) of 8 (a mask for maskload / maskstore)
static inline __m256i lanes(const int64_t n) {
    const int m = (int)std::max<int64_t>(0, std::min<int64_t>(8, n));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// a bit per key jb .. jb + 15: it exists (< Sk) and the mask row keeps it. kind 1: an
// additive float mask (-inf drops a key), kind 2: bool bytes (0 drops)
static inline uint32_t kept16(const int64_t kind, const float* mrow, const uint8_t* brow,
                              const int64_t Sk, const int64_t jb) {
    const int64_t n = Sk - jb;
    if (kind == 1) {
        const __m256 ninf = _mm256_set1_ps(-INFINITY);
        const __m256i l0 = lanes(n), l1 = lanes(n - 8);
        const __m256 a = _mm256_maskload_ps(mrow + jb, l0);
        const __m256 b = _mm256_maskload_ps(mrow + jb + 8, l1);
        const int m0 = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(a, ninf, _CMP_NEQ_UQ),
                                                        _mm256_castsi256_ps(l0)));
        const int m1 = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(b, ninf, _CMP_NEQ_UQ),
                                                        _mm256_castsi256_ps(l1)));
        return (uint32_t)(m0 | (m1 << 8));
    }
    const __m128i keep = bytes16(brow + jb, n);  // zeros past Sk
    return ~(uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(keep, _mm_setzero_si128())) & 0xFFFFu;
}

// [lo, hi): the keys a mask row keeps, lo rounded down to a block of 16, hi exact (lo >= hi:
// none)
static inline void kept_keys(const int64_t kind, const float* mrow, const uint8_t* brow,
                             const int64_t Sk, int64_t& lo, int64_t& hi) {
    lo = Sk;
    hi = 0;
    for (int64_t jb = 0; jb < Sk; jb += 16)
        if (kept16(kind, mrow, brow, Sk, jb)) {
            lo = jb;
            break;
        }
    for (int64_t jb = (Sk - 1) / 16 * 16; jb >= lo; jb -= 16)
        if (const uint32_t m = kept16(kind, mrow, brow, Sk, jb)) {
            hi = jb + 32 - __builtin_clz(m);
            break;
        }
}

// 16 bytes at p (the first n), sign-extended to 8 words of two int16
static inline __m256i words8(const int8_t* p, const int64_t n) {
    return _mm256_cvtepi8_epi16(bytes16(p, n));
}

static inline float hmax(const __m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

""" + PREFETCH_ROW_AND_OUT + r"""
// the first n (<= 8) lanes of y at o's element `at`
static inline void put(const Out& o, const int64_t at, const int64_t n, const __m256 y) {
    if (n <= 0) return;
    if (o.q == nullptr) {
        if (n >= 8) _mm256_storeu_ps(o.f + at, y);
        else _mm256_maskstore_ps(o.f + at, lanes(n), y);
        return;
    }
    __m256 t = _mm256_round_ps(_mm256_div_ps(y, _mm256_set1_ps(o.qs)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, _mm256_set1_ps(o.zp)),
                                    _mm256_set1_ps(o.lo)), _mm256_set1_ps(o.hi));
    const __m256i i = _mm256_cvtps_epi32(t);  // integers in [-128, 127]: packs are exact
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    const __m128i b = _mm_packs_epi16(w, w);
    if (n >= 8) {
        _mm_storel_epi64((__m128i*)(o.q + at), b);
    } else {
        alignas(16) int8_t t8[16];
        _mm_store_si128((__m128i*)t8, b);
        std::memcpy(o.q + at, t8, n);
    }
}

""" + KERNEL_HEAD + r"""const int64_t threads)
{
    // D2 words of two int16 per row; Dp: V's row and P V's columns, in blocks of 16
    const int64_t Skp = (Sk + 15) / 16 * 16, D2 = (D + 1) / 2, Dp = (D + 15) / 16 * 16;
    const int64_t group = Hq / Hkv;
    // qp: the int8 output's scale (0: float rows into out), zero point, qmin, qmax
    const Out o{out, qp[0] > 0.f ? qout : nullptr, oss, qp[0], qp[1], qp[2], qp[3]};
    #pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> kp((Dp / 2) * Skp);  // [Dp / 2][Skp] words, keys past Sk 0
        std::vector<float> vf(Skp * Dp);
        std::vector<float> rows(R * Skp);
        // a row's words are stored 8 at a time, the tail past D as zeros into the next
        // row's words (which that row then overwrites) or 8 words of slack at the end
        std::vector<int32_t> qw(R * D2 + 8);
""" + HEAD_LOOP + r"""
            // K as int16 pairs [d / 2][key]: 8 keys' rows of 16 bytes -> 8 x 8 words,
            // transposed
            for (int64_t j0 = 0; j0 < Skp; j0 += 8)
                for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
                    __m256i x[8];
                    for (int64_t i = 0; i < 8; i++)
                        x[i] = j0 + i < Sk ? words8(kb + (j0 + i) * kss + d0, D - d0)
                                           : _mm256_setzero_si256();
                    const __m256i t0 = _mm256_unpacklo_epi32(x[0], x[1]);
                    const __m256i t1 = _mm256_unpackhi_epi32(x[0], x[1]);
                    const __m256i t2 = _mm256_unpacklo_epi32(x[2], x[3]);
                    const __m256i t3 = _mm256_unpackhi_epi32(x[2], x[3]);
                    const __m256i t4 = _mm256_unpacklo_epi32(x[4], x[5]);
                    const __m256i t5 = _mm256_unpackhi_epi32(x[4], x[5]);
                    const __m256i t6 = _mm256_unpacklo_epi32(x[6], x[7]);
                    const __m256i t7 = _mm256_unpackhi_epi32(x[6], x[7]);
                    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // word 0 (4) of keys 0-3
                    const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // word 1 (5)
                    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // word 2 (6)
                    const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // word 3 (7)
                    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6);  // the same, keys 4-7
                    const __m256i u5 = _mm256_unpackhi_epi64(t4, t6);
                    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7);
                    const __m256i u7 = _mm256_unpackhi_epi64(t5, t7);
                    int32_t* dst = kp.data() + (d0 / 2) * Skp + j0;
                    const __m256i y[8] = {  // words 0-3: low halves, 4-7: high halves
                        _mm256_permute2x128_si256(u0, u4, 0x20),
                        _mm256_permute2x128_si256(u1, u5, 0x20),
                        _mm256_permute2x128_si256(u2, u6, 0x20),
                        _mm256_permute2x128_si256(u3, u7, 0x20),
                        _mm256_permute2x128_si256(u0, u4, 0x31),
                        _mm256_permute2x128_si256(u1, u5, 0x31),
                        _mm256_permute2x128_si256(u2, u6, 0x31),
                        _mm256_permute2x128_si256(u3, u7, 0x31)};
                    for (int64_t w = 0; w < 8; w++)
                        _mm256_storeu_si256((__m256i*)(dst + w * Skp), y[w]);
                }
            // V's codes as float32 [Sk][Dp], zeros past D
            for (int64_t j = 0; j < Sk; j++)
                for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
                    const __m128i x = bytes16(vb + j * vss_ + d0, D - d0);
                    _mm256_storeu_ps(vf.data() + j * Dp + d0,
                                     _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)));
                    _mm256_storeu_ps(vf.data() + j * Dp + d0 + 8, _mm256_cvtepi32_ps(
                        _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(x, x))));
                }
""" + NEXT_HEAD_PREFETCH + r"""
                // Q's rows as int16 pairs; rows past nr are not read back
                for (int64_t r = 0; r < nr; r++) {
                    const int8_t* qr = qb + (i0 + r) * qss;
                    for (int64_t d0 = 0; d0 < D; d0 += 16)
                        _mm256_storeu_si256((__m256i*)(qw.data() + r * D2 + d0 / 2),
                                            words8(qr + d0, D - d0));
                }
                // the keys any query of the block sees (see the VNNI kernel): the others
                // give P = 0 exactly, so skipping them changes no bit
""" + BLOCK_KEYS + r"""
                const __m256 ninf = _mm256_set1_ps(-INFINITY), vc = _mm256_set1_ps(c);
                for (int64_t jb = kbeg; jb < kend16; jb += 16) {
                    __m256i a0[R], a1[R];
                    for (int64_t r = 0; r < R; r++)
                        a0[r] = a1[r] = _mm256_setzero_si256();
                    for (int64_t d2 = 0; d2 < D2; d2++) {
                        const int32_t* kw = kp.data() + d2 * Skp + jb;
                        const __m256i w0 = _mm256_loadu_si256((const __m256i*)kw);
                        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(kw + 8));
                        for (int64_t r = 0; r < R; r++) {
                            const __m256i x = _mm256_set1_epi32(qw[r * D2 + d2]);
                            a0[r] = _mm256_add_epi32(a0[r], _mm256_madd_epi16(x, w0));
                            a1[r] = _mm256_add_epi32(a1[r], _mm256_madd_epi16(x, w1));
                        }
                    }
                    #pragma GCC unroll 4
                    for (int64_t r = 0; r < R; r++) {  // a constant count: a0, a1 in registers
                        if (r >= nr) continue;
                        const int64_t i = i0 + r;
                        const int64_t visible = causal ? std::min<int64_t>(Sk, i + 1) : Sk;
                        const int64_t mo = b * msb + h * msh + i * msq + jb;
                        __m256i l0 = lanes(visible - jb), l1 = lanes(visible - jb - 8);
                        __m256 t0 = _mm256_mul_ps(_mm256_cvtepi32_ps(a0[r]), vc);
                        __m256 t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(a1[r]), vc);
                        if (has_mask == 1) {
                            t0 = _mm256_add_ps(t0, _mm256_maskload_ps(mask + mo, l0));
                            t1 = _mm256_add_ps(t1, _mm256_maskload_ps(mask + mo + 8, l1));
                        } else if (has_mask == 2) {  // a bool keep mask: its bytes
                            const __m128i keep = bytes16(bmask + mo, visible - jb);
                            const __m256i z = _mm256_setzero_si256();
                            l0 = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(keep), z);
                            l1 = _mm256_cmpgt_epi32(
                                _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(keep, keep)), z);
                        }
                        float* row = rows.data() + r * Skp + jb;  // dropped keys: -inf
                        t0 = _mm256_blendv_ps(ninf, t0, _mm256_castsi256_ps(l0));
                        t1 = _mm256_blendv_ps(ninf, t1, _mm256_castsi256_ps(l1));
                        _mm256_storeu_ps(row, t0);
                        _mm256_storeu_ps(row + 8, t1);
                    }
                }
                float scale[R];
                for (int64_t r = 0; r < nr; r++) {
                    float* row = rows.data() + r * Skp;
                    __m256 vm = ninf;
                    for (int64_t jb = kbeg; jb < kend16; jb += 8)
                        vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + jb));
                    const float mx = hmax(vm);
                    if (mx == -INFINITY) {  // no visible key: the row gives 0
                        std::fill(row, row + Skp, 0.f);
                        scale[r] = 0.f;
                        continue;
                    }
                    Vec vmx(mx), vsum(0.f);
                    for (int64_t jb = kbeg; jb < kend16; jb += Vec::size()) {
                        auto e = (Vec::loadu(row + jb) - vmx).exp_u20();
                        e.store(row + jb);
                        vsum = vsum + e;
                    }
                    scale[r] = vs / at::vec::vec_reduce_all<float>(
                        [](Vec& x, Vec& y) { return x + y; }, vsum);
                }
                for (int64_t r = nr; r < R; r++) {  // rows past the end: P = 0, not stored
                    std::fill(rows.data() + r * Skp, rows.data() + (r + 1) * Skp, 0.f);
                    scale[r] = 0.f;
                }
                // P V in float32 FMAs, 16 columns of 4 rows at a time
                const int64_t at0 = b * osb + h * osh + i0 * oss;
                for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
                    __m256 a0[R], a1[R];
                    for (int64_t r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
                    for (int64_t j = kbeg; j < kend; j++) {
                        const __m256 v0 = _mm256_loadu_ps(vf.data() + j * Dp + d0);
                        const __m256 v1 = _mm256_loadu_ps(vf.data() + j * Dp + d0 + 8);
                        for (int64_t r = 0; r < R; r++) {
                            const __m256 p = _mm256_broadcast_ss(rows.data() + r * Skp + j);
                            a0[r] = _mm256_fmadd_ps(p, v0, a0[r]);
                            a1[r] = _mm256_fmadd_ps(p, v1, a1[r]);
                        }
                    }
                    #pragma GCC unroll 4
                    for (int64_t r = 0; r < R; r++) {
                        if (r >= nr) continue;
                        const __m256 s = _mm256_set1_ps(scale[r]);
                        const int64_t at = at0 + r * o.rs + d0;
                        put(o, at, D - d0, _mm256_mul_ps(a0[r], s));
                        put(o, at + 8, D - d0 - 8, _mm256_mul_ps(a1[r], s));
                    }
                }
            }
        }
    }
}
"""

_ARGTYPES = KERNEL_HEAD_ARGTYPES + ["const int64_t"]  # threads


def avx2_attention_available() -> bool:
    """This CPU has AVX2 and FMA, Inductor builds its CPU kernels for AVX2 or AVX-512 here,
    and this kernel builds."""
    from torch._inductor import cpu_vec_isa

    from qcompile.lowering.cpu_routes import _cpuinfo, cpu_capabilities

    if not (cpu_capabilities().avx2 and "fma" in _cpuinfo()[1]):
        return False
    macros = cpu_vec_isa.pick_vec_isa().build_macro()
    return (any(m in macros for m in ("CPU_CAPABILITY_AVX2", "CPU_CAPABILITY_AVX512"))
            and kernel_builds())


@functools.cache
def kernel_builds() -> bool:
    """Inductor's C++ toolchain builds the kernel here (once per process; cached on disk)."""
    return builds(lambda: _kernel(), "AVX2 attention kernel",
                  "int8 attention runs as float SDPA on the dequantized inputs")


@functools.cache
def _kernel():
    return load_kernel(_ARGTYPES, _SOURCE)


def quantized_attention_avx2(q, k, v, q_scale, k_scale, v_scale, *, causal=False,
                             attn_mask=None, sm_scale=None, out_dtype=torch.float32,
                             out_q=None):
    """attention_int8's contract on CPU tensors (attention_int8_q's with out_q = (scale, zero
    point, qmin, qmax)), as `quantized_attention_vnni` takes it."""
    from qcompile.lowering.kernels.attention_cpu import run_attention_kernel

    return run_attention_kernel(_kernel(), q, k, v, q_scale, k_scale,
                                v_scale, causal=causal, attn_mask=attn_mask,
                                sm_scale=sm_scale, out_dtype=out_dtype, out_q=out_q)
