"""The int16-activation ops (lowering/a16_ops.py): quantize_int16, linear_a16w8 and
linear_a16w8_dq. The reference against plain int64 / Fraction arithmetic; every
implementation that runs here (CPU routes, the Triton interpreter) against the reference
bit for bit, on odd shapes, at the ends of every range, per tensor and per channel, with
int4 packed weights; the range proof; the checks that make bad arguments loud."""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import pytest
import torch

from qcompile.lowering import a16_ops, cpu_routes, registry
from qcompile.lowering.ops import BACKENDS
from qcompile.lowering.reference import (
    AccumulatorRangeError,
    a16_accumulator_bound,
    check_a16_accumulator_range,
)
from qcompile.numerics.dyadic import quantize_multiplier
from qcompile.numerics.specs import pack_int4, unpack_int4

I16_MIN, I16_MAX = -(2**15), 2**15 - 1
LIMIT = 2**62


def _runs(op, impl: str) -> bool:
    return op.impls[impl].runs_on("cpu")


def _impls(op):
    return [name for name in sorted(op.impls) if name != "reference"]


def _route_weights(impl: str, w: torch.Tensor) -> torch.Tensor:
    """A CPU route refuses int8 weights outside its exact range on this CPU (7-bit for
    oneDNN u8 x s8 without VNNI): give it weights inside (packed int4 always are)."""
    route = cpu_routes.ROUTES.get(impl.removeprefix("cpu-")) if impl.startswith("cpu-") else None
    if route is None or w.dtype != torch.int8:
        return w
    return w.clamp(*route.weight_range(cpu_routes.cpu_capabilities()))


def _values(w: torch.Tensor) -> torch.Tensor:
    return unpack_int4(w) if w.dtype == torch.uint8 else w


# ---------------------------------------------------------------- exact definitions


def _round_half_away(f: Fraction) -> int:
    mag = math.floor(abs(f) + Fraction(1, 2))
    return mag if f >= 0 else -mag


