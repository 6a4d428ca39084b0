"""Exact int8 GEMM routes on CPU, as data: which ones a CPU has, which is fast, and each one.

What: every route computes acc[m, n] = sum_k a[m, k] * w[n, k] for int8 A [M, K] and int8
W [N, K], bit for bit the int32 accumulator of reference.gemm_int8_ref, by a different
kernel. `ROUTES` lists them; `cpu_capabilities()` says what this CPU has (read once per
process, overridable with `override_capabilities` so selection can be tested on any CPU;
`prepare` always checks weights against the real hardware); `choose_route(caps, m, k, n,
weight_range)` picks the fastest exact one for a layer.

Why: `torch._int_mm` on CPU is oneDNN's VNNI/AMX kernel only where AVX512-VNNI exists;
elsewhere it is a scalar loop, 20-50x slower than float32 matmul. Other CPUs need other
routes, and each is exact only under its own conditions, so the conditions are data here,
checked when a weight is prepared, never assumed.

The routes (measured on an AVX2-only AMD EPYC, torch 2.13, oneDNN 3.12: bench/README.md):

  int-mm       torch._int_mm, int32 accumulation: exact for any int8 weights (K <= 131071).
               Fast only with AVX512-VNNI or AMX (8-9x float measured on an AVX512-VNNI
               EPYC); on AVX2, 30x slower than float.
  onednn-u8s8  onednn.qlinear_pointwise with u8 activations a + 128 (zero point 128) and
               s8 weights, float32 output: about 2x float on AVX2 from M = 2 (4096 x 4096)
               or 2**23 MACs; slower than sgemv for one row.
               Without VNNI, oneDNN multiplies u8 x s8 pairs with VPMADDUBSW, which
               saturates each sum of two products to int16 (oneDNN's "Nuances of int8
               computations"): exact only for weights in [-64, 63] (2 * 255 * 64 < 2**15).
               With VNNI (VPDPBUSD) or AMX (TDPBUSD) the four products go to int32 with no
               intermediate rounding, so any int8 weights are exact; capability detection
               confirms that on the machine with a GEMM that would saturate
               (`onednn_full_range`), else the 7-bit range stands.
               Exactness of the float32 output: oneDNN accumulates in int32, subtracts the
               zero-point compensation 128 * colsum(W) in int32 (a raw u8 sum above 2**24
               with a true sum below comes out exact) and converts to float32 once, so the
               value is exact while |acc| <= 2**24; K is split into chunks that guarantee
               that (below), and chunks are summed in int32.
  onednn-u8s8-split
               the same kernel on the stacked rows [relu(a); relu(-a)] with zero point 0,
               acc = top - bottom: u8 values in [0, 128] times any int8 weight never
               saturate (2 * 128 * -128 = -2**15 exactly), so full-range weights are exact
               on AVX2, at twice the rows. Faster than float only where weight traffic
               dominates (4096 x 4096, 2 <= M <= 128: 1.2-1.8x), slower elsewhere.
  fp32-exact   float32 sgemm on the integer values: exact because every partial sum, in
               any order, is an integer of magnitude <= 2**24 (chunked like the above).
               Works everywhere at float speed: never a reason to quantize, only the
               universal exact fallback. If the process allows reduced-precision float32
               matmul (bf16 / tf32 through oneDNN), it computes in float64 instead.
  neon-i8mm, neon-sdot, neon
               AArch64 only: qcompile's NEON kernels (lowering/kernels/gemm_neon.py),
               int32 accumulation with SMMLA (i8mm), SDOT (dot product) or SMULL + SADALP
               (any Armv8 NEON): exact for any int8 weights, no chunking. Verified under
               qemu (scripts/arm-check.sh), never timed on ARM hardware here, so their
               speed is measured per layer on the machine at hand (Choice.measure).

Chunking (`plan_k_chunks`): |any partial sum| <= 128 * sum_k |w[n, k]| over the chunk, so
chunks are the longest runs of 64-column blocks with 128 * max_n sum |w| <= 2**24. That
is K >= 2048 per chunk for 7-bit weights and >= 1024 for any int8 weights, and usually
the whole K for real weights (one chunk, one call).

Pre (caller): the weights a route is asked to prepare lie in `route.weight_range(caps)`:
the weight quantizer must produce them (7-bit symmetric per-channel weights, qmax = 63,
for onednn-u8s8 on a CPU without VNNI). `prepare` checks and REFUSES weights outside the
range with a ValueError: it never computes wrong values silently. 7-bit weights carry twice
the rounding step of 8-bit ones (about 6 dB less weight SQNR); what that costs a model is
measured end to end, not assumed here. Full-range weights stay exact on AVX2 through
onednn-u8s8-split (where it is faster than float) or fp32-exact.
Post: `matmul(a, prepared)` is int32 [M, N], equal to the int64 reference; M, N, K of 0
give zeros; A may be int8, or uint8 holding a + 128 (what a fused quantizer can write
directly for onednn-u8s8, saving its conversion pass). `matmul_f32` returns the same
integers held exactly in float32, without the conversion pass, where the prepared weight
guarantees |acc| <= 2**24 (`prepared.f32_exact`); run_epilogue accepts that tensor.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from qcompile.lowering.kernels import gemm_neon
from qcompile.lowering.reference import check_k

F32_EXACT = 2**24  # every integer of magnitude <= 2**24 is a float32
A_ABSMAX = 128  # |a| for int8 activations
_BLOCK = 64  # chunk boundaries fall on multiples of this many columns
FULL_RANGE = (-128, 127)
SEVEN_BIT = (-64, 63)


# ---------------------------------------------------------------- capabilities


@dataclass(frozen=True)
class CpuCapabilities:
    """What the CPU offers the int8 routes. Tests build their own (see override_capabilities)."""

    arch: str  # platform.machine(): "x86_64", "aarch64", ...
    isa: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    model: str = ""  # /proc/cpuinfo "model name" ("" where unknown)
    avx2: bool = False
    avx512: bool = False
    avx512_vnni: bool = False  # torch.cpu._is_vnni_supported(): AVX512-VNNI only
    avx_vnni: bool = False  # the VEX-encoded VNNI of some AVX2 CPUs (/proc/cpuinfo avx_vnni)
    amx: bool = False  # AMX tiles (int8 TDPBUSD)
    dotprod: bool = False  # ARM SDOT/UDOT (asimddp)
    i8mm: bool = False  # ARM SMMLA (i8mm)
    onednn: bool = False  # torch.ops.onednn.qlinear_pointwise is usable
    # oneDNN's u8 x s8 kernels were checked exact for full-range weights on this machine
    # (VNNI/AMX): see _probe_onednn_full_range
    onednn_full_range: bool = False

    @property
    def arm(self) -> bool:
        """An AArch64 CPU (where qcompile's NEON routes run)."""
        return self.arch in ("aarch64", "arm64")

    @property
    def vnni(self) -> bool:
        """int8 dot products straight into int32 (no int16 intermediate) on x86."""
        return self.avx512_vnni or self.avx_vnni or self.amx

    def describe(self) -> str:
        flags = [n for n in ("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx", "dotprod",
                             "i8mm") if getattr(self, n)]
        return f"{self.model or self.arch} ({self.isa}; {' '.join(flags) or 'no int8 extensions'})"


def _cpuinfo() -> tuple[str, set[str]]:
    """Model name and feature flags from /proc/cpuinfo (empty where there is none)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _torch_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def _onednn_usable() -> bool:
    return (platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def _probe_onednn_full_range() -> bool:
    """Whether oneDNN's u8 x s8 GEMM is exact for full-range weights on this machine.

    Activations 255 times weights -128 make every VPMADDUBSW pair saturate (2 * 255 * -128
    < -2**15): the result is exact only where pairs are not summed in int16 (VNNI, AMX).
    Several row counts, since oneDNN picks kernels by shape.
    """
    for m, k, n in ((1, 64, 16), (7, 136, 33), (64, 520, 64)):
        w = torch.full((n, k), -128, dtype=torch.int8)
        w[:, 1::3] = 127
        a = torch.full((m, k), 127, dtype=torch.int8)
        a[:, ::5] = -128
        got = _onednn_gemm(_to_u8(a), _prepack(w), n, 128)
        if not torch.equal(got.to(torch.int64), a.to(torch.int64) @ w.to(torch.int64).T):
            return False
    return True


# Linux AArch64 hwcaps (arch/arm64/include/uapi/asm/hwcap.h)
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_HWCAP_ASIMDDP, _HWCAP2_I8MM = 1 << 20, 1 << 13


def _arm_hwcaps() -> set[str] | None:
    """{"asimddp", "i8mm"} as far as the kernel's hwcaps say so (getauxval: right inside
    containers and emulators, whose /proc/cpuinfo may describe another CPU); None off
    AArch64 Linux or where getauxval is missing."""
    if platform.machine() not in ("aarch64", "arm64") or platform.system() != "Linux":
        return None
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    hw, hw2 = getauxval(_AT_HWCAP), getauxval(_AT_HWCAP2)
    return ({"asimddp"} if hw & _HWCAP_ASIMDDP else set()) | (
        {"i8mm"} if hw2 & _HWCAP2_I8MM else set())


@functools.cache
def _detected() -> CpuCapabilities:
    model, flags = _cpuinfo()
    hwcaps = _arm_hwcaps()
    if hwcaps is not None:
        flags = (flags - {"asimddp", "i8mm"}) | hwcaps
    caps = CpuCapabilities(
        arch=platform.machine(),
        isa=torch.backends.cpu.get_cpu_capability(),
        model=model,
        avx2=_torch_flag("_is_avx2_supported"),
        avx512=_torch_flag("_is_avx512_supported"),
        avx512_vnni=_torch_flag("_is_vnni_supported"),
        avx_vnni="avx_vnni" in flags,
        amx=_torch_flag("_is_amx_tile_supported"),
        dotprod="asimddp" in flags,
        i8mm="i8mm" in flags,
        onednn=_onednn_usable(),
    )
    if caps.onednn and caps.vnni:
        try:
            caps = replace(caps, onednn_full_range=_probe_onednn_full_range())
        except RuntimeError:  # a oneDNN failure proves nothing: the 7-bit range stands
            pass
    return caps


_OVERRIDE: list[CpuCapabilities] = []


def cpu_capabilities() -> CpuCapabilities:
    """This CPU's capabilities, detected once per process, or the innermost override."""
    return _OVERRIDE[-1] if _OVERRIDE else _detected()


