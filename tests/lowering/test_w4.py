"""W4A16 and W4A8 GEMMs: kernels (interpreter on CPU) vs references, and the registry's
CPU implementations of linear_w4a16 / linear_w4a8 (and the CPU int8 GEMM they use) too.

Integer outputs (W4A8 requantized, and its float epilogue, which is computed in a fixed op
order without FMA contraction) must equal the reference bit for bit. W4A16 accumulates in
float32 in the kernel's order, the reference in float64 over the same float operands
(weights dequantized as specs.dequantize, rounded to x.dtype), so they differ by the
float32 summation error plus at most one rounding of the output type.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.lowering import ops
from qcompile.lowering.kernels.w4 import (
    dequantize_w4,
    w4a8_acc_ref,
    w4a8_gemm_dequant_ref,
    w4a8_gemm_dequant_triton,
    w4a8_gemm_requant_ref,
    w4a8_gemm_requant_triton,
    w4a16_gemm_cpu,
    w4a16_gemm_ref,
    w4a16_gemm_triton,
)
from qcompile.numerics import specs
from qcompile.numerics.dyadic import quantize_multiplier

_fast = settings(max_examples=10, deadline=None)
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def _weights(n, k, g, seed, group=32, zeros=False, sdtype=torch.float16):
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 0.01).to(sdtype)
    z = torch.randint(-8, 8, (n, k // group), generator=g, dtype=torch.int8) if zeros else None
    return w, specs.pack_int4(w), s, z


def _assert_w4a16_close(y, ref, x, w_deq):
    # float32 summation error of K terms, plus one rounding of the output type (for both).
    k = x.shape[1]
    mag = x.abs().double() @ w_deq.abs().double().T  # [M, N]
    eps = EPS[x.dtype]
    bound = mag * k * 2.0**-23 + 2 * eps * ref.double().abs() + 1e-30
    assert ((y.double() - ref.double()).abs() <= bound).all()


@_fast
@given(
    st.integers(1, 20), st.integers(1, 40), st.sampled_from([32, 64]), st.integers(1, 3),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.booleans(),
    st.booleans(), st.sampled_from([None, 1, 2]), st.integers(0, 2**16),
)  # fmt: skip
def test_w4a16_matches_reference(m, n, group, n_groups, dtype, zeros, bias, split_k, seed):
    g = torch.Generator().manual_seed(seed)
    k = group * n_groups
    _, wp, s, z = _weights(n, k, g, seed, group, zeros, dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    cfg = None
    if split_k:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, num_warps=4)
    y = w4a16_gemm_triton(x, wp, s, z, group, b, config=cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = w4a16_gemm_ref(x, wp, s, z, group, b)
    w_deq = dequantize_w4(wp, s, z, group).to(dtype)
    _assert_w4a16_close(y, ref, x, w_deq)
    _assert_w4a16_close(w4a16_gemm_cpu(x, wp, s, z, group, b), ref, x, w_deq)


def test_w4a16_dequantizes_like_specs():
    # A float weight quantized group-wise by the numerics helper, packed, and multiplied:
    # the kernel must see exactly specs.dequantize's weights (x = identity rows).
    g = torch.Generator().manual_seed(0)
    wf = torch.randn(24, 64, generator=g)
    spec = specs.QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32)
    scale, zp = specs.choose_qparams(wf, spec)
    q = specs.quantize(wf, scale, zp, spec)
    w_deq = specs.dequantize(q, scale, zp, spec)  # float32 [24, 64]
    x = torch.eye(64, dtype=torch.float32)
    y = w4a16_gemm_triton(x, specs.pack_int4(q), scale, zp.to(torch.int8), 32)
    assert torch.equal(y, w_deq.T)


def test_w4a16_non_contiguous_x_and_errors():
    g = torch.Generator().manual_seed(1)
    _, wp, s, _ = _weights(16, 64, g, 1)
    x = torch.randn(64, 6, generator=g).half().T  # [6, 64], column-major
    ref = w4a16_gemm_ref(x, wp, s, None, 32)
    _assert_w4a16_close(w4a16_gemm_triton(x, wp, s, group_size=32), ref, x,
                        dequantize_w4(wp, s, None, 32).half())  # fmt: skip
    with pytest.raises(ValueError):
        w4a16_gemm_triton(x, wp, s, group_size=48)  # does not divide K
    with pytest.raises(ValueError):
        w4a16_gemm_triton(x[:, :32], wp, s, group_size=32)  # K mismatch
    with pytest.raises(TypeError):
        w4a16_gemm_triton(x, wp.to(torch.int8), s, group_size=32)


def test_w4a16_registry_cpu():
    # unbound on CPU tensors, linear_w4a16 runs its "cpu" implementation: w4a16_gemm_cpu
    g = torch.Generator().manual_seed(2)
    _, wp, s, z = _weights(8, 64, g, 2, zeros=True)
    x = torch.randn(3, 64, generator=g).half()
    assert torch.equal(ops.linear_w4a16(x, wp, s, z, 32, None), w4a16_gemm_cpu(x, wp, s, z, 32))


# ------------------------------------------------------------------------- W4A8


@_fast
@given(
    st.integers(1, 20), st.integers(1, 40), st.integers(1, 5), st.booleans(), st.booleans(),
    st.integers(-10, 10), st.integers(0, 2**16),
)  # fmt: skip
def test_w4a8_requant_bitexact(m, n, k32, per_channel, bias, zp, seed):
    g = torch.Generator().manual_seed(seed)
    k = 32 * k32
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    _, wp, _, _ = _weights(n, k, g, seed)
    if per_channel:
        q, sh = quantize_multiplier(torch.rand(n, generator=g, dtype=torch.float64) * 1e-3 + 1e-5)
    else:
        q, sh = quantize_multiplier(2e-4)
    b = torch.randint(-(2**20), 2**20, (n,), generator=g, dtype=torch.int32) if bias else None
    ref = w4a8_gemm_requant_ref(x, wp, q, sh, zp, b)
    assert torch.equal(w4a8_gemm_requant_triton(x, wp, q, sh, zp, b), ref)
    # the registry's CPU implementation (the int4 values through the int8 CPU GEMM), bound
    # and as an unbound call on CPU tensors chooses it
    args = (x, wp, b, None, torch.as_tensor(q), torch.as_tensor(sh), zp, -128, 127)
    assert torch.equal(ops.linear_w4a8(*args, impl="cpu"), ref)
    assert torch.equal(ops.linear_w4a8(*args), ref)


def test_w4a8_extremes_and_clamp():
    # All -128 x -8: the largest accumulator (K * 1024), and a ReLU-style clamp qmin = zp.
    k = 256
    x = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.full((5, k), -8, dtype=torch.int8)
    w[1] = 7
    w[2, ::2] = 7
    wp = specs.pack_int4(w)
    acc = w4a8_acc_ref(x, wp)
    assert acc[0].tolist() == [k * 1024, -k * 896, k * (-448 + 512), k * 1024, k * 1024]
    for q, sh, zp, lo, hi in [(2**30, 20, 0, -128, 127), (2**31 - 1, 62, 0, -128, 127),
                              (2**30, 1, -3, -3, 127), (1518500250, 31, 5, -128, 127)]:  # fmt: skip
        out = w4a8_gemm_requant_triton(x, wp, q, sh, zp, None, lo, hi)
        assert torch.equal(out, w4a8_gemm_requant_ref(x, wp, q, sh, zp, None, lo, hi))
    assert w4a8_gemm_requant_triton(x, wp, 2**30, 1, -3, None, -3, 127)[0, 1] == -3


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_w4a8_dequant_bitexact(out_dtype, bias):
    g = torch.Generator().manual_seed(3)
    m, n, k = 7, 33, 96
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    _, wp, _, _ = _weights(n, k, g, 3)
    xs = torch.rand(m, generator=g) * 0.02
    ws = torch.rand(n, generator=g) * 0.02
    b = torch.randn(n, generator=g) if bias else None
    ref = w4a8_gemm_dequant_ref(x, wp, xs, ws, b, out_dtype)
    assert torch.equal(w4a8_gemm_dequant_triton(x, wp, xs, ws, b, out_dtype), ref)
    # the CPU path for int4 values: the registry's CPU int8 GEMM with the same float
    # epilogue (the op order of lowering/reference.py)
    values = dict(row_scale=xs, col_scale=ws, **({"float_bias": b} if bias else {}))
    y = ops.BACKENDS["cpu"].gemm(x, specs.unpack_int4(wp), ops.dynamic_epilogue(bias), "", **values)
    assert torch.equal(y.to(out_dtype), ref)


def test_w4a8_errors():
    x = torch.zeros(2, 64, dtype=torch.int8)
    wp = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(TypeError):
        w4a8_gemm_requant_triton(x.float(), wp, 2**30, 10)
    with pytest.raises(ValueError):
        w4a8_gemm_requant_triton(x, wp, torch.full((3,), 2**30), torch.full((3,), 10))
    with pytest.raises(TypeError):
        w4a8_gemm_requant_triton(x, wp, 2**30, 10, bias=torch.zeros(4))


# ------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_w4a16_llama(m, n, k, dtype):
    g = torch.Generator().manual_seed(0)
    _, wp, s, z = _weights(n, k, g, 0, 128, True, dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = w4a16_gemm_triton(x.cuda(), wp.cuda(), s.cuda(), z.cuda(), 128).cpu()
    ref = w4a16_gemm_ref(x, wp, s, z, 128)
    _assert_w4a16_close(y, ref, x, dequantize_w4(wp, s, z, 128).to(dtype))


@cuda
@pytest.mark.parametrize("m", [1, 16, 100])
def test_cuda_w4a8(m):
    g = torch.Generator().manual_seed(0)
    n, k = 4096, 4096
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    _, wp, _, _ = _weights(n, k, g, 0)
    q, sh = quantize_multiplier(torch.rand(n, dtype=torch.float64) * 1e-4 + 1e-6)
    out = w4a8_gemm_requant_triton(x.cuda(), wp.cuda(), q.cuda(), sh.cuda(), 1)
    assert torch.equal(out.cpu(), w4a8_gemm_requant_ref(x, wp, q, sh, 1))
    xs, ws = torch.rand(m) * 0.01, torch.rand(n) * 0.01
    y = w4a8_gemm_dequant_triton(x.cuda(), wp.cuda(), xs.cuda(), ws.cuda(), None, torch.bfloat16)
    assert torch.equal(y.cpu(), w4a8_gemm_dequant_ref(x, wp, xs, ws, None, torch.bfloat16))


def test_fast_unpack_matches_specs():
    from qcompile.lowering.kernels.w4 import _unpack_int4_fast

    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    assert torch.equal(_unpack_int4_fast(every_byte), specs.unpack_int4(every_byte))