def _exact_acc(x, w) -> list[list[int]]:
    """x @ W^T in int64 (exact: |acc| <= 2**22 K < 2**63), as Python ints [M][N]."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.int64)
    return (rows @ _values(w).to(torch.int64).T).tolist()


def _exact_linear(x, w, bias, q, shift, out_zp, qmin, qmax) -> torch.Tensor:
    acc = _exact_acc(x, w)
    n = len(acc[0]) if acc else _values(w).shape[0]
    qs = q.reshape(-1).tolist() * (n if q.numel() == 1 else 1)
    ss = shift.reshape(-1).tolist() * (n if shift.numel() == 1 else 1)
    bs = bias.tolist() if bias is not None else [0] * n
    out = [[min(max(_round_half_away(Fraction((a + b) * qc, 2**s)) + out_zp, qmin), qmax)
             for a, b, qc, s in zip(row, bs, qs, ss, strict=True)] for row in acc]
    return torch.tensor(out, dtype=torch.int8).reshape(*x.shape[:-1], n)


def _exact_dq(x, w, bias, x_scale, w_scale, out_dtype) -> torch.Tensor:
    acc = torch.tensor(_exact_acc(x, w), dtype=torch.float64)  # exact: |acc| < 2**53
    y = (acc * x_scale) * w_scale.to(torch.float64).reshape(-1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype).reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------- cases


def _multipliers(n, k, g):
    """Per-channel (q, shift) that keep int16 x int8 outputs mostly inside int8."""
    m = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)) * 100 / (2**8 * 5000 * k**0.5)
    return quantize_multiplier(m)


def _linear_case(name: str):
    """(x, w, bias, q, shift, out_zp, qmin, qmax) for linear_a16w8."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    m, n, k = {"random": (7, 33, 65), "per-tensor": (1, 7, 33), "int4": (7, 33, 66),
               "batched": (5, 7, 33), "ties": (33, 7, 65)}.get(name, (7, 7, 65))
    x = torch.randint(I16_MIN, I16_MAX + 1, (m, k), generator=g, dtype=torch.int16)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    bias = torch.randint(-2**22, 2**22, (n,), generator=g)
    q, s = _multipliers(n, k, g)
    args = dict(x=x, w=w, bias=bias, q=q, shift=s, out_zp=3, qmin=-128, qmax=127)
    top = LIMIT - 1 - 2**22 * k  # the largest |bias| the range proof lets through
    if name == "per-tensor":
        args.update(bias=None, q=q[:1], shift=s[:1])
    elif name == "int4":
        args.update(w=pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)))
    elif name == "batched":
        args.update(x=torch.randint(I16_MIN, I16_MAX + 1, (2, 3, m, k), generator=g,
                                    dtype=torch.int16), qmin=-5, qmax=100, out_zp=-7)
    elif name == "ties":
        # q / 2**s = 2**-9, channel c reads +-x[:, c]: y = +-x / 512, unsaturated, and a
        # tie wherever x = 512 j + 256
        sel = torch.zeros(n, k, dtype=torch.int8)
        sel[torch.arange(n), torch.arange(n)] = torch.where(torch.arange(n) % 2 == 0, 1, -1).to(
            torch.int8)
        x = torch.randint(-64, 64, (m, k), generator=g) * 512
        x = x + torch.randint(0, 2, (m, k), generator=g) * 256
        args.update(q=torch.tensor([2**30]), shift=torch.tensor([39]), bias=None, w=sel,
                    x=x.to(torch.int16))
    elif name == "x-min w-min bias-max":
        args.update(x=torch.full((m, k), I16_MIN, dtype=torch.int16),
                    w=torch.full((n, k), -128, dtype=torch.int8),
                    bias=torch.full((n,), top), q=torch.full((n,), 2**31 - 1),
                    shift=torch.full((n,), 62))
    elif name == "x-max w-max bias-min":
        args.update(x=torch.full((m, k), I16_MAX, dtype=torch.int16),
                    w=torch.full((n, k), 127, dtype=torch.int8), bias=torch.full((n,), -top),
                    q=torch.tensor([2**30]), shift=torch.tensor([62]))
    elif name == "x-min w-max, small shift":  # |acc| * q / 2**s far beyond int8: saturates
        args.update(x=torch.full((m, k), I16_MIN, dtype=torch.int16),
                    w=torch.full((n, k), 127, dtype=torch.int8), bias=None,
                    q=torch.tensor([2**31 - 1]), shift=torch.tensor([1]))
    elif name == "mixed ends":  # x and w at both ends in a pattern; q = 0 on some channels
        pick = torch.randint(0, 2, (m, k), generator=g).bool()
        args.update(x=torch.where(pick, I16_MAX, I16_MIN).to(torch.int16),
                    w=torch.where(torch.randint(0, 2, (n, k), generator=g).bool(), 127,
                                  -128).to(torch.int8),
                    bias=torch.where(torch.arange(n) % 2 == 0, top, -top),
                    q=torch.where(torch.arange(n) % 3 == 0, 0, q), shift=s + 8)
    return tuple(args.values())


LINEAR_CASES = ["random", "per-tensor", "int4", "batched", "ties", "x-min w-min bias-max",
                "x-max w-max bias-min", "x-min w-max, small shift", "mixed ends"]


