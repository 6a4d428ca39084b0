"""The CPU integer path (an exact route + the epilogue) against the reference, bit for bit.

Every route that runs here, every kind of epilogue, from int32 and from float32
accumulators: "compiled" runs the Inductor-fused epilogue (a C++ compile per signature: a
few seconds cold, cached afterwards), "eager" the plain torch ops. Both must equal the
reference exactly, the float epilogues included (same op order, no FMA contraction), and
the float32 requantization's fix-up must catch every tie and near-tie.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.lowering import cpu, cpu_routes
from qcompile.lowering.cpu import cpu_gemm_int8, requantize_f32
from qcompile.lowering.cpu_routes import int_mm
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize
from qcompile.lowering.kernels import requant_cpu
from qcompile.lowering.reference import gemm_int8_ref, random_operands
from qcompile.numerics.dyadic import requantize

EPILOGUES = [
    Epilogue(),
    Epilogue((Bias(),)),
    Epilogue((Requantize(),)),
    Epilogue((Bias(), Requantize(per_channel=True))),
    Epilogue((InputZeroPoint(), Bias(), Requantize(per_channel=True))),
    Epilogue((Dequantize("float32"),)),
    Epilogue((InputZeroPoint(), Dequantize("float16", has_bias=True))),
    Epilogue((Bias(), Dequantize("bfloat16", has_bias=True))),
]
COMPILED = [EPILOGUES[i] for i in (1, 2, 4, 5, 7)]  # every kind of step, few compiles
CAPS = cpu_routes.cpu_capabilities()
ROUTES = [None] + [name for name, r in cpu_routes.ROUTES.items() if r.available(CAPS)]


def _for_route(route, w):
    """Weights inside the route's exact range on this machine (7 bits where it needs it)."""
    if route is None:
        return w
    lo, hi = cpu_routes.ROUTES[route].weight_range(CAPS)
    return w.clamp(lo, hi)


@pytest.mark.parametrize("ep", COMPILED, ids=lambda e: e.signature())
@pytest.mark.parametrize("route", ["int-mm", "fp32-exact"])  # an int32 and a float32 acc
def test_compiled_epilogue_matches_reference(ep, route):
    for m, n, k in [(37, 29, 71), (600, 512, 130)]:
        a, w, vals = random_operands(ep, m, n, k, seed=m)
        got = cpu_gemm_int8(a, w, ep, route=route, mode="compiled", **vals)
        assert got.dtype == ep.out_dtype
        assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 80), n=st.integers(1, 60), k=st.integers(1, 100),
    ep=st.sampled_from(EPILOGUES), seed=st.integers(0, 2**16),
    route=st.sampled_from(ROUTES), transposed=st.booleans(),
)
def test_every_route_and_epilogue_matches_reference(m, n, k, ep, seed, route, transposed):
    a, w, vals = random_operands(ep, m, n, k, seed=seed)
    w = _for_route(route, w)
    if "zp_term" in vals:  # the input zero point term of the (possibly clamped) weights
        vals["zp_term"] = (3 * w.long().sum(1)).to(torch.int32)
    ww = w.t().contiguous().t() if transposed else w  # any strides
    got = cpu_gemm_int8(a, ww, ep, route=route, mode="eager", **vals)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_extremes_at_the_edge_of_the_contract(mode, per_channel):
    # acc + bias at exactly 2**31 - 1 and near -2**31; q and shift at both ends. The
    # compiled path once got shift 62 wrong (symbolic ints); scalars now go in as tensors.
    k, n = 64, 8
    ep = Epilogue((Bias(), Requantize(per_channel=per_channel)))
    a = torch.tensor([[-128] * k, [127] * k, [-128] * k, [0] * k], dtype=torch.int8)
    w = torch.tensor([[-128] * k, [127] * k] * (n // 2), dtype=torch.int8)
    acc = a.long() @ w.long().T
    bias = (torch.tensor([2**31 - 1] * n) - acc[0]).to(torch.int32)
    for q, s in [((1 << 31) - 1, 62), (1 << 30, 62), ((1 << 31) - 1, 1), (1518500250, 33)]:
        qq = torch.full((n,), q) if per_channel else q
        ss = torch.full((n,), s) if per_channel else s
        for zp, qmin in [(0, -128), (-5, -5), (127, 127)]:
            vals = dict(bias=bias, q=qq, shift=ss, out_zero_point=zp, qmin=qmin)
            got = cpu_gemm_int8(a, w, ep, mode=mode, **vals)
            assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals)), (q, s, zp)


