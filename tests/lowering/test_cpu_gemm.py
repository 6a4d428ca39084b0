"""The CPU integer path (torch._int_mm + epilogue) against the reference, bit for bit.

"compiled" runs the Inductor-fused epilogue (a C++ compile per signature: a few seconds
cold, cached afterwards), "eager" the plain torch ops. Both must equal the reference
exactly, the float epilogues included (same op order, no FMA contraction).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.lowering import cpu
from qcompile.lowering.cpu import cpu_gemm_int8, int_mm, prepare_weight
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize
from qcompile.lowering.reference import gemm_int8_ref, random_operands

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


@pytest.mark.parametrize("ep", COMPILED, ids=lambda e: e.signature())
def test_compiled_epilogue_matches_reference(ep):
    for m, n, k in [(37, 29, 71), (300, 96, 130)]:
        a, w, vals = random_operands(ep, m, n, k, seed=m)
        got = cpu_gemm_int8(a, prepare_weight(w), ep, mode="compiled", **vals)
        assert got.dtype == ep.out_dtype
        assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 80), n=st.integers(1, 60), k=st.integers(1, 100),
    ep=st.sampled_from(EPILOGUES), seed=st.integers(0, 2**16), packed=st.booleans(),
)
def test_odd_shapes_match_reference(m, n, k, ep, seed, packed):
    a, w, vals = random_operands(ep, m, n, k, seed=seed)
    ww = prepare_weight(w) if packed else w
    got = cpu_gemm_int8(a, ww, ep, mode="eager", **vals)
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


def test_auto_mode_falls_back_loudly(monkeypatch):
    ep = Epilogue((Requantize(),))
    a, w, vals = random_operands(ep, 10, 12, 14, seed=8)

    def broken(_):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu, "_compiled_epilogue", broken)
    monkeypatch.setattr(cpu, "_FAILED", set())
    monkeypatch.setattr(cpu, "_COMPILE_MIN_ELEMENTS", 0)  # this small problem would run eagerly
    with pytest.warns(UserWarning, match="running it eagerly"):
        got = cpu_gemm_int8(a, w, ep, mode="auto", **vals)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_gemm_int8(a, w, ep, mode="compiled", **vals)


def test_input_checks():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        cpu_gemm_int8(a.float(), torch.zeros(3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="mode"):
        cpu_gemm_int8(a, torch.zeros(3, 8, dtype=torch.int8), Epilogue((Bias(),)),
                      mode="fast", bias=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected"):
        cpu_gemm_int8(a, torch.zeros(3, 8, dtype=torch.int8), q=5)


def test_auto_mode_runs_small_problems_eagerly(monkeypatch):
    """Below 2**18 outputs a cold Inductor compile costs more than it saves."""
    from qcompile.lowering import cpu

    ep = Epilogue((Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 16, 24, 40, seed=3)

    def must_not_compile(_epilogue):
        raise AssertionError("a small problem was compiled")

    monkeypatch.setattr(cpu, "_compiled_epilogue", must_not_compile)
    got = cpu_gemm_int8(a, w, ep, mode="auto", **vals)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))
