"""Exact int8 GEMMs for ARM (AArch64 NEON): acc int32 [M, N] = A [M, K] @ W [N, K]^T.

What: three micro-kernels over one packed weight layout, each giving the int32 accumulator
of reference.gemm_int8_ref bit for bit, for any int8 values (K <= 131071, check_k):
  neon       base Armv8 NEON: SMULL (int8 x int8 -> int16: |p| <= 2**14, exact) and SADALP
             (adjacent int16 pairs added into int32 lanes: exact). No int16 accumulation,
             so no saturation, unlike x86's VPMADDUBSW.
  neon-sdot  Armv8.2 dot product (SDOT, /proc/cpuinfo "asimddp"): four int8 x int8
             products summed straight into an int32 lane.
  neon-i8mm  Armv8.6 int8 matrix multiply (SMMLA, "i8mm"): a 2 x 8 by 8 x 2 int8 product
             into a 2 x 2 int32 tile.
Each is compiled with its own target attribute into one library, so a build holds all
three and the caller picks the one its CPU has (cpu_routes: HWCAP / /proc/cpuinfo).

Layout: W is packed once per weight (`pack_weights`) into panels of 8 columns and steps of
8 along K, zero-padded: [N/8][K/8][4][16], block j holding 8 bytes of column 2j then 8
of column 2j + 1 (one SMMLA operand; two SMULL operands; one SDOT operand for two columns
at once). A is packed per call into tiles of 4 rows, [M/4][K/8][4][8]. A micro-kernel
computes a 4 x 8 tile over the whole K; tiles are spread over threads by blocks of 64 x 64.

Why: torch._int_mm on an ARM CPU is a scalar loop (oneDNN's int8 matmul is used only with
AVX512-VNNI), and the x86 oneDNN u8 x s8 routes do not exist there: without this, every
layer on ARM runs fp32-exact, float32's speed, so auto keeps them all float. Whether
these kernels beat float32 sgemm at a layer's shape depends on the core: select-layers
times each quantized layer against float on the machine (lowering/latency.py) and keeps
the faster, never a table (none was measured on ARM hardware: this repository's machines
are x86, where scripts/arm-check.sh runs these kernels under qemu for exactness only).

Built on first use by Inductor's C++ toolchain (lowering/kernels/cpp_build.py); only on
AArch64 (`kernel_builds` is False elsewhere, without trying).
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

from qcompile.lowering.kernels.cpp_build import builds, load_kernel

VARIANTS = {"neon": 0, "neon-sdot": 1, "neon-i8mm": 2}
MR, NR, KR = 4, 8, 8  # rows per tile, columns per panel, K per step

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <arm_neon.h>
#include <algorithm>
#include <cstring>
#include <memory>

// One 4 x 8 tile over K8 steps: a [K8][4][8] (4 rows), w [K8][4][16] (8 columns, in
// pairs); c [4][8] int32.

__attribute__((target("arch=armv8-a")))
static void tile_neon(const int8_t* a, const int8_t* w, int64_t K8, int32_t* c) {
    for (int h = 0; h < 2; h++) {  // rows 2h, 2h + 1: 16 accumulators
        int32x4_t acc[2][8];
        for (int r = 0; r < 2; r++)
            for (int j = 0; j < 8; j++) acc[r][j] = vdupq_n_s32(0);
        for (int64_t s = 0; s < K8; s++) {
            const int8_t* as = a + s * 32 + h * 16;
            const int8_t* ws = w + s * 64;
            const int8x8_t a0 = vld1_s8(as), a1 = vld1_s8(as + 8);
            for (int j = 0; j < 4; j++) {
                const int8x16_t b = vld1q_s8(ws + 16 * j);
                const int8x8_t lo = vget_low_s8(b), hi = vget_high_s8(b);
                acc[0][2 * j] = vpadalq_s16(acc[0][2 * j], vmull_s8(lo, a0));
                acc[0][2 * j + 1] = vpadalq_s16(acc[0][2 * j + 1], vmull_s8(hi, a0));
                acc[1][2 * j] = vpadalq_s16(acc[1][2 * j], vmull_s8(lo, a1));
                acc[1][2 * j + 1] = vpadalq_s16(acc[1][2 * j + 1], vmull_s8(hi, a1));
            }
        }
        for (int r = 0; r < 2; r++)
            for (int j = 0; j < 8; j++) c[(2 * h + r) * 8 + j] = vaddvq_s32(acc[r][j]);
    }
}

__attribute__((target("arch=armv8.2-a+dotprod")))
static void tile_sdot(const int8_t* a, const int8_t* w, int64_t K8, int32_t* c) {
    // acc[r][j] lanes: column 2j on k 0..3 and 4..7, column 2j + 1 on k 0..3 and 4..7
    int32x4_t acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = vdupq_n_s32(0);
    for (int64_t s = 0; s < K8; s++) {
        const int8_t* as = a + s * 32;
        const int8_t* ws = w + s * 64;
        const int8x16_t b0 = vld1q_s8(ws), b1 = vld1q_s8(ws + 16), b2 = vld1q_s8(ws + 32),
                        b3 = vld1q_s8(ws + 48);
        for (int r = 0; r < 4; r++) {
            int64_t bits;
            std::memcpy(&bits, as + 8 * r, 8);
            const int8x16_t ar = vreinterpretq_s8_s64(vdupq_n_s64(bits));  // row r's 8 k twice
            acc[r][0] = vdotq_s32(acc[r][0], b0, ar);
            acc[r][1] = vdotq_s32(acc[r][1], b1, ar);
            acc[r][2] = vdotq_s32(acc[r][2], b2, ar);
            acc[r][3] = vdotq_s32(acc[r][3], b3, ar);
        }
    }
    for (int r = 0; r < 4; r++) {
        vst1q_s32(c + r * 8, vpaddq_s32(acc[r][0], acc[r][1]));
        vst1q_s32(c + r * 8 + 4, vpaddq_s32(acc[r][2], acc[r][3]));
    }
}

__attribute__((target("arch=armv8.2-a+i8mm")))
static void tile_i8mm(const int8_t* a, const int8_t* w, int64_t K8, int32_t* c) {
    // acc[i][j]: rows 2i, 2i + 1 by columns 2j, 2j + 1, as [r0 c0, r0 c1, r1 c0, r1 c1]
    int32x4_t acc[2][4];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = vdupq_n_s32(0);
    for (int64_t s = 0; s < K8; s++) {
        const int8_t* as = a + s * 32;
        const int8_t* ws = w + s * 64;
        const int8x16_t a01 = vld1q_s8(as), a23 = vld1q_s8(as + 16);
        for (int j = 0; j < 4; j++) {
            const int8x16_t b = vld1q_s8(ws + 16 * j);
            acc[0][j] = vmmlaq_s32(acc[0][j], a01, b);
            acc[1][j] = vmmlaq_s32(acc[1][j], a23, b);
        }
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            int32_t t[4];
            vst1q_s32(t, acc[i][j]);
            c[(2 * i) * 8 + 2 * j] = t[0];
            c[(2 * i) * 8 + 2 * j + 1] = t[1];
            c[(2 * i + 1) * 8 + 2 * j] = t[2];
            c[(2 * i + 1) * 8 + 2 * j + 1] = t[3];
        }
}

// a: [M, K] rows of stride lda, int8 (u8 != 0: uint8 holding a + 128); w: packed; out:
// [M, N] int32, contiguous.
extern "C" void kernel(const int8_t* a, const int8_t* w, int32_t* out, const int64_t M,
                       const int64_t N, const int64_t K, const int64_t lda, const int64_t u8,
                       const int64_t variant, const int64_t threads)
{
    const int64_t K8 = (K + 7) / 8, N8 = (N + 7) / 8, M4 = (M + 3) / 4;
    constexpr int64_t TB = 16, PB = 8;  // tiles (64 rows) x panels (64 columns) per block
    const int64_t MB = (M4 + TB - 1) / TB, NB = (N8 + PB - 1) / PB;
    const uint64_t flip = u8 ? 0x8080808080808080ull : 0;  // (a + 128) ^ 0x80 is a's byte
    const int64_t K8full = K / 8, tail = K % 8;
    std::unique_ptr<int8_t[]> ap(new int8_t[M4 * K8 * 32]);  // every byte written below
    auto tile = variant == 2 ? tile_i8mm : variant == 1 ? tile_sdot : tile_neon;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < M4; t++) {
            int8_t* dst = ap.get() + t * K8 * 32;
            for (int64_t r = 0; r < 4; r++) {
                int8_t* d = dst + r * 8;
                if (4 * t + r >= M) {  // rows past M: zeros
                    for (int64_t s = 0; s < K8; s++) std::memset(d + s * 32, 0, 8);
                    continue;
                }
                const uint8_t* src = (const uint8_t*)(a + (4 * t + r) * lda);
                for (int64_t s = 0; s < K8full; s++) {  // 8 bytes of the row per step
                    uint64_t v;
                    std::memcpy(&v, src + 8 * s, 8);
                    v ^= flip;
                    std::memcpy(d + s * 32, &v, 8);
                }
                if (tail) {  // the last step: the row's last K % 8 bytes, then zeros
                    uint8_t last[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                    for (int64_t j = 0; j < tail; j++)
                        last[j] = src[8 * K8full + j] ^ (uint8_t)flip;
                    std::memcpy(d + K8full * 32, last, 8);
                }
            }
        }
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t mb = 0; mb < MB; mb++)
            for (int64_t nb = 0; nb < NB; nb++) {
                int32_t c[32];
                for (int64_t p = nb * PB; p < std::min(N8, (nb + 1) * PB); p++)
                    for (int64_t t = mb * TB; t < std::min(M4, (mb + 1) * TB); t++) {
                        tile(ap.get() + t * K8 * 32, w + p * K8 * 64, K8, c);
                        const int64_t rows = std::min<int64_t>(4, M - 4 * t);
                        const int64_t cols = std::min<int64_t>(8, N - 8 * p);
                        for (int64_t r = 0; r < rows; r++)
                            std::memcpy(out + (4 * t + r) * N + 8 * p, c + r * 8,
                                        cols * sizeof(int32_t));
                    }
            }
    }
}
"""

