"""Hadamard constructions: exact H H^T == n I, factorisation, and orthogonal variants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.hadamard import (
    _GS_ORDERS,
    _goethals_seidel,
    hadamard_factor,
    hadamard_matrix,
    is_hadamard_size,
    orthogonal_matrix,
    random_hadamard,
)

# The small orders the rotation passes need (DESIGN.md), each by its construction.
LISTED = [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]


def _assert_hadamard(h: torch.Tensor, n: int) -> None:
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones_like(h))
    # Integer entries: float64 products and sums below 2**53 are exact.
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", LISTED)
def test_listed_orders_are_hadamard(n):
    assert is_hadamard_size(n)
    _assert_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 256, 44, 68, 72, 124, 4 * 43 * 2])
def test_more_orders(n):
    _assert_hadamard(hadamard_matrix(n), n)


_valid = st.builds(
    lambda m, k: m * 2**k,
    st.sampled_from([1, 12, 20, 28, 36, 44, 52, 60, 108, 140, 156, 172]),
    st.integers(0, 3),
)


@settings(max_examples=10, deadline=None)
@given(_valid)
def test_hypothesis_valid_orders(n):
    _assert_hadamard(hadamard_matrix(n), n)
    pow2, m = hadamard_factor(n)
    assert pow2 * m == n and pow2 & (pow2 - 1) == 0


@pytest.mark.parametrize(
    "n, expected",
    [
        (4096, (4096, 1)),
        (11008, (64, 172)),
        (14336, (512, 28)),
        (40, (2, 20)),
        (12, (1, 12)),
        (5120, (256, 20)),
        (13824, (128, 108)),
    ],
)
def test_factor(n, expected):
    assert hadamard_factor(n) == expected


def test_kronecker_layout():
    # The fast transform relies on H_n = H_pow2 (x) H_m with H_pow2 the natural-order
    # Walsh matrix.
    n = 48
    h = hadamard_matrix(n)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h4 = torch.kron(h2, h2)
    assert torch.equal(h, torch.kron(h4, hadamard_matrix(12)))


@pytest.mark.parametrize("n", [3, 6, 10, 116, 4 * 47, 0])
def test_unbuildable_orders_raise(n):
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError):
        hadamard_matrix(n)


def test_dtype_and_fresh_copy():
    h = hadamard_matrix(12, torch.float32)
    assert h.dtype == torch.float32
    h.mul_(0)  # must not corrupt the cache
    assert hadamard_matrix(12).abs().sum() == 144


@settings(max_examples=10, deadline=None)
@given(_valid, st.integers(0, 2**31 - 1))
def test_random_hadamard_orthogonal(n, seed):
    q = random_hadamard(n, seed)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, eye, atol=1e-12, rtol=0)
    # Still a scaled Hadamard matrix: every entry +-1/sqrt(n).
    torch.testing.assert_close(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), atol=1e-15, rtol=0)
    assert torch.equal(q, random_hadamard(n, seed))


def test_random_hadamard_seed_changes_signs():
    assert not torch.equal(random_hadamard(64, 0), random_hadamard(64, 1))


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 100), st.integers(0, 2**31 - 1))
def test_orthogonal_matrix(n, seed):
    q = orthogonal_matrix(n, seed)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ q, eye, atol=1e-12, rtol=0)
    assert torch.equal(q, orthogonal_matrix(n, seed))


@pytest.mark.parametrize("t", sorted(_GS_ORDERS))
def test_every_goethals_seidel_order_is_found(t):
    # _GS_ORDERS promises the cyclotomic search succeeds for each of these.
    h = torch.from_numpy(_goethals_seidel(t)).double()
    _assert_hadamard(h, 4 * t)