def _dq_case(name: str):
    """(x, w, bias, x_scale, w_scale, out_dtype) for linear_a16w8_dq."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    m, n, k = (7, 33, 65) if name != "int4" else (1, 7, 34)
    x = torch.randint(I16_MIN, I16_MAX + 1, (m, k), generator=g, dtype=torch.int16)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    args = dict(x=x, w=w, bias=torch.randn(n, generator=g), x_scale=3.7e-5,
                w_scale=torch.rand(n, generator=g) * 0.01, out_dtype=torch.float32)
    if name == "int4":
        args.update(w=pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)),
                    out_dtype=torch.bfloat16)
    elif name == "per-tensor w_scale, float16":
        args.update(w_scale=torch.tensor([0.003]), bias=None, out_dtype=torch.float16,
                    x_scale=1e-7)
    elif name == "extremes":
        args.update(x=torch.full((m, k), I16_MIN, dtype=torch.int16),
                    w=torch.full((n, k), -128, dtype=torch.int8), bias=None)
    return tuple(args.values())


DQ_CASES = ["random", "int4", "per-tensor w_scale, float16", "extremes"]


# ---------------------------------------------------------------- linear_a16w8


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_reference_is_the_exact_definition(case):
    args = _linear_case(case)
    got = a16_ops.linear_a16w8(*args, impl="reference")
    assert got.dtype == torch.int8
    assert torch.equal(got, _exact_linear(*args))


def test_cases_reach_the_ends():
    """The extreme cases do what they say: ties, saturation, the 2**62 edge."""
    x, w, bias, q, s, *_ = _linear_case("ties")
    acc = torch.tensor(_exact_acc(x, w))
    assert ((acc * int(q)) % 2 ** int(s) == 2 ** (int(s) - 1)).float().mean() > 0.3
    y = a16_ops.linear_a16w8(*_linear_case("ties"), impl="reference")
    assert y.min() > -128 and y.max() < 127  # rounding shows, no clamp hides it
    x, w, bias, *_ = _linear_case("mixed ends")
    assert (torch.tensor(_exact_acc(x, w)) + bias).abs().max() > 2**61
    x, w, bias, *_ = _linear_case("x-min w-min bias-max")
    assert a16_accumulator_bound(w, bias=bias) == LIMIT - 1
    assert max(max(r) for r in _exact_acc(x, w)) + int(bias[0]) == LIMIT - 1
    y = a16_ops.linear_a16w8(*_linear_case("x-min w-max, small shift"), impl="reference")
    assert (y == -128).all()


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("impl", _impls(a16_ops.linear_a16w8))
def test_linear_a16w8_equals_reference(impl, case):
    if not _runs(a16_ops.linear_a16w8, impl):
        pytest.skip(f"{impl} does not run here")
    x, w, *rest = _linear_case(case)
    w = _route_weights(impl, w)
    want = a16_ops.linear_a16w8(x, w, *rest, impl="reference")
    assert torch.equal(a16_ops.linear_a16w8(x, w, *rest, impl=impl), want)
    prepare = a16_ops.linear_a16w8.impls[impl].prepare
    if prepare is not None:  # the CPU impls unpack int4 at lowering: same integers
        pw = prepare({"w": w}).get("w", w)
        assert pw.dtype == torch.int8
        assert torch.equal(a16_ops.linear_a16w8(x, pw, *rest, impl=impl), want)


def test_longest_k_each_half_in_int32():
    """K = 131071 at the ends: each int8 half is at its int32 limit (128 * 128 * K < 2**31),
    the combined accumulator exact; one more and the int8 GEMM refuses."""
    k = 131071
    x = torch.full((2, k), I16_MIN, dtype=torch.int16)
    x[1] = I16_MAX
    w = torch.full((2, k), -128, dtype=torch.int8)
    w[1] = 127
    q, s = torch.tensor([2**30]), torch.tensor([62])
    want = _exact_linear(x, w, None, q, s, 0, -128, 127)
    for impl in ("reference", "cpu-fp32-exact", "cpu"):
        got = a16_ops.linear_a16w8(x, w, None, q, s, 0, -128, 127, impl=impl)
        assert torch.equal(got, want), impl
    assert a16_ops.a16_accumulator(BACKENDS["cpu"], x, w).tolist() == _exact_acc(x, w)
    with pytest.raises(AccumulatorRangeError, match="131071"):
        a16_ops.linear_a16w8(torch.zeros(1, k + 1, dtype=torch.int16),
                             torch.zeros(1, k + 1, dtype=torch.int8), None, q, s, 0, -128, 127,
                             impl="reference")


# ---------------------------------------------------------------- linear_a16w8_dq


@pytest.mark.parametrize("case", DQ_CASES)
def test_dq_reference_is_the_exact_definition(case):
    args = _dq_case(case)
    got = a16_ops.linear_a16w8_dq(*args, impl="reference")
    assert got.dtype == args[-1]
    assert torch.equal(got, _exact_dq(*args))


@pytest.mark.parametrize("case", DQ_CASES)
@pytest.mark.parametrize("impl", _impls(a16_ops.linear_a16w8_dq))
def test_linear_a16w8_dq_equals_reference(impl, case):
    if not _runs(a16_ops.linear_a16w8_dq, impl):
        pytest.skip(f"{impl} does not run here")
    x, w, *rest = _dq_case(case)
    w = _route_weights(impl, w)
    want = a16_ops.linear_a16w8_dq(x, w, *rest, impl="reference")
    assert torch.equal(a16_ops.linear_a16w8_dq(x, w, *rest, impl=impl), want)


# ---------------------------------------------------------------- quantize_int16


def _quantize_inputs():
    s = 2.0**-10  # a power of two: x / s is exact, so (k + 0.5) s are exact ties
    ties = (torch.arange(-40, 40) + 0.5) * s
    ends = torch.tensor([-4e4, 4e4, I16_MAX + 0.5, I16_MIN - 0.5, I16_MAX - 0.5,
                         I16_MIN + 0.5, float("inf"), float("-inf"), -0.0, 1e-30]) * s
    g = torch.Generator().manual_seed(0)
    return [
        ("ties and ends", torch.cat([ties, ends]).reshape(2, 45), s, I16_MIN, I16_MAX),
        ("narrow bounds", torch.cat([ties, ends]).reshape(2, 45), s, -1000, 30000),
        ("random", torch.randn(7, 33, generator=g) * 20, 1.3e-3, I16_MIN, I16_MAX),
        ("float16", (torch.randn(5, 65, generator=g) * 100).half(), 0.0071, I16_MIN + 1,
         I16_MAX),
        ("bfloat16", (torch.randn(3, 33, generator=g) * 7).bfloat16(), 3.3e-4, I16_MIN, I16_MAX),
        ("float64", torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 30, 1e-3,
         I16_MIN, I16_MAX),
        ("transposed", (torch.randn(65, 7, generator=g) * 9).T, 7.7e-4, I16_MIN, I16_MAX),
    ]


QUANTIZE = _quantize_inputs()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in the interpreter's numpy
@pytest.mark.parametrize("impl", sorted(a16_ops.quantize_int16.impls))
@pytest.mark.parametrize("name, x, scale, qmin, qmax", QUANTIZE, ids=[c[0] for c in QUANTIZE])
def test_quantize_int16_implementations_agree(impl, name, x, scale, qmin, qmax):
    if not _runs(a16_ops.quantize_int16, impl):
        pytest.skip(f"{impl} does not run here")
    # the definition: float32 true division by the float32 scale, round half to even
    s32 = torch.tensor(scale, dtype=torch.float32)
    want = torch.round(x.float() / s32).clamp(qmin, qmax).to(torch.int16)
    got = a16_ops.quantize_int16(x, scale, qmin, qmax, impl=impl)
    assert got.dtype == torch.int16 and got.shape == x.shape
    assert torch.equal(got, want)


def test_quantize_int16_rounds_ties_to_even_and_saturates():
    s = 0.25
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1e9, -1e9]) * s
    want = [0, 2, 2, 0, -2, -2, I16_MAX, I16_MIN]
    for impl in sorted(a16_ops.quantize_int16.impls):
        if _runs(a16_ops.quantize_int16, impl):
            assert a16_ops.quantize_int16(x, s, I16_MIN, I16_MAX, impl=impl).tolist() == want


@pytest.mark.slow
def test_quantize_int16_fused_cpu_path():
    """Inputs of 2**18 elements and more run Inductor-fused on the CPU path: same integers."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 1024, generator=g) * 50
    x[0, :80] = (torch.arange(-40, 40) + 0.5) * 2.0**-9
    args = (x, 2.0**-9, I16_MIN, I16_MAX)
    want = a16_ops.quantize_int16(*args, impl="reference")
    assert torch.equal(a16_ops.quantize_int16(*args, impl="cpu"), want)


