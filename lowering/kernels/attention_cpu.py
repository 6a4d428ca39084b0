"""Quantized attention on CPUs with AVX512-VNNI: int8 Q K^T in VNNI dot products, one C++
kernel per call.

What: out = softmax(c[h] * (Q K^T) + mask) (V * vs[h]) for int8 Q [B, Hq, Sq, D], K and V
[B, Hkv, Sk, D], the contract of `quantized_attention_ref` (lowering/kernels/attention.py):
c[h] = q_scale * k_scale * sm_scale and vs[h] = v_scale per q head (grouped-query
attention: q head h reads kv head h // (Hq // Hkv)); masks causal (top-left aligned)
and additive float or boolean (True = keep) broadcastable to [B, Hq, Sq, Sk]; a query
with no visible key gives 0. Output float32, cast to out_dtype.

How, per (batch, q head), on one thread (OpenMP hands out a batch's heads at a time):
- K is packed once into VNNI order (4 consecutive d of 16 keys per 64-byte line, with
  128 * rowsum(K) beside it) and V converted to float32 (exact);
- per block of 4 queries, over the keys from the first (rounded down to 16) to the last
  that the mask keeps for any of its queries (padding on either side, a sliding window or
  causality drop the rest at no cost: their probabilities are exactly 0, so skipping them
  changes no bit): S = Q K^T exactly in int32 with `vpdpbusd`, which multiplies
  unsigned by signed bytes, so Q is fed as q + 128 and 128 * rowsum(K) subtracted (exact:
  |(q + 128) k| summed over D stays far below 2**31 for D <= 2**16);
- logits t = float32(S) * c[h] + mask, then softmax in float32 (ATen's vectorized exp,
  the one PyTorch's CPU flash attention uses), P V in float32 FMAs, vs[h] / sum applied
  once per row. Where the CPU has AVX512-BF16, P V runs on pairs of keys with
  `vdpbf16ps`: P rounded to bf16 (as the GPU kernel rounds it to float16, with 3 bits
  less), V's codes exact in bf16, sums in float32; half the P V instructions (MiniLM
  w8a8-static 110.5 against 117.9 ms per batch, embedding cosine 0.99796 against 0.99799).
- the batch's next head's Q, K and V rows are prefetched while this one runs: rows of D
  bytes a whole token apart otherwise stall their packing on memory; byte rows are read
  and stored with whole vector loads and stores where they can (on this Zen 4, masked byte
  loads of Q's rows took a fifth of the kernel's time, and masked stores stall the word
  loads that read them back).
Why: float SDPA on the dequantized inputs (the `cpu` implementation) runs all-MiniLM-L6-v2's
attention (32 x 12 heads x 128 x 32) in about 7 ms per layer on 2 Zen 4 cores, plus a pass
that dequantizes q, k and v; this kernel takes about 2.2 ms from the int8 codes with the
bench's padding (79.6 real tokens of 128), 2.7 ms without. For
attention_int8_q it quantizes each output row as it stores it (quantize's arithmetic on
the same float32 values), token-major.

Not exact: like every implementation of attention_int8, only S is integer; the softmax
and P V are float (close to the float64 reference within the op's tolerance).
Built on first use by Inductor's C++ toolchain (the compiler and flags it uses for its
own CPU kernels, cached on disk the same way), so it needs what torch.compile on CPU
needs; machines without AVX512-VNNI (or where it does not build) use the AVX2 kernel
(attention_avx2.py, which shares this module's calling code, `run_attention_kernel`) or,
without AVX2, `cpu-sdpa`.
"""

from __future__ import annotations

import functools

import torch

from qcompile.lowering.kernels.attention import _additive_mask, _check, _scales, token_major
from qcompile.lowering.kernels.cpp_build import builds, load_kernel

