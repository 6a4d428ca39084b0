"""Fast Walsh-Hadamard transform: Triton kernel (interpreter on CPU) vs torch paths.

The kernel and the torch FWHT run the same float32 operations in the same order, so they
must agree bit for bit. Against the float64 reference x @ H^T / sqrt(n) only rounding
differs: each output is a sum of n terms of size |x| / sqrt(n) formed in log2(n) + m
float32 additions, so the error is below ~(log2(n) + m) * 2**-24 * max|x| * sqrt(n)
(we assert a 1e-5 relative bound on float32, one output ulp on half types).
"""

import math

import pytest
import torch

from qcompile.hadamard import hadamard_matrix
from qcompile.lowering import ops
from qcompile.lowering.kernels.hadamard import (
    hadamard_transform_cpu,
    hadamard_transform_ref,
    hadamard_transform_triton,
)

SIZES = [16, 64, 48, 40, 12, 1, 2]


def _tol(n: int, x: torch.Tensor) -> float:
    return 4e-7 * (math.log2(n) + 12) * float(x.abs().max()) * math.sqrt(n) + 1e-30


@pytest.mark.parametrize("n", SIZES)
def test_kernel_matches_cpu_bitwise_and_reference(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform_triton(x)
    assert torch.equal(y, hadamard_transform_cpu(x))
    ref = hadamard_transform_ref(x, torch.float64)
    assert (y.double() - ref).abs().max() <= _tol(n, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = hadamard_transform_triton(x)
    assert y.dtype == dtype
    assert torch.equal(y, hadamard_transform_cpu(x))
    # One rounding to the output type on top of a float32-accurate value.
    torch.testing.assert_close(y, hadamard_transform_ref(x), atol=0, rtol=2 * 2.0**-8)


def test_non_contiguous_and_batched():
    base = torch.randn(4, 2, 96, generator=torch.Generator().manual_seed(2))
    x = base[:, 1, ::2]  # [4, 48], row stride 192, element stride 2
    y = hadamard_transform_triton(x)
    assert y.shape == (4, 48)
    assert torch.equal(y, hadamard_transform_cpu(x.contiguous()))
    x3 = torch.randn(2, 3, 16)
    assert torch.equal(hadamard_transform_triton(x3), hadamard_transform_cpu(x3))


def test_out_dtype_and_orthogonality():
    x = torch.randn(2, 64).to(torch.float16)
    y = hadamard_transform_triton(x, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    # Orthonormal: applying it twice is the identity (H H^T = n I, and H_64 is symmetric).
    torch.testing.assert_close(hadamard_transform_cpu(y), x.float(), atol=1e-5, rtol=0)


def test_matches_explicit_matrix():
    # Independent of the factorisation the kernel uses: compare with the dense matrix.
    n = 20
    x = torch.eye(n)
    y = hadamard_transform_triton(x)
    torch.testing.assert_close(y, hadamard_matrix(n, torch.float32).T / math.sqrt(n))


def test_registry_op_and_errors():
    # the op the online-Hadamard pass inserts runs this kernel as its "triton" implementation
    x = torch.randn(2, 12)
    assert torch.equal(ops.hadamard_transform(x, impl="triton"), hadamard_transform_cpu(x))
    with pytest.raises(ValueError):
        hadamard_transform_triton(torch.randn(2, 10))
    with pytest.raises(TypeError):
        hadamard_transform_cpu(torch.ones(2, 4, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [4096, 11008, 14336, 5120, 172 * 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_large(n, dtype):
    x = torch.randn(33, n, device="cuda").to(dtype)
    y = hadamard_transform_triton(x)
    assert torch.equal(y.cpu(), hadamard_transform_cpu(x.cpu()))
    ref = hadamard_transform_ref(x, torch.float64)
    rtol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-8
    torch.testing.assert_close(y.double(), ref, atol=_tol(n, x.float()), rtol=rtol)


@pytest.mark.parametrize("n", [ops.KRON_MIN_ORDER, 1536, 2048, 1280, 172 * 8])
def test_cpu_blas_two_factor_path_matches_the_reference(n):
    """From KRON_MIN_ORDER the BLAS route applies H_n = H_a (x) H_b as two GEMMs: the same
    transform (float64 reference within float32 rounding), batched and in bf16."""
    x = torch.randn(3, 7, n, generator=torch.Generator().manual_seed(n))
    y = ops.hadamard_blas(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y.double() - hadamard_transform_ref(x, torch.float64)).abs().max() <= _tol(n, x)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(ops.hadamard_blas(xb), hadamard_transform_ref(xb), atol=1e-5,
                               rtol=2 * 2.0**-8)


@pytest.mark.parametrize("n", [ops.KRON_BLOCK_MIN_ORDER, 1536])
def test_cpu_op_in_row_blocks_matches_the_whole(n):
    """From KRON_BLOCK_MIN_ORDER and 2 * KRON_BLOCK_ROWS rows, the BLAS route runs
    KRON_BLOCK_ROWS rows at a time: the unblocked GEMMs' values (BLAS may sum in another
    order for another M: float32 rounding), a ragged last block included."""
    rows = 2 * ops.KRON_BLOCK_ROWS + 37
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    y = ops.hadamard_blas(x)
    ha, bt = ops._kron(n, "cpu")
    a, b = ha.shape[0], bt.shape[0]
    whole = torch.matmul(ha, (x.reshape(rows * a, b) @ bt).reshape(rows, a, b)).reshape(x.shape)
    assert torch.allclose(y, whole, rtol=0, atol=1e-6)
    assert (y.double() - hadamard_transform_ref(x, torch.float64)).abs().max() <= _tol(n, x)


@pytest.mark.parametrize("n, split", [(384, (8, 48)), (1536, (32, 48)), (1024, (32, 32)),
                                      (640, (16, 40)), (5632, (128, 44)), (172 * 8, (8, 172))])
def test_cpu_two_factor_split(n, split):
    """The inner factor is the smallest H_m (x) H_2^j of order >= 32 (the measured fastest
    split on CPU), and the split is H_n itself: H_a (x) H_b == H_n."""
    from qcompile.hadamard import hadamard_matrix

    assert ops.kron_split(n) == split
    a, b = split
    if n <= 1536:
        assert torch.equal(torch.kron(hadamard_matrix(a), hadamard_matrix(b)), hadamard_matrix(n))


@pytest.mark.parametrize("n", [1, 2, 12, 20, 32, 48, 384, 1536, 2048, 5632, 172 * 8])
def test_cpu_butterfly_kernel_matches_the_reference(n):
    """The C++ kernel (H_b on blocks of b floats, then Sylvester butterflies over a; the
    op's CPU route where fwht_suits): the float64 reference within float32 rounding, for
    batched, strided, bf16 and empty inputs, any block split (172 * 8 has b = 172, which
    the op leaves to BLAS; the kernel is right for it all the same)."""
    from qcompile.lowering.kernels import hadamard_cpu

    if not hadamard_cpu.fwht_cpu_available():
        pytest.skip("Inductor's C++ toolchain does not build here")
    a, b = hadamard_cpu.block_split(n)
    assert a * b == n and a & (a - 1) == 0
    assert torch.equal(torch.kron(hadamard_matrix(a), hadamard_matrix(b)), hadamard_matrix(n))
    x = torch.randn(5, 2 * n + 3, generator=torch.Generator().manual_seed(n))[:, 3:].unfold(
        1, n, n).transpose(0, 1)  # [2, 5, n], not contiguous
    y = hadamard_cpu.hadamard_transform_fwht(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y.double() - hadamard_transform_ref(x, torch.float64)).abs().max() <= _tol(n, x)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(hadamard_cpu.hadamard_transform_fwht(xb),
                               hadamard_transform_ref(xb), atol=1e-5, rtol=2 * 2.0**-8)
    assert hadamard_cpu.hadamard_transform_fwht(x[:, :0]).shape == (2, 0, n)
    # the op takes the kernel exactly where the block is small
    if hadamard_cpu.fwht_suits(n):
        assert torch.equal(ops.hadamard_transform(x, impl="cpu"),
                           hadamard_cpu.hadamard_transform_fwht(x))
    assert hadamard_cpu.fwht_suits(n) == (b <= hadamard_cpu.FWHT_MAX_BLOCK)