# ---------------------------------------------------------------- range proof, colsum


def test_range_check_covers_each_half_and_the_wide_sum():
    check_a16_accumulator_range(131071)
    with pytest.raises(AccumulatorRangeError, match="131071"):
        check_a16_accumulator_range(131072)
    w = torch.full((3, 65), -128, dtype=torch.int8)
    edge = LIMIT - 1 - 2**15 * 128 * 65
    check_a16_accumulator_range(65, w, bias=torch.tensor([edge, -edge, 0]))
    for bad in (edge + 1, -edge - 1, 2**63 - 1, -(2**63)):  # no int64 wrap-around
        with pytest.raises(AccumulatorRangeError, match="2\\*\\*62"):
            check_a16_accumulator_range(65, w, bias=torch.tensor([0, bad, 0]))
    check_a16_accumulator_range(65, bias=torch.tensor([edge]))  # K alone: the int8 bound
    with pytest.raises(AccumulatorRangeError):
        check_a16_accumulator_range(65, bias=torch.tensor([edge + 1]))
    w4 = torch.randint(-8, 8, (5, 34), dtype=torch.int8)
    assert a16_accumulator_bound(pack_int4(w4)) == a16_accumulator_bound(w4) == int(
        (2**15 * w4.long().abs().sum(1)).max())
    with pytest.raises(TypeError, match="integer bias"):
        a16_accumulator_bound(w4, bias=torch.zeros(5))