# C++ both CPU attention kernels use as it is (attention_avx2.py builds its source from
# these too): the kernels' common arguments (run_attention_kernel passes them, then each
# kernel's own), prefetching a row, where a block's rows go, the prefetch of the batch's
# next head and [kbeg, kend), the keys any query of a block sees
KERNEL_HEAD = r"""
extern "C" void kernel(const int8_t* q, const int8_t* k, const int8_t* v, const float* mask,
                       const uint8_t* bmask,
                       float* out, int8_t* qout, const float* qp, const float* cs,
                       const float* vss,
                       const int64_t B, const int64_t Hq, const int64_t Hkv,
                       const int64_t Sq, const int64_t Sk, const int64_t D,
                       const int64_t qsb, const int64_t qsh, const int64_t qss,
                       const int64_t ksb, const int64_t ksh, const int64_t kss,
                       const int64_t vsb, const int64_t vsh, const int64_t vss_,
                       const int64_t msb, const int64_t msh, const int64_t msq,
                       const int64_t osb, const int64_t osh, const int64_t oss,
                       const int64_t has_mask, const int64_t causal, """[1:]
KERNEL_HEAD_ARGTYPES = ["const int8_t*"] * 3 + [
    "const float*", "const uint8_t*", "float*", "int8_t*", "const float*", "const float*",
    "const float*"] + ["const int64_t"] * 23
PREFETCH_ROW_AND_OUT = r"""
static inline void prefetch_row(const int8_t* p, const int64_t n) {
    for (int64_t d = 0; d < n; d += 64) _mm_prefetch((const char*)(p + d), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + n - 1), _MM_HINT_T0);  // a row that ends in another line
}

// where a block's rows go: float32 rows, or int8 codes quantized as qcompile::quantize
// quantizes (float32 true division, round half to even, + zero point, clamp); rows
// o.rs elements apart
struct Out {
    float* f;
    int8_t* q;
    int64_t rs;
    float qs, zp, lo, hi;
};
"""[1:]
NEXT_HEAD_PREFETCH = r"""
            // the batch's next head's rows (this thread runs it next), a block of Q and a
            // share of K and V per query block, so that they do not wait on memory (rows are
            // D bytes, strided apart); the batch's last head has none to fetch
            const bool ahead = h + 1 < Hq;
            const int8_t* qn = qb + qsh;
            const int8_t* kn = k + b * ksb + (h + 1) / group * ksh;
            const int8_t* vn = v + b * vsb + (h + 1) / group * vsh;
            const int64_t blocks = (Sq + R - 1) / R, share = (Sk + blocks - 1) / blocks;
            for (int64_t i0 = 0; i0 < Sq; i0 += R) {
                const int64_t nr = std::min<int64_t>(R, Sq - i0);
                if (ahead) {
                    for (int64_t r = i0; r < i0 + nr; r++) prefetch_row(qn + r * qss, D);
                    for (int64_t j = i0 / R * share;
                         j < std::min<int64_t>(Sk, (i0 / R + 1) * share); j++) {
                        prefetch_row(kn + j * kss, D);
                        prefetch_row(vn + j * vss_, D);
                    }
                }
"""[1:-1]
BLOCK_KEYS = r"""
                int64_t kbeg = 0, kend = causal ? std::min<int64_t>(Sk, i0 + nr) : Sk;
                if (has_mask) {
                    int64_t lo = Sk, hi = 0;
                    for (int64_t r = 0; r < nr; r++) {
                        const int64_t mo = b * msb + h * msh + (i0 + r) * msq;
                        int64_t l, e;
                        kept_keys(has_mask, mask + mo, bmask + mo, Sk, l, e);
                        lo = std::min(lo, l);
                        hi = std::max(hi, e);
                    }
                    kbeg = std::min(lo, kend) / 16 * 16;
                    kend = std::max(kbeg, std::min(kend, hi));
                }
                const int64_t kend16 = (kend + 15) / 16 * 16;
"""[1:-1]