@contextlib.contextmanager
def override_capabilities(caps: CpuCapabilities) -> Iterator[CpuCapabilities]:
    """Make cpu_capabilities() return `caps` inside the block (tests, what-if selection)."""
    _OVERRIDE.append(caps)
    try:
        yield caps
    finally:
        _OVERRIDE.pop()


# ---------------------------------------------------------------- chunking


def plan_k_chunks(w: torch.Tensor, limit: int = F32_EXACT) -> tuple[tuple[int, int], ...]:
    """Contiguous K ranges over which every partial dot product stays within `limit`.

    Bound: |sum_{k in S} a_k w[n, k]| <= 128 * sum_{k in chunk} |w[n, k]| for any subset S
    of a chunk, so a float32 sum in any order (or one float32 conversion at the end) is
    exact. Ranges are whole 64-column blocks (one block is at most 64 * 128 * 128 = 2**20).
    """
    n, k = w.shape
    if k == 0:
        return ()
    nblocks = -(-k // _BLOCK)
    absw = F.pad(w.to(torch.int32).abs(), (0, nblocks * _BLOCK - k))  # [N, nblocks*64]
    per_block = absw.view(n, nblocks, _BLOCK).sum(dim=2)  # [N, nblocks], <= 8192 each
    cum = F.pad(per_block.cumsum(dim=1), (1, 0))  # [N, nblocks + 1], exact in int32
    budget = limit // A_ABSMAX
    chunks, start = [], 0
    while start < nblocks:
        reach = (cum[:, start + 1:] - cum[:, start : start + 1]).amax(dim=0)  # nondecreasing
        stop = start + max(1, int(torch.searchsorted(reach, budget, right=True)))
        chunks.append((start * _BLOCK, min(stop * _BLOCK, k)))
        start = stop
    return tuple(chunks)


# ---------------------------------------------------------------- kernels


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc [M, N] int32 = A [M, K] @ W [N, K]^T through torch._int_mm, exact for K <= 131071.

    torch._int_mm on CPU is wrong for K == 1 (N > 1) in torch 2.13: K is zero-padded to 2
    there, which leaves every sum unchanged. M, N or K of 0 are handled without calling it.
    """
    m, k = a.shape
    n = w.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32)
    if k == 1:
        a = F.pad(a, (0, 1))
        w = F.pad(w, (0, 1))
    return torch._int_mm(a, w.t())


def _to_u8(a: torch.Tensor) -> torch.Tensor:
    """int8 a -> uint8 a + 128 (adding 128 modulo 256 to the bits; ATen's uint8 add is
    vectorized, its xor with a scalar is not: 0.1 vs 12 ms for 4096 x 384 here)."""
    return a.view(torch.uint8) + 128 if a.dtype == torch.int8 else a


def _to_s8(a: torch.Tensor) -> torch.Tensor:
    return (a + 128).view(torch.int8) if a.dtype == torch.uint8 else a


def _prepack(w: torch.Tensor) -> torch.Tensor:
    # No activation-shape hint: on AVX2 it changed nothing measurable for any M.
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None)


@functools.cache
def _unit_scales(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # read-only operands of every call with N = n: made once, not twice per call
    return torch.ones(n), torch.zeros(n, dtype=torch.int64)


def _onednn_gemm(a_u8: torch.Tensor, packed: torch.Tensor, n: int, zero_point: int):
    """float32 [M, N] = sum_k (a_u8 - zero_point) * w: scales 1, no bias, no post-op."""
    scales, zero_points = _unit_scales(n)
    return torch.ops.onednn.qlinear_pointwise(
        a_u8, 1.0, zero_point, packed, scales, zero_points,
        None, 1.0, 0, torch.float32, "none", [None], "",
    )


def _fp32_is_ieee() -> bool:
    """False where the process lets float32 matmul run in bf16 / tf32 (oneDNN fpmath)."""
    try:
        mk = torch.backends.mkldnn.matmul.fp32_precision
        top = torch.backends.fp32_precision
    except AttributeError:  # older torch: only the legacy switch
        return torch.get_float32_matmul_precision() == "highest"
    return mk == "ieee" or (mk == "none" and top in ("none", "ieee"))


# ---------------------------------------------------------------- routes


@dataclass(frozen=True, eq=False)
class Prepared:
    """A weight made ready for one route, once, at compile time.

    chunks: ((k_start, k_stop, operand), ...), the operand in the route's own layout.
    f32_exact: |acc| <= 2**24 for every int8 A, so matmul_f32 is available.
    """

    route: str
    n: int
    k: int
    chunks: tuple[tuple[int, int, Any], ...]
    weight_range: tuple[int, int]
    f32_exact: bool


class Route:
    """One exact int8 GEMM route.

    Subclasses set `name`, lay weights out in `_prepare` (one operand per K chunk) and
    compute one chunk in `_chunk_f32` (exact integers in float32), or override `_int32`.
    """

    name = ""
    native_f32 = True  # computes in float32: matmul_f32 saves the int32 conversion
    measured = False  # its speed against float is timed per layer, never taken from a table
    reads_u8 = False  # reads A as uint8 a + 128 (an int8 A costs it a conversion pass)

    def available(self, caps: CpuCapabilities) -> bool:
        return True

    def fast(self, caps: CpuCapabilities) -> bool:
        """Expected to beat float32 F.linear on this CPU (for the shapes choose_route names)."""
        return False

    def weight_range(self, caps: CpuCapabilities) -> tuple[int, int]:
        return FULL_RANGE

    def prepare(self, w: torch.Tensor) -> Prepared:
        """Check W [N, K] int8 against the route's exact range on this machine; lay it out.

        The range is the detected hardware's, never an override's: a capability mocked for
        selection must not let weights through that this CPU would compute wrongly.
        """
        caps = _detected()
        if w.dtype != torch.int8 or w.dim() != 2 or w.device.type != "cpu":
            raise TypeError(f"{self.name}: need int8 W [N, K] on CPU, got {w.dtype} "
                            f"{tuple(w.shape)} on {w.device}")
        if not self.available(caps):
            raise RuntimeError(f"route {self.name} is not available on {caps.describe()}")
        n, k = w.shape
        check_k(k)
        lo, hi = self.weight_range(caps)
        if w.numel():
            wmin, wmax = int(w.min()), int(w.max())
            if wmin < lo or wmax > hi:
                raise ValueError(
                    f"route {self.name} is exact only for weights in [{lo}, {hi}] on "
                    f"{caps.describe()}; these are in [{wmin}, {wmax}]. Quantize the weights "
                    f"to that range (qmax = {hi}) or choose another route (choose_route)."
                )
        chunks = self._prepare(w) if w.numel() else ()
        bound = A_ABSMAX * int(w.to(torch.int64).abs().sum(dim=1).max()) if w.numel() else 0
        return Prepared(self.name, n, k, chunks, (lo, hi), bound <= F32_EXACT)

    def matmul(self, a: torch.Tensor, p: Prepared) -> torch.Tensor:
        """acc int32 [M, N] = A [M, K] @ W^T, exact. A: int8, or uint8 holding a + 128."""
        m = self._check(a, p)
        if m == 0 or p.n == 0 or p.k == 0:
            return torch.zeros((m, p.n), dtype=torch.int32)
        return self._int32(a, p)

    def accumulate(self, a: torch.Tensor, p: Prepared) -> torch.Tensor:
        """The exact accumulator in the cheapest form: float32 (matmul_f32) where the route
        computes in float32 and this weight keeps |acc| <= 2**24, else int32 (matmul)."""
        return self.matmul_f32(a, p) if p.f32_exact and self.native_f32 else self.matmul(a, p)

    def matmul_f32(self, a: torch.Tensor, p: Prepared) -> torch.Tensor:
        """The same integers held exactly in float32 [M, N] (needs p.f32_exact)."""
        m = self._check(a, p)
        if not p.f32_exact:
            raise ValueError(f"{self.name}: this weight allows |acc| > 2**24, which float32 "
                             "cannot hold exactly; use matmul (int32)")
        if m == 0 or p.n == 0 or p.k == 0:
            return torch.zeros((m, p.n), dtype=torch.float32)
        return self._f32(a, p)

    def _check(self, a: torch.Tensor, p: Prepared) -> int:
        if p.route != self.name:
            raise ValueError(f"weight prepared for {p.route}, not {self.name}")
        if a.dtype not in (torch.int8, torch.uint8) or a.dim() != 2 or a.shape[1] != p.k:
            raise ValueError(f"{self.name}: need A [M, {p.k}] int8 (or uint8 a + 128), got "
                             f"{a.dtype} {tuple(a.shape)}")
        return a.shape[0]

    def _prepare(self, w: torch.Tensor) -> tuple[tuple[int, int, Any], ...]:
        raise NotImplementedError

    def _f32(self, a: torch.Tensor, p: Prepared) -> torch.Tensor:
        raise NotImplementedError

    def _int32(self, a: torch.Tensor, p: Prepared) -> torch.Tensor:
        # Each chunk is exact in float32; their sum may not be, so it is taken in int32.
        # The conversion is in place (same element size, full overlap): one [M, N] buffer
        # less to allocate and fault in, which measured up to 2x the pass itself here.
        out = None
        for start, stop, operand in p.chunks:
            f = self._chunk_f32(a if len(p.chunks) == 1 else a[:, start:stop], operand, p.n)
            part = f.view(torch.int32).copy_(f)
            out = part if out is None else out.add_(part)
        return out

    def _chunk_f32(self, a: torch.Tensor, operand: Any, n: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<cpu route {self.name}>"


class IntMM(Route):
    name = "int-mm"
    native_f32 = False

    def fast(self, caps):
        return caps.avx512_vnni or caps.amx

    def _prepare(self, w):
        # K-major [N, K] view: the layout torch._int_mm reads fastest for many rows.
        return ((0, w.shape[1], w.t().contiguous().t()),)

    def _int32(self, a, p):
        return int_mm(_to_s8(a), p.chunks[0][2])

    def _f32(self, a, p):
        return self._int32(a, p).to(torch.float32)


class OneDnnU8S8(Route):
    name = "onednn-u8s8"
    reads_u8 = True

    def available(self, caps):
        return caps.onednn

    def fast(self, caps):
        return caps.onednn

    def weight_range(self, caps):
        return FULL_RANGE if caps.onednn_full_range else SEVEN_BIT

    def _prepare(self, w):
        return tuple((s, e, _prepack(w[:, s:e])) for s, e in plan_k_chunks(w))

    def _chunk_f32(self, a, packed, n):
        return _onednn_gemm(_to_u8(a), packed, n, 128)

    def _f32(self, a, p):
        return self._chunk_f32(a, p.chunks[0][2], p.n)


class OneDnnSplit(OneDnnU8S8):
    name = "onednn-u8s8-split"
    reads_u8 = False  # splits the signed values: a uint8 A is converted back

    def weight_range(self, caps):
        return FULL_RANGE

    def _chunk_f32(self, a, packed, n):
        a = _to_s8(a).to(torch.int16)
        m = a.shape[0]
        rows = torch.cat([a.clamp(min=0), (-a).clamp(min=0)]).to(torch.uint8)  # [2M, K]
        y = _onednn_gemm(rows, packed, n, 0)  # [2M, N]; each half exact, and so is the difference
        return y[:m] - y[m:]


class Fp32Exact(Route):
    name = "fp32-exact"

    def _prepare(self, w):
        wf = w.to(torch.float32)
        return tuple((s, e, wf[:, s:e].t().contiguous()) for s, e in plan_k_chunks(w))  # [Kc, N]

    def _chunk_f32(self, a, w_t, n):
        af = _to_s8(a).to(torch.float32) if a.dtype == torch.int8 else a.to(torch.float32) - 128
        if not _fp32_is_ieee():
            return (af.double() @ w_t.double()).float()  # exact in float64 at any precision setting
        return af @ w_t

    def _f32(self, a, p):
        return self._chunk_f32(a, p.chunks[0][2], p.n)


class Neon(Route):
    """The AArch64 NEON kernels of lowering/kernels/gemm_neon.py: any int8 weights, int32
    out. Never assumed faster than float: choose_route asks for a measurement."""

    name = "neon"
    native_f32 = False
    measured = True
    feature = ""  # the CpuCapabilities flag its instructions need ("" for base NEON)
    kernel = "NEON SMULL + SADALP"

    def available(self, caps):
        return (caps.arm and (not self.feature or getattr(caps, self.feature))
                and gemm_neon.kernel_builds())

    def _prepare(self, w):
        return ((0, w.shape[1], gemm_neon.pack_weights(w)),)

    def _int32(self, a, p):
        return gemm_neon.gemm(a, p.chunks[0][2], p.n, self.name)

    def _f32(self, a, p):
        return self._int32(a, p).to(torch.float32)


class NeonSdot(Neon):
    name = "neon-sdot"
    feature = "dotprod"
    kernel = "NEON int8 dot product (SDOT)"


class NeonI8mm(Neon):
    name = "neon-i8mm"
    feature = "i8mm"
    kernel = "NEON int8 matrix multiply (SMMLA)"


ROUTES: dict[str, Route] = {r.name: r for r in (
    IntMM(), OneDnnU8S8(), OneDnnSplit(), Fp32Exact(), NeonI8mm(), NeonSdot(), Neon())}
ARM_ROUTES = ("neon-i8mm", "neon-sdot", "neon")  # the best first


# ---------------------------------------------------------------- selection

# Crossovers from bench_cpu_routes.py --sweep on AVX2 (one thread): below 2**23 MACs oneDNN's
# per-call cost (~0.1 ms) outweighs its gain (384 x 384: 0.98x float at M = 32, 1.12x at
# 64), and for one row its kernel is slower than sgemv (4096 x 4096: 0.68x).
ONEDNN_MIN_M = 2
ONEDNN_MIN_MACS = 1 << 23
# onednn-u8s8-split runs 2M rows: faster than float only where weight traffic dominates:
# 4096 x 4096 at 2 <= M <= 128 (1.2-1.8x); 0.98x at M = 256; never on 384 x 384.
SPLIT_MAX_M = 128
SPLIT_MIN_KN = 1 << 22


@dataclass(frozen=True)
class Choice:
    """The route for a layer, whether it is expected to beat float, and why. measure: no
    verified table says (fast is False): time the layer against float on this machine."""

    route: Route
    fast: bool
    reason: str
    measure: bool = False


def _within(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]


def choose_route(
    caps: CpuCapabilities, m: int, k: int, n: int, weight_range: tuple[int, int] = FULL_RANGE
) -> Choice:
    """The fastest exact route for an [M, K] x [N, K]^T GEMM whose weights lie in weight_range.

    Rule (measured on AVX2 with bench/bench_cpu_routes.py, and on an AVX512-VNNI EPYC with
    bench/bench_cpu_linear.py; other CPUs by their instruction sets, unmeasured):
      0. AArch64: the best NEON kernel the CPU has (i8mm, then dot product, then base NEON),
         with measure=True: no ARM machine measured a table, so select-layers times each
         layer against float32 on the machine at hand (lowering/latency.py).
      1. AVX512-VNNI or AMX: int-mm (oneDNN's VNNI kernel, exact for any int8, int32 out);
         measured faster than float32 at every bench shape on an AVX512-VNNI EPYC, 2
         threads (bench/results/cpu-linear-vm-avx512-vnni.json): 1.6x at one decode token
         (1 x 4096 x 4096), 2.7-3.5x at MiniLM's, 6.5x at 128 x 4096 x 11008.
      2. oneDNN u8 x s8 available, weights within its exact range, M >= 2 and
         M*K*N >= 2**23: onednn-u8s8 (1.1-2.4x float on AVX2, the most at large K*N).
      3. the same with weights outside that range, 2 <= M <= 128 and K*N >= 2**22:
         onednn-u8s8-split (1.2-1.8x at 4096 x 4096).
      4. otherwise fp32-exact, with fast=False: no gain over float here; the layer should
         stay float (DESIGN: never slower than float) and the report say why.
    M is the representative row count of the layer (tokens per call).
    """
    r = ROUTES
    if caps.arm:
        for name in ARM_ROUTES:
            if r[name].available(caps):
                return Choice(r[name], False, f"{r[name].kernel}, any int8 weights",
                              measure=True)
        return Choice(r["fp32-exact"], False, f"no ARM int8 kernel builds on {caps.describe()}")
    if caps.avx512_vnni or caps.amx:
        return Choice(r["int-mm"], True, "int8 dot products into int32 (AVX512-VNNI/AMX)")
    big = m >= ONEDNN_MIN_M and m * k * n >= ONEDNN_MIN_MACS
    onednn = r["onednn-u8s8"]
    if onednn.available(caps) and big:
        lo, hi = onednn.weight_range(caps)
        if _within(weight_range, (lo, hi)):
            return Choice(onednn, True, f"oneDNN u8 x s8, weights in [{lo}, {hi}]")
        if m <= SPLIT_MAX_M and k * n >= SPLIT_MIN_KN:
            return Choice(r["onednn-u8s8-split"], True,
                          f"oneDNN u8 x s8 on [relu(a); relu(-a)]: weights outside [{lo}, {hi}]")
        return Choice(r["fp32-exact"], False,
                      f"weights outside [{lo}, {hi}] (onednn-u8s8's exact range on this CPU) "
                      "and the split route is not faster than float at this shape: quantize "
                      "the weights to 7 bits")
    if not big:
        why = f"M = {m}, {m * k * n} MACs: too small for an int8 kernel to beat sgemm here"
    else:
        why = f"no fast exact int8 route on {caps.describe()}"
    return Choice(r["fp32-exact"], False, why)


# ---------------------------------------------------------------- per-layer plan


def narrow_weight_range(caps: CpuCapabilities) -> tuple[int, int] | None:
    """The weight range this CPU's fast exact int8 route needs when it is narrower than
    int8 (oneDNN's u8 x s8 kernel without VNNI: [-64, 63]), else None."""
    if caps.avx512_vnni or caps.amx:
        return None  # int-mm: exact and fast for every int8 weight
    onednn = ROUTES["onednn-u8s8"]
    if onednn.available(caps) and onednn.weight_range(caps) != FULL_RANGE:
        return onednn.weight_range(caps)
    return None


@dataclass(frozen=True)
class LayerPlan:
    """How one quantized linear runs on this CPU: its route, and whether it stays float
    (measure: decided by timing it against float on this machine, Choice.measure)."""

    route: str
    fast: bool
    reason: str  # why this route; or, when not fast, why no int8 route beats float here
    measure: bool = False


def plan_a16(caps: CpuCapabilities, m: int, k: int, n: int,
             weight_range: tuple[int, int]) -> LayerPlan:
    """Whether a 16-bit-input linear (lowering/a16_ops.py: the int8 GEMM on 2M rows, the
    input's two bytes, and a fused combine) beats float32 here. Its GEMM is the shape of
    onednn-u8s8-split's, so it takes that route's crossovers without VNNI (bench_cpu_routes:
    2M rows beat sgemm only where weight traffic dominates, M <= 128 and K*N >= 2**22);
    with VNNI / AMX int8 dot products run 3-5x float, and two of them still win."""
    if caps.avx512_vnni or caps.amx:
        return LayerPlan("int-mm", True, "two int8 GEMMs with VNNI/AMX dot products")
    if caps.arm:
        return LayerPlan("fp32-exact", False,
                         f"a 16-bit input runs two int8 GEMMs (M={m}, K={k}, N={n}); on ARM "
                         f"({caps.describe()}) only 8- and 4-bit inputs are timed against "
                         "float32, so it stays float")
    onednn = ROUTES["onednn-u8s8"]
    route = f"no exact int8 GEMM faster than float32 on {caps.describe()} for M={m}, K={k}, N={n}"
    if not onednn.available(caps) or not _within(weight_range, onednn.weight_range(caps)):
        return LayerPlan("fp32-exact", False, f"{route}: a 16-bit input needs two of them")
    if 2 <= m <= SPLIT_MAX_M and k * n >= SPLIT_MIN_KN:
        return LayerPlan(onednn.name, True, "oneDNN u8 x s8 on the input's two bytes (2M rows)")
    return LayerPlan(onednn.name, False,
                     f"a 16-bit input runs the int8 GEMM on 2M = {2 * m} rows, slower than "
                     f"float32 on {caps.describe()} unless M <= {SPLIT_MAX_M} and K*N >= "
                     f"2**22 (M={m}, K={k}, N={n})")


def plan_layer(caps: CpuCapabilities, m: int, k: int, n: int,
               weight_range: tuple[int, int]) -> LayerPlan:
    choice = choose_route(caps, m, k, n, weight_range)
    if choice.fast or choice.measure:
        return LayerPlan(choice.route.name, choice.fast, choice.reason, choice.measure)
    return LayerPlan(choice.route.name, False,
                     f"no exact int8 GEMM faster than float32 on {caps.describe()} for "
                     f"M={m}, K={k}, N={n}: {choice.reason}")