def test_colsum_is_computed_once_per_weight_and_again_after_a_change():
    w = torch.randint(-128, 128, (7, 33), dtype=torch.int8)
    c = a16_ops.weight_colsum(w)
    assert c.dtype == torch.int64 and c.tolist() == w.long().sum(1).tolist()
    assert a16_ops.weight_colsum(w) is c
    w[0, 0] = 5 if w[0, 0] != 5 else 6  # in place: the version moves on
    assert a16_ops.weight_colsum(w).tolist() == w.long().sum(1).tolist()
    w4 = torch.randint(-8, 8, (7, 34), dtype=torch.int8)
    assert a16_ops.weight_colsum(pack_int4(w4)).tolist() == w4.long().sum(1).tolist()


# ---------------------------------------------------------------- registry, fakes, errors


def test_registered_with_every_family():
    for op in (a16_ops.linear_a16w8, a16_ops.linear_a16w8_dq):
        assert {"reference", "cpu", "triton"} <= set(op.impls)
        assert {f"cpu-{r}" for r in cpu_routes.ROUTES} <= set(op.impls)
        assert op.epilogue({}).signature() == "int32"  # the GEMM each half runs
    assert set(a16_ops.quantize_int16.impls) == {"reference", "cpu", "triton"}
    assert registry.choose(a16_ops.linear_a16w8, "auto", "cpu").name == "cpu"
    assert all(op in registry.all_ops() for op in (a16_ops.quantize_int16,
                                                  a16_ops.linear_a16w8,
                                                  a16_ops.linear_a16w8_dq))


def test_fakes_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, bias, q, s, *rest = _linear_case("int4")
    xd, wd, bd, xs, ws, _ = _dq_case("random")
    x3, x8, xf = x[None], x.to(torch.int8), torch.randn(3, 5)
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        y = a16_ops.linear_a16w8(f(x3), f(w), f(bias), f(q), f(s), *rest)
        assert y.shape == (1, *x.shape[:-1], w.shape[0]) and y.dtype == torch.int8
        y = a16_ops.linear_a16w8_dq(f(xd), f(wd), f(bd), xs, f(ws), torch.bfloat16)
        assert y.shape == (xd.shape[0], wd.shape[0]) and y.dtype == torch.bfloat16
        y = a16_ops.quantize_int16(f(xf), 0.1, I16_MIN, I16_MAX)
        assert y.shape == (3, 5) and y.dtype == torch.int16
        with pytest.raises(TypeError, match="x must be an int16"):
            a16_ops.linear_a16w8(f(x8), f(w), None, f(q), f(s), *rest)