HEAD_LOOP = r"""
        // a batch's heads at a time to whichever thread is free: batches cost differently
        // (padding), so contiguous halves would leave a thread idle
        #pragma omp for schedule(dynamic, Hq)
        for (int64_t bh = 0; bh < B * Hq; bh++) {
            const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
            const int8_t* qb = q + b * qsb + h * qsh;
            const int8_t* kb = k + b * ksb + hk * ksh;
            const int8_t* vb = v + b * vsb + hk * vsh;
            const float c = cs[h], vs = vss[h];
"""[1:-1]  # over (batch, q head): its Q, K, V rows and scales

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

constexpr int64_t R = 4;  // queries per block

static inline __mmask16 first(int64_t n) {
    return n <= 0 ? (__mmask16)0 : n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

// the first n of 16 bytes at p, zeros after them (a whole load where it can: masked byte
// loads stalled this kernel on Zen 4, see the module docstring)
static inline __m128i bytes16(const void* p, const int64_t n) {
    return n >= 16 ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(first(n), p);
}

static inline void zero_block(__m512* a0, __m512* a1) {
    for (int64_t r = 0; r < R; r++) {
        a0[r] = _mm512_setzero_ps();
        a1[r] = _mm512_setzero_ps();
    }
}

// [lo, hi): the keys a mask row keeps, lo rounded down to a block of 16, hi exact (lo >= hi:
// none). kind 1: an additive float mask (-inf drops a key), kind 2: bool bytes (0 drops)
static inline void kept_keys(const int64_t kind, const float* mrow, const uint8_t* brow,
                             const int64_t Sk, int64_t& lo, int64_t& hi) {
    auto kept = [&](const int64_t jb) -> uint32_t {
        const __mmask16 m = first(Sk - jb);
        if (kind == 1)
            return _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, mrow + jb),
                                           _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
        const __m128i keep = bytes16(brow + jb, Sk - jb);  // zeros past Sk
        return _mm_test_epi8_mask(keep, keep);
    };
    lo = Sk;
    hi = 0;
    for (int64_t jb = 0; jb < Sk; jb += 16)
        if (kept(jb)) {
            lo = jb;
            break;
        }
    for (int64_t jb = (Sk - 1) / 16 * 16; jb >= lo; jb -= 16)
        if (const uint32_t m = kept(jb)) {
            hi = jb + 32 - __builtin_clz(m);
            break;
        }
}

""" + PREFETCH_ROW_AND_OUT + r"""
static inline void put(const Out& o, const int64_t at, const __mmask16 m, const __m512 y) {
    if (o.q == nullptr) {
        _mm512_mask_storeu_ps(o.f + at, m, y);
        return;
    }
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(y, _mm512_set1_ps(o.qs)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(t, _mm512_set1_ps(o.zp)),
                                    _mm512_set1_ps(o.lo)), _mm512_set1_ps(o.hi));
    _mm_mask_storeu_epi8(o.q + at, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
}

// out rows at0 + r * o.rs, d0 .. d0 + 31 (two vectors where Dp allows), scaled; scale < 0:
// a row past the block's end, not stored
static inline void store_block(const __m512* a0, const __m512* a1, const Out& o,
                               const int64_t at0, const int64_t D, const int64_t d0,
                               const bool two, const float* scale) {
    for (int64_t r = 0; r < R; r++) {
        if (scale[r] < 0.f) continue;
        const int64_t at = at0 + r * o.rs;
        const __m512 s = _mm512_set1_ps(scale[r]);
        put(o, at + d0, first(D - d0), _mm512_mul_ps(a0[r], s));
        if (two)
            put(o, at + d0 + 16, first(D - d0 - 16), _mm512_mul_ps(a1[r], s));
    }
}