_ARGTYPES = ["const int8_t*", "const int8_t*", "int32_t*"] + ["const int64_t"] * 7


def pack_weights(w: torch.Tensor) -> torch.Tensor:
    """W int8 [N, K] -> the kernels' layout [N/8, K/8, 4, 16] (zero-padded to multiples of 8):
    panel p, step s, block j = W[8p + 2j, 8s:8s+8] then W[8p + 2j + 1, 8s:8s+8]."""
    n, k = w.shape
    n8, k8 = -(-n // NR), -(-k // KR)
    wp = F.pad(w, (0, k8 * KR - k, 0, n8 * NR - n))  # [N8*8, K8*8]
    return wp.view(n8, 4, 2, k8, KR).permute(0, 3, 1, 2, 4).contiguous().view(n8, k8, 4, 16)


def gemm(a: torch.Tensor, packed: torch.Tensor, n: int, variant: str) -> torch.Tensor:
    """acc int32 [M, N] = A @ W^T for A [M, K] int8 (or uint8 holding a + 128; rows of any
    stride, unit column stride) and W packed by pack_weights, with the micro-kernel named
    `variant` (one of VARIANTS; the CPU must have its instructions)."""
    m, k = a.shape
    if a.stride(1) != 1:
        a = a.contiguous()
    out = torch.empty((m, n), dtype=torch.int32)
    if out.numel():
        _kernel()(a, packed, out, m, n, k, a.stride(0) if m > 1 else k,
                  int(a.dtype == torch.uint8), VARIANTS[variant], torch.get_num_threads())
    return out


@functools.cache
def kernel_builds() -> bool:
    """This is an AArch64 machine and Inductor's C++ toolchain builds the kernels here (once
    per process; cached on disk)."""
    if platform.machine() not in ("aarch64", "arm64"):
        return False
    return builds(lambda: _kernel(), "ARM NEON int8 GEMM kernels",
                  "int8 GEMMs run fp32-exact here (float32's speed: layers stay float)")


@functools.cache
def _kernel():
    return load_kernel(_ARGTYPES, _SOURCE)