def _bad_linear_calls():
    x, w, bias, q, s, zp, lo, hi = _linear_case("random")
    n = w.shape[0]
    return [
        ((x.to(torch.int8), w, bias, q, s, zp, lo, hi), TypeError, "x must be an int16"),
        ((x.to(torch.int32), w, bias, q, s, zp, lo, hi), TypeError, "x must be an int16"),
        ((x, w.to(torch.int16), bias, q, s, zp, lo, hi), TypeError, "w must be int8"),
        ((x[:, :-1], w, bias, q, s, zp, lo, hi), ValueError, "K = 64 but w"),
        ((x, w, bias.float(), q, s, zp, lo, hi), TypeError, "bias must be an int64"),
        ((x, w, bias[:-1], q, s, zp, lo, hi), ValueError, f"N = {n} elements"),
        ((x, w, bias, q.float(), s, zp, lo, hi), TypeError, "q must be an integer tensor"),
        ((x, w, bias, q[:2], s[:2], zp, lo, hi), ValueError, "1 or N"),
        ((x, w, bias, q, s, zp, -129, hi), ValueError, "qmin must lie in \\[-128, 127\\]"),
        ((x, w, bias, q, s, zp, 5, 4), ValueError, "qmin <= qmax"),
        ((x, w, bias, q[:1], torch.tensor([0]), zp, lo, hi), ValueError, "1 <= shift <= 62"),
        ((x, w, bias, torch.tensor([2**31]), s[:1], zp, lo, hi), ValueError,
         "0 <= q < 2\\*\\*31"),
    ]


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_linear_a16w8_refuses_bad_arguments(impl):
    for args, error, message in _bad_linear_calls():
        with pytest.raises(error, match=message):
            a16_ops.linear_a16w8(*args, impl=impl)


def test_reference_checks_per_channel_multipliers_and_the_wide_range():
    x, w, bias, q, s, *rest = _linear_case("random")
    with pytest.raises(ValueError, match="1 <= shift <= 62"):
        a16_ops.linear_a16w8(x, w, bias, q, s * 0, *rest, impl="reference")
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        a16_ops.linear_a16w8(x, w, torch.full_like(bias, 2**62 - 1), q, s, *rest,
                             impl="reference")


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_linear_a16w8_dq_refuses_bad_arguments(impl):
    x, w, bias, xs, ws, dt = _dq_case("random")
    for args, error, message in [
        ((x.to(torch.int8), w, bias, xs, ws, dt), TypeError, "x must be an int16"),
        ((x, w, bias.long(), xs, ws, dt), TypeError, "bias must be a float"),
        ((x, w, bias, xs, ws.long(), dt), TypeError, "w_scale must be a float"),
        ((x, w, bias, xs, ws[:3], dt), ValueError, "w_scale must have 1 or N"),
        ((x, w, bias, float("nan"), ws, dt), ValueError, "x_scale must be a finite"),
        ((x, w, bias, xs, ws, torch.int8), TypeError, "out_dtype must be a float"),
    ]:
        with pytest.raises(error, match=message):
            a16_ops.linear_a16w8_dq(*args, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_quantize_int16_refuses_bad_arguments(impl):
    x = torch.randn(3, 4)
    for args, error, message in [
        ((x.to(torch.int16), 0.1, I16_MIN, I16_MAX), TypeError, "x must be a floating"),
        ((x, 0.0, I16_MIN, I16_MAX), ValueError, "scale must be a finite number > 0"),
        ((x, -0.1, I16_MIN, I16_MAX), ValueError, "scale must be a finite number > 0"),
        ((x, float("inf"), I16_MIN, I16_MAX), ValueError, "scale must be a finite"),
        ((x, 0.1, I16_MIN - 1, I16_MAX), ValueError, "qmin must lie in"),
        ((x, 0.1, 0, I16_MAX + 1), ValueError, "qmax must lie in"),
        ((x, 0.1, 10, 9), ValueError, "qmin <= qmax"),
    ]:
        with pytest.raises(error, match=message):
            a16_ops.quantize_int16(*args, impl=impl)