// P V in float32 FMAs: vf holds V's codes as float32 [Skp][Dp]
static void pv_f32(const float* rows, const float* vf, const int64_t Skp, const int64_t Dp,
                   const int64_t D, const int64_t kbeg, const int64_t kend, const Out& o,
                   const int64_t at0, const float* scale) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
        const bool two = d0 + 16 < Dp;
        __m512 a0[R], a1[R];
        zero_block(a0, a1);
        for (int64_t j = kbeg; j < kend; j++) {
            const __m512 v0 = _mm512_loadu_ps(vf + j * Dp + d0);
            const __m512 v1 = two ? _mm512_loadu_ps(vf + j * Dp + d0 + 16) : v0;
            for (int64_t r = 0; r < R; r++) {
                const __m512 p = _mm512_set1_ps(rows[r * Skp + j]);
                a0[r] = _mm512_fmadd_ps(p, v0, a0[r]);
                a1[r] = _mm512_fmadd_ps(p, v1, a1[r]);
            }
        }
        store_block(a0, a1, o, at0, D, d0, two, scale);
    }
}

// P V with bf16 pairs (AVX512-BF16's vdpbf16ps): out[r][d] = sum_j P[r][j] V[j][d] for
// the nr rows of a block, keys in pairs: pw holds each row's P rounded to bf16 ([R][Skp]),
// vpk V's codes as bf16 (exact: integers below 2**8) in pairs [Skp / 2][Dp][2].
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void pv_bf16(const float* rows, uint16_t* pw, const uint16_t* vpk, const int64_t Skp,
                    const int64_t Dp, const int64_t D, const int64_t kbeg, const int64_t kend,
                    const Out& o, const int64_t at0, const float* scale) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t jb = kbeg; jb < kend; jb += 16)
            _mm256_storeu_si256((__m256i*)(pw + r * Skp + jb),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(rows + r * Skp + jb)));
    const uint32_t* pw32 = (const uint32_t*)pw;
    const int64_t pairs = (kend + 1) / 2;
    for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
        const bool two = d0 + 16 < Dp;
        __m512 a0[R], a1[R];
        zero_block(a0, a1);
        for (int64_t w = kbeg / 2; w < pairs; w++) {
            const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vpk + (w * Dp + d0) * 2);
            const __m512bh v1 = two ? (__m512bh)_mm512_loadu_si512(vpk + (w * Dp + d0 + 16) * 2)
                                    : v0;
            for (int64_t r = 0; r < R; r++) {
                const __m512bh p = (__m512bh)_mm512_set1_epi32(pw32[r * (Skp / 2) + w]);
                a0[r] = _mm512_dpbf16_ps(a0[r], p, v0);
                a1[r] = _mm512_dpbf16_ps(a1[r], p, v1);
            }
        }
        store_block(a0, a1, o, at0, D, d0, two, scale);
    }
}

// V's codes as bf16 pairs [Sk / 2][Dp][2] (the bf16 of a small integer is the top half of
// its float32: exact); d >= D and a missing last key hold 0
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void pack_v_bf16(const int8_t* vb, const int64_t vs_, const int64_t Sk, const int64_t D,
                        const int64_t Dp, uint16_t* vpk) {
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t j = 0; j < Sk; j += 2) {
        const int8_t* r0 = vb + j * vs_;
        const int8_t* r1 = vb + (j + 1) * vs_;
        for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
            const __m512 a = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(bytes16(r0 + d0, D - d0)));
            __m512i w = _mm512_srli_epi32(_mm512_castps_si512(a), 16);
            if (j + 1 < Sk) {
                const __m512 b = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(bytes16(r1 + d0, D - d0)));
                w = _mm512_or_si512(w, _mm512_and_si512(_mm512_castps_si512(b), top));
            }
            _mm512_storeu_si512(vpk + ((j / 2) * Dp + d0) * 2, w);
        }
    }
}

