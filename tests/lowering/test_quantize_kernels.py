"""Activation quantization kernels vs their references: integer outputs bit for bit.

The references are the numerics helpers themselves (specs.quantize, specs.dynamic_per_token
_qparams, dyadic.requantize), so a kernel that passes agrees with the simulated path.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.lowering import ops
from qcompile.lowering.epilogue import Epilogue, Requantize, bind_operands
from qcompile.lowering.kernels.hadamard import hadamard_transform_ref
from qcompile.lowering.kernels.quantize import (
    SCALE_EPS,
    hadamard_quantize_per_token_ref,
    hadamard_quantize_per_token_triton,
    quantize_per_tensor_ref,
    quantize_per_tensor_triton,
    quantize_per_token_ref,
    quantize_per_token_triton,
    requantize_int_ref,
    requantize_int_triton,
)
from qcompile.numerics.dyadic import quantize_multiplier

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_fast = settings(max_examples=10, deadline=None)


def _x(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------ static per-tensor


@_fast
@given(
    st.integers(1, 5), st.integers(1, 70), st.sampled_from(DTYPES), st.integers(-20, 20),
    st.floats(1e-3, 1.0), st.booleans(), st.integers(0, 2**16),
)  # fmt: skip
def test_per_tensor_bitexact(m, k, dtype, zp, scale, transpose, seed):
    x = _x((k, m) if transpose else (m, k), dtype, seed)
    x = x.T if transpose else x  # non-contiguous [m, k]
    assert torch.equal(
        quantize_per_tensor_triton(x, scale, zp), quantize_per_tensor_ref(x, scale, zp)
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf / scale in numpy
def test_per_tensor_ties_extremes_and_bits():
    # x / 0.5 lands exactly on k / 2: every tie, both signs; then values just below 0.5.
    x = torch.arange(-20, 21, dtype=torch.float32) * 0.25
    below = torch.tensor([0.49999997, -0.49999997, 1.4999999, -2.5000002]) * 0.5
    big = torch.tensor([float("inf"), float("-inf"), 3e38, -3e38, 1e-40, -0.0, 65504.0])
    x = torch.cat([x, below, big])[None, :]
    q = quantize_per_tensor_triton(x, 0.5, 0)
    assert torch.equal(q, quantize_per_tensor_ref(x, 0.5, 0))
    # Ties to even: -2.5 -> -2, -1.5 -> -2, -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    assert [q[0, int(20 + 2 * t)].item() for t in (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)] == [
        -2,
        -2,
        0,
        0,
        2,
        2,
    ]
    assert q[0, 41:45].tolist() == [0, 0, 1, -3]
    q4 = quantize_per_tensor_triton(x, 0.5, 1, bits=4)
    assert torch.equal(q4, quantize_per_tensor_ref(x, 0.5, 1, bits=4))
    assert q4.min() == -8 and q4.max() == 7


# ------------------------------------------------------------------ dyadic requantize


_EXTREME_ACC = [2**31 - 1, -(2**31), -(2**31) + 1, 0, 1, -1, 12345, -12345]


@pytest.mark.parametrize("q, shift", [(2**30, 1), (2**31 - 1, 1), (2**30, 62), (2**31 - 1, 62),
                                      (1518500250, 31), (2**30 + 1, 40)])  # fmt: skip
def test_requantize_extremes(q, shift):
    acc = torch.tensor(_EXTREME_ACC, dtype=torch.int32)[None, :]
    for zp, lo, hi in [(0, -128, 127), (-5, -5, 127), (3, -128, 127)]:
        out = requantize_int_triton(acc, q, shift, zp, lo, hi)
        assert torch.equal(out, requantize_int_ref(acc, q, shift, zp, lo, hi))


def test_requantize_ties_away_from_zero():
    # acc * 2**30 / 2**31 = acc / 2: odd accumulators are exact ties.
    acc = torch.arange(-9, 10, dtype=torch.int32)[None, :]
    out = requantize_int_triton(acc, 2**30, 31)
    assert out[0].tolist() == [-5, -4, -4, -3, -3, -2, -2, -1, -1, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert torch.equal(out, requantize_int_ref(acc, 2**30, 31))


@_fast
@given(st.integers(1, 6), st.integers(1, 40), st.booleans(), st.integers(0, 2**16))
def test_requantize_per_channel_random(m, n, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**31), 2**31 - 1, (n, m) if transpose else (m, n), generator=g,
                        dtype=torch.int32)  # fmt: skip
    acc = acc.T if transpose else acc
    exponent = torch.randint(-8, -2, (n,), generator=g).double()
    mult = (torch.rand(n, generator=g, dtype=torch.float64) + 0.1) * 10.0**exponent
    q, s = quantize_multiplier(mult)
    assert torch.equal(requantize_int_triton(acc, q, s, 2), requantize_int_ref(acc, q, s, 2))


def test_requantize_rejects_float():
    with pytest.raises(TypeError):
        requantize_int_triton(torch.zeros(2, 2), 2**30, 4)


_INT8_OUT = r"^requantize_int's output is torch.int8, which holds \[-128, 127\]: "


@pytest.mark.parametrize("impl", [requantize_int_triton, requantize_int_ref])
@pytest.mark.parametrize(
    "lo, hi, message",
    [
        (-(2**31), 2**31 - 1, _INT8_OUT + "qmin=-2147483648 and qmax=2147483647 out of range"),
        (-129, 127, _INT8_OUT + "qmin=-129 out of range"),
        (0, 255, _INT8_OUT + "qmax=255 out of range"),
        (5, 4, "^need qmin <= qmax, got qmin=5, qmax=4$"),
    ],
)
def test_requantize_refuses_bounds_its_int8_output_cannot_hold(impl, lo, hi, message):
    # int8 storage would wrap the wider values around instead of clamping them
    acc = torch.tensor([[2008089567, -5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        impl(acc, 2**30, 31, 0, lo, hi)


@pytest.mark.parametrize("impl", [requantize_int_triton, requantize_int_ref])
@pytest.mark.parametrize(
    "q, shift, message",
    [
        (2**31, 31, r"0 <= q < 2\*\*31, got q=2147483648"),
        (2**30, 0, "1 <= shift <= 62, got shift=0"),
        (2**30, 63, "1 <= shift <= 62, got shift=63"),
        (torch.tensor(-1), torch.tensor(31), r"0 <= q < 2\*\*31, got q=-1"),
    ],
)
def test_requantize_refuses_per_tensor_multipliers_outside_the_contract(impl, q, shift, message):
    with pytest.raises(ValueError, match=f"^requantization needs {message}$"):
        impl(torch.ones(2, 3, dtype=torch.int32), q, shift)


def test_requantize_bounds_at_the_int8_edges_still_run():
    acc = torch.tensor([[2**31 - 1, -(2**31), 255, -257]], dtype=torch.int32)
    for lo, hi in [(-128, 127), (-128, -128), (127, 127)]:
        out = requantize_int_triton(acc, 2**30, 31, 0, lo, hi)
        assert torch.equal(out, requantize_int_ref(acc, 2**30, 31, 0, lo, hi))
        want = [min(max(v, lo), hi) for v in (2**30, -(2**30), 128, -129)]
        assert out.dtype == torch.int8 and out[0].tolist() == want


@pytest.mark.parametrize("lo, hi", [(-(2**31), 2**31 - 1), (-129, 127), (0, 128), (5, 4)])
def test_epilogue_binding_refuses_bounds_outside_int8(lo, hi):
    # every generated GEMM epilogue writes int8 through these bound values
    ep = Epilogue((Requantize(),))
    with pytest.raises(ValueError, match=rf"^need -128 <= qmin <= qmax <= 127, got {lo}, {hi}$"):
        bind_operands(ep, 2, 3, "cpu", {"q": 2**30, "shift": 31, "qmin": lo, "qmax": hi})
    v = bind_operands(ep, 2, 3, "cpu", {"q": 2**30, "shift": 31, "qmin": -128, "qmax": 127})
    assert (v["qmin"], v["qmax"]) == (-128, 127)


@pytest.mark.parametrize("impl", [quantize_per_tensor_triton, quantize_per_tensor_ref])
@pytest.mark.parametrize("bits", [1, 9, 16])
def test_per_tensor_refuses_bits_beyond_int8_storage(impl, bits):
    with pytest.raises(ValueError, match=f"bits must be in 2..8 \\(int8 storage\\), got {bits}"):
        impl(torch.ones(2, 3), 0.5, 0, bits=bits)


# ------------------------------------------------------------------ dynamic per-token


@_fast
@given(
    st.integers(1, 5), st.integers(1, 70), st.sampled_from(DTYPES), st.booleans(),
    st.integers(0, 2**16), st.sampled_from([8, 4]),
)  # fmt: skip
def test_per_token_bitexact(m, k, dtype, transpose, seed, bits):
    x = _x((k, m) if transpose else (m, k), dtype, seed)
    x = x.T if transpose else x
    q, s = quantize_per_token_triton(x, bits=bits)
    q_ref, s_ref = quantize_per_token_ref(x, bits=bits)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert s.dtype == torch.float32 and s.shape == (m,)


def test_per_token_zero_rows_extremes_two_pass():
    x = torch.randn(6, 37)
    x[1] = 0.0  # scale guard: eps, all zeros out
    x[2] = 1e-40  # subnormal row
    x[3, 5] = 3e38  # huge outlier
    x[4] = -x[4].abs()  # the absmax is a negative value -> it must map to -qmax
    q_ref, s_ref = quantize_per_token_ref(x)
    for block_k in (None, 8):  # one pass (row in registers) and the long-row two-pass loop
        q, s = quantize_per_token_triton(x, block_k=block_k)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert s[1] == SCALE_EPS and not q[1].any() and not q[2].any()
    assert q[3, 5] == 127 and q[4].min() == -127


def test_per_token_batched_shape():
    x = _x((2, 3, 24), torch.float16, 4)
    q, s = quantize_per_token_triton(x)
    assert q.shape == (2, 3, 24) and s.shape == (2, 3)
    q_ref, s_ref = quantize_per_token_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# ------------------------------------------------------------------ Hadamard + per-token


@pytest.mark.parametrize("n", [16, 12, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_quantize_bitexact(n, dtype):
    x = _x((3, n), dtype, n)
    x[1] = 0.0
    q, s = hadamard_quantize_per_token_triton(x)
    q_ref, s_ref = hadamard_quantize_per_token_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    # And it is what it claims: the rotation then per-token quantization, within 1 code
    # of quantizing the float64 rotation (the rotation is only float32-accurate).
    y = hadamard_transform_ref(x, torch.float64)
    assert (q.double() - y / s.double()[:, None]).abs().max() <= 0.5 + 1e-3


def test_hadamard_quantize_non_contiguous():
    base = _x((4, 96), torch.float32, 9)
    x = base[:, ::2]  # [4, 48]
    q, s = hadamard_quantize_per_token_triton(x)
    q_ref, s_ref = hadamard_quantize_per_token_ref(x.contiguous())
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_registry_impls_match_the_references(impl):
    # what the compiler runs: the ops these kernels serve, bound through the registry
    x = _x((3, 20), torch.float32, 5)
    q = ops.quantize(x, 0.1, 2, -128, 127, impl=impl)
    assert torch.equal(q, quantize_per_tensor_ref(x, 0.1, 2))
    q, s = ops.BACKENDS[impl].per_token(x)  # linear_dynamic's activation quantization
    q_ref, s_ref = quantize_per_token_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# ------------------------------------------------------------------ CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [4096, 11008, 40000])
def test_cuda_per_token_and_per_tensor(dtype, k):
    x = _x((129, k), dtype, k).cuda()
    q, s = quantize_per_token_triton(x)
    q_ref, s_ref = quantize_per_token_ref(x.cpu())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    assert torch.equal(
        quantize_per_tensor_triton(x, 0.02, 3).cpu(), quantize_per_tensor_ref(x.cpu(), 0.02, 3)
    )


@cuda
@pytest.mark.parametrize("n", [4096, 11008, 14336])
def test_cuda_hadamard_quantize(n):
    x = _x((65, n), torch.bfloat16, n).cuda()
    q, s = hadamard_quantize_per_token_triton(x)
    q_ref, s_ref = hadamard_quantize_per_token_ref(x.cpu())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@cuda
def test_cuda_requantize():
    acc = torch.randint(-(2**31), 2**31 - 1, (257, 1000), dtype=torch.int32)
    q, s = quantize_multiplier(torch.rand(1000, dtype=torch.float64) * 1e-5 + 1e-9)
    out = requantize_int_triton(acc.cuda(), q.cuda(), s.cuda(), 1)
    assert torch.equal(out.cpu(), requantize_int_ref(acc, q, s, 1))