def _exact(acc, offset, q, shift, zp, qmin=-128, qmax=127):
    return requantize(acc.to(torch.int64) + offset.to(torch.int64), q, shift, zp, qmin, qmax,
                      out_dtype=torch.int8)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_float32_requantization_catches_every_tie(mode):
    """q = 2**30, shift 31: every odd accumulator is an exact tie; shifts 33-40 put ties
    and near-ties (one unit off) everywhere; accumulators and offsets at +-2**24."""
    g = torch.Generator().manual_seed(0)
    m, n = 512, 640  # 2**18 outputs: the compiled path runs in "auto" too
    acc = torch.randint(-300, 301, (m, n), generator=g).float()
    acc[0, :] = 2.0**24
    acc[1, :] = -(2.0**24)
    offset = torch.randint(-2**24, 2**24 + 1, (n,), generator=g).float()
    offset[:8] = 0.0
    cases = [(2**30, 31), (2**31 - 1, 40), (2**30 + 1, 33), (1518500250, 36)]
    for q, s in cases:
        for zp, qmin, qmax in [(0, -128, 127), (-7, -8, 7), (3, 3, 127)]:
            v = dict(q=q, shift=s, out_zero_point=zp, qmin=qmin, qmax=qmax)
            got = requantize_f32(acc, offset, v, mode=mode)
            assert torch.equal(got, _exact(acc, offset, q, s, zp, qmin, qmax)), (q, s, zp)
    # per channel: a different multiplier per column, ties in every one
    qs = torch.tensor([2**30, 2**31 - 1, 2**30 + 1, 1518500250] * (n // 4))
    ss = torch.tensor([31, 40, 33, 36] * (n // 4))
    v = dict(q=qs, shift=ss, out_zero_point=0, qmin=-128, qmax=127)
    assert torch.equal(requantize_f32(acc, offset, v, mode=mode),
                       _exact(acc, offset, qs, ss, 0))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.integers(20, 62), q=st.integers(2**30, 2**31 - 1),
       spread=st.sampled_from([1, 100, 2**12, 2**24]))
def test_float32_requantization_matches_dyadic(seed, shift, q, spread):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-spread, spread + 1, (5, 64), generator=g).float()
    offset = torch.randint(-spread, spread + 1, (64,), generator=g).float()
    v = dict(q=q, shift=shift, out_zero_point=1, qmin=-128, qmax=127)
    for mode in ("eager", "compiled"):
        assert torch.equal(requantize_f32(acc, offset, v, mode=mode),
                           _exact(acc, offset, q, shift, 1)), mode


def test_requantization_kernel_on_row_tails_and_strided_rows():
    """The C++ kernel's columns past the last whole vector run its scalar path: ties there
    too, rows a stride apart, a zero point at either end."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 67):
        big = torch.randint(-301, 302, (9, n + 5), generator=g).float()
        acc = big[:, :n]  # rows n + 5 apart
        offset = torch.randint(-2**24, 2**24 + 1, (n,), generator=g).float()
        qs = torch.tensor([2**30, 2**31 - 1, 2**30 + 1] * n)[:n]
        ss = torch.tensor([31, 40, 33] * n)[:n]
        for zp, qmin, qmax in [(0, -128, 127), (127, 127, 127), (-128, -128, 0)]:
            v = dict(q=qs, shift=ss, out_zero_point=zp, qmin=qmin, qmax=qmax)
            got = requantize_f32(acc, offset, v, mode="compiled")
            assert torch.equal(got, _exact(acc, offset, qs, ss, zp, qmin, qmax)), (n, zp)


def test_offsets_beyond_float32_take_the_integer_path():
    ep = Epilogue((Bias(), Requantize()))
    a, w, vals = random_operands(ep, 6, 5, 9, seed=2)
    vals["bias"] = torch.full((5,), 2**24 + 3, dtype=torch.int32)  # not exact in float32
    got = cpu_gemm_int8(a, w, ep, route="fp32-exact", mode="eager", **vals)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


def test_non_contiguous_a_and_degenerate_shapes():
    ep = Epilogue((Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 33, 21, 45, seed=4)
    big = torch.randint(-128, 128, (80, 100), dtype=torch.int8)
    for aa in [a.t().contiguous().t(), big[3:69:2, 7:52]]:
        got = cpu_gemm_int8(aa, w, ep, mode="eager", **vals)
        assert torch.equal(got, gemm_int8_ref(aa, w, ep, **vals))
    for m, n, k in [(0, 5, 7), (5, 0, 7), (3, 4, 0), (6, 5, 1), (1, 1, 1)]:
        a, w, vals = random_operands(Epilogue((Bias(),)), m, n, k, seed=6)
        got = cpu_gemm_int8(a, w, Epilogue((Bias(),)), mode="eager", **vals)
        assert torch.equal(got, gemm_int8_ref(a, w, Epilogue((Bias(),)), **vals))


def test_int_mm_k1_workaround():
    # torch._int_mm(CPU) gets K == 1 wrong for N > 1 (torch 2.13); int_mm pads K.
    a = torch.randint(-128, 128, (9, 1), dtype=torch.int8)
    w = torch.randint(-128, 128, (7, 1), dtype=torch.int8)
    assert torch.equal(int_mm(a, w).long(), a.long() @ w.long().T)


def test_prepared_weights_are_cached_and_refreshed_after_in_place_changes():
    w = torch.randint(-64, 64, (8, 32), dtype=torch.int8)
    route = cpu_routes.ROUTES["fp32-exact"]
    p = cpu.prepared(route, w)
    assert cpu.prepared(route, w) is p
    w.add_(1)
    assert cpu.prepared(route, w) is not p
    a = torch.randint(-128, 128, (3, 32), dtype=torch.int8)
    assert torch.equal(cpu_gemm_int8(a, w, route="fp32-exact").long(), a.long() @ w.long().T)


@pytest.mark.parametrize("route", ["int-mm", "fp32-exact"])
def test_auto_mode_falls_back_loudly(monkeypatch, route):
    ep = Epilogue((Requantize(),))
    a, w, vals = random_operands(ep, 10, 12, 14, seed=8)

    def broken(*_):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu, "_compiled_epilogue", broken)
    monkeypatch.setattr(requant_cpu, "_kernel", broken)
    requant_cpu.kernel_builds.cache_clear()
    monkeypatch.setattr(cpu, "_FAILED", set())
    monkeypatch.setattr(cpu, "_COMPILE_MIN_ELEMENTS", 0)  # this small problem would run eagerly
    try:
        with pytest.warns(UserWarning, match="running it eagerly|runs eagerly"):
            got = cpu_gemm_int8(a, w, ep, route=route, mode="auto", **vals)
        assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            cpu_gemm_int8(a, w, ep, route=route, mode="compiled", **vals)
    finally:
        requant_cpu.kernel_builds.cache_clear()


def test_input_checks():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        cpu_gemm_int8(a.float(), torch.zeros(3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="mode"):
        cpu_gemm_int8(a, torch.zeros(3, 8, dtype=torch.int8), Epilogue((Bias(),)),
                      mode="fast", bias=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected"):
        cpu_gemm_int8(a, torch.zeros(3, 8, dtype=torch.int8), q=5)


def test_a_route_refuses_weights_outside_its_exact_range():
    route = cpu_routes.ROUTES["onednn-u8s8"]
    if not route.available(CAPS) or route.weight_range(CAPS) == cpu_routes.FULL_RANGE:
        pytest.skip("oneDNN's u8 x s8 kernel is exact for every int8 weight here")
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="exact only for weights in \\[-64, 63\\]"):
        cpu_gemm_int8(a, torch.full((3, 8), 100, dtype=torch.int8), route="onednn-u8s8")


def test_auto_mode_runs_small_problems_eagerly(monkeypatch):
    """Below 2**18 outputs a cold Inductor compile costs more than it saves."""
    ep = Epilogue((Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 16, 24, 40, seed=3)

    def must_not_compile(*_):
        raise AssertionError("a small problem was compiled")

    monkeypatch.setattr(cpu, "_compiled_epilogue", must_not_compile)
    got = cpu_gemm_int8(a, w, ep, mode="auto", **vals)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))