""" + KERNEL_HEAD + r"""const int64_t bf16,
                       const int64_t threads)
{
    const int64_t Skp = (Sk + 15) / 16 * 16, D4 = (D + 3) / 4, Dp = (D + 15) / 16 * 16;
    const int64_t group = Hq / Hkv;
    // qp: the int8 output's scale (0: float rows into out), zero point, qmin, qmax
    const Out o{out, qp[0] > 0.f ? qout : nullptr, oss, qp[0], qp[1], qp[2], qp[3]};
    #pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> kp(D4 * Skp);  // [D4][Skp] words of 4 bytes
        std::vector<int32_t> ksum(Skp);
        std::vector<float> vf(bf16 ? 0 : Skp * Dp);
        std::vector<uint16_t> vpk(bf16 ? Skp * Dp : 0), pw(bf16 ? R * Skp : 0);
        std::vector<float> rows(R * Skp);
        // a row's bytes are stored 32 at a time, the tail past D as 0x80 (the padding's
        // q + 128 for q = 0) into the next row's words, which that row then overwrites:
        // words of slack at the end (whole stores forward to the word loads that follow;
        // masked ones do not, and stall them)
        std::vector<int32_t> qw(R * D4 + 8);
""" + HEAD_LOOP + r"""
            uint8_t* kp8 = (uint8_t*)kp.data();
            std::fill(kp.begin(), kp.end(), 0);
            for (int64_t j = 0; j < Sk; j++) {
                const int8_t* kr = kb + j * kss;
                if (D % 4 == 0) {
                    for (int64_t d4 = 0; d4 < D4; d4++) {
                        int32_t word;
                        std::memcpy(&word, kr + 4 * d4, 4);
                        kp[d4 * Skp + j] = word;
                    }
                } else {
                    for (int64_t d = 0; d < D; d++)
                        kp8[((d / 4) * Skp + j) * 4 + d % 4] = (uint8_t)kr[d];
                }
            }
            // 128 * rowsum(K) per key: dot products of the packed words with bytes of 1
            for (int64_t jb = 0; jb < Skp; jb += 16) {
                __m512i sum = _mm512_setzero_si512();
                for (int64_t d4 = 0; d4 < D4; d4++)
                    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(0x01010101),
                                              _mm512_loadu_si512(kp.data() + d4 * Skp + jb));
                _mm512_storeu_si512(ksum.data() + jb, _mm512_slli_epi32(sum, 7));
            }
            if (bf16) {
                pack_v_bf16(vb, vss_, Sk, D, Dp, vpk.data());
            } else {
                for (int64_t j = 0; j < Sk; j++) {
                    const int8_t* vr = vb + j * vss_;
                    for (int64_t d = 0; d < D; d++) vf[j * Dp + d] = (float)vr[d];
                    for (int64_t d = D; d < Dp; d++) vf[j * Dp + d] = 0.f;
                }
            }
""" + NEXT_HEAD_PREFETCH + r"""
                uint8_t* qu = (uint8_t*)qw.data();
                // q + 128 as unsigned (q's sign bit flipped); rows past nr are not read back
                for (int64_t r = 0; r < nr; r++) {
                    const int8_t* qr = qb + (i0 + r) * qss;
                    uint8_t* qo = qu + r * D4 * 4;
                    int64_t d = 0;
                    for (; d + 32 <= D; d += 32)
                        _mm256_storeu_si256((__m256i*)(qo + d), _mm256_xor_si256(
                            _mm256_loadu_si256((const __m256i*)(qr + d)),
                            _mm256_set1_epi8((char)0x80)));
                    if (d < D)  // whole stores (see qw)
                        _mm256_storeu_si256((__m256i*)(qo + d), _mm256_xor_si256(
                            _mm256_maskz_loadu_epi8(((__mmask32)1 << (D - d)) - 1, qr + d),
                            _mm256_set1_epi8((char)0x80)));
                }
                // causal: no key beyond the block's last query is visible to any of its rows;
                // a mask that drops leading or trailing keys for all of them (padding, a
                // sliding window) narrows [kbeg, kend) too: the keys outside give P = 0
                // exactly, so skipping them changes no bit
