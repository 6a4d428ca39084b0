"""The exact CPU int8 GEMM routes against int64 arithmetic, bit for bit, and route selection.

Every route this machine can run is checked on odd shapes, zero sizes, K = 1, K around
2048, extreme values (sums that saturate int16 pairs, sums just above 2**24 that float32
would round, odd values so rounding would show) and K long enough to be chunked. Selection
is checked with the capabilities of other CPUs mocked.
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.lowering import cpu_routes
from qcompile.lowering.cpu_routes import (
    F32_EXACT,
    FULL_RANGE,
    ROUTES,
    SEVEN_BIT,
    CpuCapabilities,
    choose_route,
    cpu_capabilities,
    override_capabilities,
    plan_k_chunks,
)

HERE = cpu_capabilities()
RUNNABLE = [r for r in ROUTES.values() if r.available(HERE)]
ids = [r.name for r in RUNNABLE]

AVX2 = CpuCapabilities(arch="x86_64", isa="AVX2", avx2=True, onednn=True)
AVX512 = replace(AVX2, isa="AVX512", avx512=True)
AVX512_VNNI = replace(AVX512, avx512_vnni=True, onednn_full_range=True)
AMX = replace(AVX512_VNNI, amx=True)
AVX_VNNI = replace(AVX2, avx_vnni=True, onednn_full_range=True)
ARM = CpuCapabilities(arch="aarch64", isa="DEFAULT", dotprod=True, i8mm=True)


def exact(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return a.to(torch.int64) @ w.to(torch.int64).T  # [M, N]


def rand_w(n: int, k: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, generator=g)


def rand_a(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)


def check(route, a: torch.Tensor, w: torch.Tensor) -> None:
    """int32 result (from int8 and from uint8 a + 128), and float32 where offered, exact."""
    p = route.prepare(w)
    want = exact(a, w)
    got = route.matmul(a, p)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.to(torch.int64), want)
    assert torch.equal(route.matmul(a.view(torch.uint8) ^ 0x80, p).to(torch.int64), want)
    if p.f32_exact:
        f = route.matmul_f32(a, p)
        assert f.dtype == torch.float32 and torch.equal(f.to(torch.int64), want)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 67), n=st.integers(1, 67), k=st.integers(1, 67), seed=st.integers(0, 99))
def test_random_odd_shapes(route, m, n, k, seed):
    lo, hi = route.weight_range(HERE)
    check(route, rand_a(m, k, seed), rand_w(n, k, lo, hi, seed))


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 1, 7), (1, 1, 9), (3, 2048, 5),
                                   (4, 2049, 3), (2, 4096, 3), (1, 3, 1)])
def test_edge_shapes(route, m, k, n):
    lo, hi = route.weight_range(HERE)
    check(route, rand_a(m, k, k), rand_w(n, k, lo, hi, k))


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_empty(route, m, k, n):
    lo, hi = route.weight_range(HERE)
    p = route.prepare(rand_w(n, k, lo, hi, 0))
    for out in (route.matmul(rand_a(m, k, 0), p), route.matmul_f32(rand_a(m, k, 0), p)):
        assert out.shape == (m, n) and not out.any()


def _extremes(lo: int, hi: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of A x rows of W whose sums hit every bound the kernels could break."""
    a = torch.empty((6, k), dtype=torch.int8)
    a[0], a[1] = -128, 127
    a[2, ::2], a[2, 1::2] = -128, 127  # alternating: pairs of opposite sign
    a[3, ::2], a[3, 1::2] = 127, -128
    a[4] = torch.arange(k) % 255 - 127  # odd multiples, no power-of-two structure
    a[5] = 125
    w = torch.empty((6, k), dtype=torch.int8)
    w[0], w[1] = lo, hi
    w[2, ::2], w[2, 1::2] = lo, hi  # with a[2]/a[3]: |acc| at its largest
    w[3, ::2], w[3, 1::2] = hi, lo
    w[4] = hi if hi % 2 else hi - 1  # odd
    w[5] = torch.arange(k) % (hi - lo + 1) + lo
    return a, w


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
def test_extremes_at_and_beyond_the_chunk_bound(route):
    lo, hi = route.weight_range(HERE)
    bound = F32_EXACT // (128 * max(-lo, hi))  # the longest K exact in one float32 chunk
    for k in (1, 2, 3, 64, 65, bound - 1, bound, bound + 1, 2 * bound + 63):
        if route.name == "int-mm" and k > 2100 and not route.fast(HERE):
            continue  # a scalar loop here: the long K says nothing new about it
        a, w = _extremes(lo, hi, k)
        check(route, a, w)
        p = route.prepare(w)
        assert p.f32_exact == (k <= bound)
        if k > bound and route.native_f32:
            assert len(p.chunks) >= 2  # |acc| > 2**24 here: exact only through the chunks


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
def test_sums_that_float32_would_round(route):
    # 127 * 63 * K is odd for odd K and above 2**24 from K = 2097: a float32 result would
    # come back even. Also the sign-alternating case whose u8-shifted sum exceeds 2**24
    # while the true sum does not (oneDNN must subtract its compensation in int32).
    lo, hi = route.weight_range(HERE)
    for k in (2047, 2099, 3001):
        a = torch.full((2, k), 127, dtype=torch.int8)
        a[1, k // 2 :] = -127
        w = torch.full((3, k), 63, dtype=torch.int8)
        w[1, ::3] = lo
        w[2, : k // 2] = hi
        check(route, a, w)


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
def test_strided_activations(route):
    lo, hi = route.weight_range(HERE)
    w = rand_w(9, 70, lo, hi, 3)
    base = rand_a(70, 31, 4)
    for a in (base.T, rand_a(11, 140, 5)[:, ::2], rand_a(11, 100, 6)[:, 10:80]):
        check(route, a, w)


def test_fp32_route_stays_exact_when_float_matmul_may_round(monkeypatch):
    # With bf16/tf32 float32 matmul allowed in the process, the route computes in float64.
    monkeypatch.setattr(cpu_routes, "_fp32_is_ieee", lambda: False)
    a, w = _extremes(-128, 127, 1500)
    check(ROUTES["fp32-exact"], a, w)


# ---------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("route", RUNNABLE, ids=ids)
def test_prepare_refuses_weights_outside_the_exact_range(route):
    lo, hi = route.weight_range(HERE)
    for bad in (lo - 1, hi + 1):
        if not -128 <= bad <= 127:
            continue
        w = torch.zeros((3, 5), dtype=torch.int8)
        w[1, 2] = bad
        with pytest.raises(ValueError, match=rf"exact only for weights in \[{lo}, {hi}\]"):
            route.prepare(w)


def test_mocked_capabilities_never_widen_the_checked_range():
    # Selection may be asked about a VNNI machine; preparing still checks this CPU's range.
    onednn = ROUTES["onednn-u8s8"]
    if not onednn.available(HERE) or HERE.onednn_full_range:
        pytest.skip("needs oneDNN without full-range exactness (a CPU without VNNI)")
    with override_capabilities(AVX512_VNNI):
        assert onednn.weight_range(cpu_capabilities()) == FULL_RANGE
        with pytest.raises(ValueError, match="exact only for weights in"):
            onednn.prepare(torch.full((2, 4), 127, dtype=torch.int8))


def test_bad_operands():
    route = ROUTES["fp32-exact"]
    p = route.prepare(torch.ones((3, 4), dtype=torch.int8))
    with pytest.raises(ValueError, match=r"A \[M, 4\]"):
        route.matmul(torch.ones((2, 5), dtype=torch.int8), p)
    with pytest.raises(ValueError, match=r"A \[M, 4\]"):
        route.matmul(torch.ones((2, 4), dtype=torch.int16), p)
    with pytest.raises(ValueError, match="prepared for fp32-exact"):
        ROUTES["int-mm"].matmul(torch.ones((2, 4), dtype=torch.int8), p)
    with pytest.raises(TypeError, match="int8 W"):
        route.prepare(torch.ones((3, 4)))
    long_k = route.prepare(torch.full((1, 1100), 127, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"2\*\*24"):
        route.matmul_f32(torch.ones((1, 1100), dtype=torch.int8), long_k)


def test_onednn_probe_sees_saturation_without_vnni():
    if not HERE.onednn:
        pytest.skip("oneDNN's u8 x s8 kernel is not available here")
    # On a CPU with VNNI/AMX the probe must pass; without, its saturating sums must fail it.
    assert cpu_routes._probe_onednn_full_range() == HERE.vnni
    assert HERE.onednn_full_range == HERE.vnni


# ---------------------------------------------------------------- chunk plan


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 5000), lo=st.sampled_from([-128, -64, -3]),
       seed=st.integers(0, 99))
def test_chunk_plan(n, k, lo, seed):
    w = rand_w(n, k, lo, -lo - 1, seed)
    chunks = plan_k_chunks(w)
    assert chunks[0][0] == 0 and chunks[-1][1] == k
    assert all(a[1] == b[0] and a[1] % 64 == 0 for a, b in zip(chunks, chunks[1:]))
    for start, stop in chunks:
        assert 128 * int(w[:, start:stop].to(torch.int64).abs().sum(dim=1).max()) <= F32_EXACT
        assert stop - start >= min(k - start, F32_EXACT // (128 * -lo))


def test_chunk_plan_is_one_chunk_for_small_weights():
    assert plan_k_chunks(torch.full((4, 11008), 11, dtype=torch.int8)) == ((0, 11008),)
    assert plan_k_chunks(torch.full((4, 4096), -64, dtype=torch.int8)) == ((0, 2048),
                                                                            (2048, 4096))
    assert plan_k_chunks(torch.zeros((3, 0), dtype=torch.int8)) == ()


# ---------------------------------------------------------------- capabilities and selection


def test_capabilities_detected_once_and_overridable():
    caps = cpu_capabilities()
    assert caps is cpu_capabilities()
    assert caps.isa == torch.backends.cpu.get_cpu_capability()
    assert caps.avx512_vnni == torch.cpu._is_vnni_supported()
    assert caps.amx == torch.cpu._is_amx_tile_supported()
    with override_capabilities(ARM):
        assert cpu_capabilities() is ARM
        with override_capabilities(AMX):
            assert cpu_capabilities() is AMX
        assert cpu_capabilities() is ARM
    assert cpu_capabilities() is caps


MINILM = [(4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384)]


@pytest.mark.parametrize("caps", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_selection_without_vnni(caps):
    for m, k, n in MINILM + [(64, 4096, 4096), (128, 4096, 11008), (2, 4096, 4096)]:
        c = choose_route(caps, m, k, n, SEVEN_BIT)
        assert (c.route.name, c.fast) == ("onednn-u8s8", True)
        assert choose_route(caps, m, k, n, (-63, 63)).route.name == "onednn-u8s8"
    # Full-range weights: the split route where it beats float, else no fast route.
    assert choose_route(caps, 16, 4096, 4096).route.name == "onednn-u8s8-split"
    assert choose_route(caps, 128, 4096, 11008).route.name == "onednn-u8s8-split"
    for m, k, n in MINILM + [(256, 4096, 4096)]:
        c = choose_route(caps, m, k, n, FULL_RANGE)
        assert (c.route.name, c.fast) == ("fp32-exact", False)
        assert "7 bits" in c.reason
    # One row, or too little work for oneDNN's per-call cost: float is faster.
    for m, k, n in [(1, 4096, 4096), (1, 384, 384), (32, 384, 384)]:
        c = choose_route(caps, m, k, n, SEVEN_BIT)
        assert (c.route.name, c.fast) == ("fp32-exact", False)


@pytest.mark.parametrize("caps", [AVX512_VNNI, AMX], ids=["avx512-vnni", "amx"])
def test_selection_with_vnni_or_amx(caps):
    for m, k, n in MINILM + [(1, 4096, 4096), (16, 4096, 4096), (1, 1, 1)]:
        for wr in (SEVEN_BIT, FULL_RANGE):
            c = choose_route(caps, m, k, n, wr)
            assert (c.route.name, c.fast) == ("int-mm", True)
    assert ROUTES["int-mm"].fast(caps)
    assert ROUTES["onednn-u8s8"].weight_range(caps) == FULL_RANGE


def test_selection_with_avx_vnni():
    # VNNI on AVX2 only: torch._int_mm stays a scalar loop, oneDNN's kernel is full range.
    assert not ROUTES["int-mm"].fast(AVX_VNNI)
    c = choose_route(AVX_VNNI, 4096, 384, 1536, FULL_RANGE)
    assert (c.route.name, c.fast) == ("onednn-u8s8", True)


@pytest.mark.parametrize("caps, route", [
    (ARM, "neon-i8mm"),
    (replace(ARM, i8mm=False), "neon-sdot"),
    (replace(ARM, i8mm=False, dotprod=False), "neon"),
])
def test_selection_on_arm_takes_the_best_neon_kernel_and_asks_for_a_measurement(
        monkeypatch, caps, route):
    from qcompile.lowering.kernels import gemm_neon

    monkeypatch.setattr(gemm_neon, "kernel_builds", lambda: True)
    assert not ROUTES["onednn-u8s8"].available(caps)
    for m, k, n in MINILM + [(1, 4096, 4096), (1, 8, 8)]:
        c = choose_route(caps, m, k, n, FULL_RANGE)
        # Expected: never assumed faster (no ARM table was measured): timed per layer
        assert (c.route.name, c.fast, c.measure) == (route, False, True)
        assert c.route.weight_range(caps) == FULL_RANGE and not c.route.native_f32
        plan = cpu_routes.plan_layer(caps, m, k, n, FULL_RANGE)
        assert (plan.route, plan.fast, plan.measure) == (route, False, True)
    # a kernel the CPU lacks is never chosen: its instructions would fault
    assert not ROUTES["neon-i8mm"].available(replace(ARM, i8mm=False))
    assert not ROUTES["neon-sdot"].available(replace(ARM, dotprod=False))
    assert not any(ROUTES[r].available(AVX2) for r in cpu_routes.ARM_ROUTES)


def test_selection_on_arm_without_a_built_kernel_is_fp32_exact_and_says_why(monkeypatch):
    from qcompile.lowering.kernels import gemm_neon

    monkeypatch.setattr(gemm_neon, "kernel_builds", lambda: False)
    c = choose_route(ARM, 4096, 384, 1536, FULL_RANGE)
    assert (c.route.name, c.fast, c.measure) == ("fp32-exact", False, False)
    assert c.reason.startswith("no ARM int8 kernel builds on aarch64")
    plan = cpu_routes.plan_layer(ARM, 4096, 384, 1536, FULL_RANGE)
    assert not plan.fast and "no exact int8 GEMM faster than float32" in plan.reason


def test_fast_flags():
    assert not ROUTES["int-mm"].fast(AVX2) and ROUTES["int-mm"].fast(AVX512_VNNI)
    assert ROUTES["onednn-u8s8"].fast(AVX2) and not ROUTES["onednn-u8s8"].fast(ARM)
    assert not any(ROUTES["fp32-exact"].fast(c) for c in (AVX2, AVX512_VNNI, AMX, ARM))
    assert ROUTES["onednn-u8s8"].weight_range(AVX2) == SEVEN_BIT
    assert ROUTES["onednn-u8s8-split"].weight_range(AVX2) == FULL_RANGE


@pytest.mark.parametrize("caps, m, kn, fast", [
    (AVX512_VNNI, 4096, (384, 1536), True),  # two VNNI GEMMs still beat sgemm
    (AVX2, 4096, (384, 1536), False),  # 2M rows: the split route's crossovers
    (AVX2, 64, (4096, 4096), True),
    (AVX2, 256, (4096, 4096), False),
    (AVX2, 64, (384, 384), False),
    (ARM, 64, (4096, 4096), False),  # no fast exact int8 GEMM at all
])
def test_a16_plan_follows_the_2m_row_crossovers(caps, m, kn, fast):
    k, n = kn
    plan = cpu_routes.plan_a16(caps, m, k, n, cpu_routes.SEVEN_BIT)
    assert plan.fast == fast
    if not fast:
        assert f"M={m}, K={k}, N={n}" in plan.reason
