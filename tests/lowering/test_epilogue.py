"""Epilogue data (validation, signatures, operand binding) and the integer reference."""

from fractions import Fraction

import pytest
import torch

from qcompile.lowering.epilogue import (
    Bias,
    Dequantize,
    Epilogue,
    InputZeroPoint,
    Requantize,
    bind_operands,
)
from qcompile.lowering.reference import (
    MAX_SAFE_K,
    AccumulatorRangeError,
    accumulator_bound,
    check_accumulator_range,
    check_k,
    check_requant_params,
    gemm_int8_ref,
    input_zero_point_term,
    random_operands,
)


def test_signatures_are_stable_and_distinct():
    eps = [
        Epilogue(),
        Epilogue((Bias(),)),
        Epilogue((InputZeroPoint(), Bias(), Requantize(per_channel=True))),
        Epilogue((Requantize(),)),
        Epilogue((Dequantize("bfloat16", has_bias=True),)),
        Epilogue((Dequantize(torch.float16),)),
    ]
    sigs = [e.signature() for e in eps]
    assert sigs == [
        "int32", "bias", "izp+bias+requant.pc", "requant.pt", "dequant.bfloat16+fbias",
        "dequant.float16",
    ]
    # Equal data, equal hash: the kernel and autotune caches can key on it.
    assert Epilogue([Bias(), Requantize()]) == Epilogue((Bias(), Requantize()))
    assert hash(Epilogue([Bias()])) == hash(Epilogue((Bias(),)))
    assert [e.out_dtype for e in eps] == [
        torch.int32, torch.int32, torch.int8, torch.int8, torch.bfloat16, torch.float16,
    ]
    assert eps[2].integer_only and not eps[4].integer_only


@pytest.mark.parametrize(
    "steps, message",
    [
        ((Requantize(), Dequantize()), "exclusive"),
        ((Requantize(), Bias()), "must be the last"),
        ((Dequantize(), InputZeroPoint()), "must be the last"),
        ((Bias(), Bias()), "once"),
        (("bias",), "not an epilogue step"),
    ],
)
def test_invalid_chains_are_rejected(steps, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Epilogue(steps)


def test_dequantize_rejects_integer_dtype():
    with pytest.raises(ValueError, match="out_dtype"):
        Dequantize("int8")


def test_bind_operands_refuses_missing_and_unused_values():
    ep = Epilogue((Bias(), Requantize()))
    with pytest.raises(TypeError, match="needs values"):
        bind_operands(ep, 4, 3, "cpu", {"bias": torch.zeros(3, dtype=torch.int32)})
    with pytest.raises(TypeError, match="unexpected"):
        bind_operands(ep, 4, 3, "cpu", {"bias": torch.zeros(3, dtype=torch.int32), "q": 1 << 30,
                                        "shift": 31, "row_scale": torch.ones(4)})
    with pytest.raises(ValueError, match="3 elements"):
        bind_operands(ep, 4, 3, "cpu", {"bias": torch.zeros(4, dtype=torch.int32), "q": 1 << 30,
                                        "shift": 31})
    with pytest.raises(ValueError, match="shift"):
        bind_operands(ep, 4, 3, "cpu", {"bias": torch.zeros(3, dtype=torch.int32), "q": 1 << 30,
                                        "shift": 63})
    with pytest.raises(ValueError, match="int32"):
        bind_operands(ep, 4, 3, "cpu", {"bias": torch.tensor([0, 2**31, 0]), "q": 1 << 30,
                                        "shift": 31})
    v = bind_operands(ep, 4, 3, "cpu", {"bias": torch.zeros(3, dtype=torch.int64),
                                        "q": torch.tensor(1 << 30), "shift": 31})
    assert v["bias"].dtype == torch.int32 and v["q"] == 1 << 30
    assert (v["out_zero_point"], v["qmin"], v["qmax"]) == (0, -128, 127)


def test_scalar_scales_become_stride_zero_views():
    v = bind_operands(Epilogue((Dequantize("float32"),)), 5, 3, "cpu",
                      {"row_scale": 0.5, "col_scale": torch.tensor([1.0, 2.0, 3.0])})
    assert v["row_scale"].shape == (5,) and v["row_scale"].stride() == (0,)


def test_range_checks():
    check_k(MAX_SAFE_K)
    assert 128 * 128 * MAX_SAFE_K < 2**31 <= 128 * 128 * (MAX_SAFE_K + 1)
    with pytest.raises(AccumulatorRangeError, match="131071"):
        check_k(MAX_SAFE_K + 1)
    with pytest.raises(AccumulatorRangeError):
        gemm_int8_ref(torch.zeros(1, MAX_SAFE_K + 1, dtype=torch.int8),
                      torch.zeros(1, MAX_SAFE_K + 1, dtype=torch.int8))
    w = torch.full((2, 64), 127, dtype=torch.int8)
    assert accumulator_bound(w) == 128 * 127 * 64
    bias = torch.tensor([2**31 - 128 * 127 * 64, 0])
    check_accumulator_range(64, w, bias=bias)  # exactly 2**31: allowed
    with pytest.raises(AccumulatorRangeError, match="2\\*\\*31"):
        check_accumulator_range(64, w, bias=bias + 1)
    check_requant_params(torch.tensor([1 << 30, (1 << 31) - 1]), torch.tensor([1, 62]))
    with pytest.raises(ValueError):
        check_requant_params(1 << 31, 5)


def test_reference_matches_exact_rational_arithmetic():
    # The reference's requantization is dyadic.requantize; check the whole chain against
    # Fractions: round_half_away(acc * q / 2**s) + zp, clamped, ties included.
    ep = Epilogue((InputZeroPoint(), Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 9, 7, 33, seed=3)
    vals["q"][0], vals["shift"][0] = 1 << 30, 1  # acc * 2**30 / 2: exact, and ties abound
    got = gemm_int8_ref(a, w, ep, **vals)
    for i in range(9):
        for c in range(7):
            acc = sum(int(a[i, k]) * int(w[c, k]) for k in range(33))
            acc += int(vals["bias"][c]) - int(vals["zp_term"][c])
            x = Fraction(acc * int(vals["q"][c]), 2 ** int(vals["shift"][c]))
            r = int(abs(x) + Fraction(1, 2)) * (1 if x >= 0 else -1)
            r = min(127, max(-128, r + vals["out_zero_point"]))
            assert int(got[i, c]) == r


def test_input_zero_point_term_is_the_affine_correction():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (6, 20), dtype=torch.int8, generator=g)
    a = torch.randint(-100, 100, (4, 20), dtype=torch.int8, generator=g)
    zp = 7
    exact = (a.long() - zp) @ w.long().T
    got = gemm_int8_ref(a, w, Epilogue((InputZeroPoint(),)), zp_term=input_zero_point_term(w, zp))
    assert torch.equal(got.long(), exact)