""" + BLOCK_KEYS + r"""
                for (int64_t jb = kbeg; jb < kend16; jb += 16) {
                    if (jb >= kend) {
                        for (int64_t r = 0; r < nr; r++)
                            _mm512_storeu_ps(rows.data() + r * Skp + jb, _mm512_set1_ps(-INFINITY));
                        continue;
                    }
                    __m512i acc[R];
                    for (int64_t r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
                    for (int64_t d4 = 0; d4 < D4; d4++) {
                        __m512i w = _mm512_loadu_si512(kp.data() + d4 * Skp + jb);
                        for (int64_t r = 0; r < R; r++)
                            acc[r] = _mm512_dpbusd_epi32(
                                acc[r], _mm512_set1_epi32(qw[r * D4 + d4]), w);
                    }
                    __m512i ks = _mm512_loadu_si512(ksum.data() + jb);
                    for (int64_t r = 0; r < nr; r++) {
                        const int64_t i = i0 + r;
                        const int64_t visible = causal ? std::min<int64_t>(Sk, i + 1) : Sk;
                        __mmask16 live = first(visible - jb);
                        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], ks)),
                                                 _mm512_set1_ps(c));
                        const int64_t mo = b * msb + h * msh + i * msq + jb;
                        if (has_mask == 1)
                            t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(live, mask + mo));
                        else if (has_mask == 2) {  // a bool keep mask: its bytes
                            const __m128i keep = bytes16(bmask + mo, visible - jb);
                            live &= _mm_test_epi8_mask(keep, keep);
                        }
                        t = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), t);
                        _mm512_storeu_ps(rows.data() + r * Skp + jb, t);
                    }
                }
                float scale[R] = {-1.f, -1.f, -1.f, -1.f};  // < 0: no such row
                for (int64_t r = 0; r < nr; r++) {
                    float* row = rows.data() + r * Skp;
                    __m512 vm = _mm512_set1_ps(-INFINITY);
                    for (int64_t jb = kbeg; jb < kend16; jb += 16)
                        vm = _mm512_max_ps(vm, _mm512_loadu_ps(row + jb));
                    const float mx = _mm512_reduce_max_ps(vm);
                    if (mx == -INFINITY) {  // no visible key: the row gives 0
                        std::fill(row, row + Skp, 0.f);
                        scale[r] = 0.f;
                        continue;
                    }
                    at::vec::Vectorized<float> vmx(mx), vsum(0.f);
                    for (int64_t jb = kbeg; jb < kend16; jb += 16) {
                        auto e = (at::vec::Vectorized<float>::loadu(row + jb) - vmx).exp_u20();
                        e.store(row + jb);
                        vsum = vsum + e;
                    }
                    scale[r] = vs / at::vec::vec_reduce_all<float>(
                        [](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) {
                            return x + y;
                        }, vsum);
                }
                if (bf16) {
                    for (int64_t r = nr; r < R; r++)  // rows past the end: P = 0
                        std::fill(rows.data() + r * Skp, rows.data() + (r + 1) * Skp, 0.f);
                    pv_bf16(rows.data(), pw.data(), vpk.data(), Skp, Dp, D, kbeg, kend,
                            o, b * osb + h * osh + i0 * oss, scale);
                } else {
                    pv_f32(rows.data(), vf.data(), Skp, Dp, D, kbeg, kend, o,
                           b * osb + h * osh + i0 * oss, scale);
                }
            }
        }
    }
}
"""

_ARGTYPES = KERNEL_HEAD_ARGTYPES + ["const int64_t"] * 2  # bf16, threads


def vnni_attention_available() -> bool:
    """This CPU has AVX512-VNNI, Inductor builds its CPU kernels for it, and this kernel
    builds (its P V for AVX512-BF16 needs a compiler that targets it)."""
    from torch._inductor import cpu_vec_isa

    from qcompile.lowering.cpu_routes import cpu_capabilities

    if not cpu_capabilities().avx512_vnni:
        return False
    isa = cpu_vec_isa.pick_vec_isa()
    return ("-mavx512vnni" in isa.build_arch_flags()
            and "CPU_CAPABILITY_AVX512" in isa.build_macro() and kernel_builds())


@functools.cache
def kernel_builds() -> bool:
    """Inductor's C++ toolchain builds the kernel here (once per process; cached on disk)."""
    # (its P V needs a compiler that targets AVX512-BF16)
    return builds(lambda: _kernel(), "VNNI attention kernel",
                  "int8 attention runs as float SDPA on the dequantized inputs")


@functools.cache
def _kernel():
    return load_kernel(_ARGTYPES, _SOURCE)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _unused() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Placeholders for the pointer arguments a call does not use: the byte mask, the int8
    output, the float output (and the int8 output's parameters, a scale of 0). Made on
    first use, not at import: a module first imported under a fake mode (an op's fake
    implementation) would make them fake."""
    return (torch.zeros(1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int8),
            torch.zeros(4, dtype=torch.float32))


@functools.cache
def bf16_pv_available() -> bool:
    """This CPU has AVX512-BF16 (vdpbf16ps): P V runs on bf16 pairs."""
    from qcompile.lowering.cpu_routes import _cpuinfo

    return "avx512_bf16" in _cpuinfo()[1]


def quantized_attention_vnni(q, k, v, q_scale, k_scale, v_scale, *, causal=False,
                             attn_mask=None, sm_scale=None, out_dtype=torch.float32,
                             bf16=None, out_q=None):
    """attention_int8's contract on CPU tensors (see the module docstring); with out_q =
    (scale, zero point, qmin, qmax), attention_int8_q's: the float32 rows quantized as they
    are stored, into int8 in the token-major layout."""
    pv_bf16 = int(bf16_pv_available() if bf16 is None else bf16)
    return run_attention_kernel(_kernel(), q, k, v, q_scale, k_scale, v_scale, causal=causal,
                                attn_mask=attn_mask, sm_scale=sm_scale, out_dtype=out_dtype,
                                out_q=out_q, flags=(pv_bf16,))


def run_attention_kernel(kernel, q, k, v, q_scale, k_scale, v_scale, *, causal, attn_mask,
                         sm_scale, out_dtype, out_q, flags=()):
    """Calls a CPU attention kernel of this module's signature (the VNNI one, the AVX2 one
    in attention_avx2.py): strides, masks (bool as bytes, float as float32, both broadcast),
    the float or int8 output; `flags` are the kernel's own arguments before the thread
    count."""
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    c, vs, _ = _scales(q, k, q_scale, k_scale, v_scale, sm_scale)
    c, vs = c.to(torch.float32), vs.to(torch.float32)
    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    no_bytes, no_codes, no_floats = _unused()
    if out_q is None:
        out = torch.empty((B, Hq, Sq, D), dtype=torch.float32)
        written, qout, qp = out, None, no_floats
    else:
        if not out_q[0] > 0:  # the kernel reads a scale of 0 as "store float rows"
            raise ValueError(f"attention_int8_q: output scale {out_q[0]} is not positive")
        qout = token_major((B, Hq, Sq, D), torch.int8)
        written, out, qp = qout, no_floats, torch.tensor(out_q, dtype=torch.float32)
    if not written.numel():
        return written if out_q is not None else out.to(out_dtype)
    # a bool mask is read as it is (its bytes); a float one as float32, both broadcast
    bool_mask = attn_mask is not None and attn_mask.dtype == torch.bool
    if bool_mask:
        mask = _last_dim_dense(attn_mask.expand(B, Hq, Sq, Sk)).view(torch.uint8)
    else:
        mask = _additive_mask(attn_mask, (B, Hq, Sq, Sk), q.device)
        mask = _last_dim_dense(mask) if mask is not None else None
    ms = mask.stride()[:3] if mask is not None else (0, 0, 0)
    kind = 0 if mask is None else 2 if bool_mask else 1
    kernel(q, k, v, mask if kind == 1 else c, mask if kind == 2 else no_bytes, out,
           qout if qout is not None else no_codes, qp, c, vs,
           B, Hq, Hkv, Sq, Sk, D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms,
           *written.stride()[:3], kind, int(causal), *flags, torch.get_num_threads())
    return qout if out_q is not None else out.to(out_dtype)
