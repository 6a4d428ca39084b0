"""Hadamard matrices built by known constructions, and random orthogonal rotations.

What: `hadamard_matrix(n)` returns an n x n matrix H with entries +-1 and H @ H.T == n * I,
for n a power of two or a power of two times a "small" order m that one of the classical
constructions below yields. `random_hadamard` and `orthogonal_matrix` give the orthogonal
rotations the rotation passes fold into weights (QuaRot / SpinQuant style).

Why: rotating a residual stream by an orthogonal matrix spreads outlier channels over all
channels and is exact in real arithmetic. A Hadamard rotation is also cheap online (a fast
Walsh-Hadamard transform, see lowering/kernels/hadamard.py). Model widths are often not
powers of two (e.g. 11008 = 2**8 * 43), so we need H_n = H_{2**k} (x) H_m with small m.

Constructions (nothing is pasted in as a table; everything is computed at first use):
- Sylvester: H_{2**k}[i, j] = (-1)**popcount(i & j), the natural-order Walsh matrix.
- Paley I: q a prime power, q = 3 mod 4 -> order q + 1 (12, 20, 28, 44, 60, 108, 140, ...).
- Paley II: q a prime power, q = 1 mod 4 -> order 2 (q + 1) (36, 52, 28, 108, ...).
  Both need the quadratic character of GF(q); GF(p**k) is built as polynomials over
  GF(p) modulo an irreducible polynomial found by trial division.
- Goethals-Seidel array with four circulant +-1 matrices A, B, C, D of odd order t whose
  periodic autocorrelations sum to zero (order 4t). The sequences are found at first use
  by a meet-in-the-middle search over sequences that are constant on the orbits of a
  cyclic multiplier group <g> of Z_t^* (the "cyclotomic" ansatz); it finishes in well
  under a second for t = 43 (order 172) and t = 39 (order 156).
- Kronecker products of the above.

Post: every matrix returned satisfies H @ H.T == n * I exactly (Sylvester and Kronecker
by construction; Paley and Goethals-Seidel results are checked when built).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

# Odd orders t for which the Goethals-Seidel search below is known (by tests) to succeed
# quickly; it gives order 4t where Paley does not (156 = 4 * 39, 172 = 4 * 43). Only the
# orders are listed: the sequences themselves are searched for.
_GS_ORDERS = frozenset({3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 31, 33, 35, 37, 39, 43})
# Upper bound on the sequences per search (2**orbits); keeps every search bounded.
_GS_MAX_ORBITS = 11


# --------------------------------------------------------------------------- arithmetic


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k for a prime p, else None."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists are lowest degree first, f is monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (trial division)."""
    for tail in itertools.product(range(p), repeat=k):
        f = list(tail) + [1]
        if f[0] == 0:  # divisible by x
            continue
        divisors = (
            list(t) + [1]
            for d in range(1, k // 2 + 1)
            for t in itertools.product(range(p), repeat=d)
        )
        if all(any(_poly_mod(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # unreachable


@functools.cache
def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q), chi the quadratic character; int64 [q, q].

    Elements of GF(p**k) are numbered by their base-p digits (polynomial coefficients), so
    subtraction is digit-wise mod p and only squaring needs the irreducible polynomial.
    """
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = np.array(list(itertools.product(range(p), repeat=k)), dtype=np.int64)
    digits = digits[:, ::-1]  # [q, k], digit i = coefficient of x**i; row index = element id
    weights = p ** np.arange(k, dtype=np.int64)
    f = _irreducible(p, k) if k > 1 else [0, 1]
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for x in range(1, q):
        a = digits[x].tolist()
        sq = [0] * (2 * k - 1)
        for i, j in itertools.product(range(k), repeat=2):
            sq[i + j] += a[i] * a[j]
        r = _poly_mod(sq, f, p) if k > 1 else [sq[0] % p]
        r = r + [0] * (k - len(r))
        chi[int(np.dot(r, weights))] = 1
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, k]
    return chi[diff @ weights]


# ------------------------------------------------------------------------ constructions


def _sylvester(n: int) -> np.ndarray:
    # [[H, H], [H, -H]] doubling gives H[i, j] = (-1)**popcount(i & j) (natural order).
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley1(q: int) -> np.ndarray:
    # S = [[0, 1^T], [-1, Q]] is skew for q = 3 mod 4, and H = I + S has H H^T = (q+1) I.
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    # C = [[0, 1^T], [1, Q]] is a symmetric conference matrix for q = 1 mod 4.
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    eye = np.eye(q + 1, dtype=np.int64)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(eye, np.array([[1, -1], [-1, -1]]))


def _orbits(t: int, g: int) -> list[list[int]]:
    seen: set[int] = set()
    orbits = []
    for x in range(t):
        if x not in seen:
            orbit, y = [], x
            while y not in orbit:
                orbit.append(y)
                y = y * g % t
            seen.update(orbit)
            orbits.append(orbit)
    return orbits


def _gs_search(t: int, g: int) -> np.ndarray | None:
    """Four +-1 sequences [4, t], constant on the <g>-orbits of Z_t, whose periodic
    autocorrelations sum to 0 at every nonzero shift; None if there are none."""
    orbits = _orbits(t, g)
    signs = np.array(list(itertools.product((1, -1), repeat=len(orbits))), dtype=np.int64)
    member = np.zeros((len(orbits), t), dtype=np.int64)
    for i, orbit in enumerate(orbits):
        member[i, orbit] = 1
    seqs = signs @ member  # [S, t]
    # The autocorrelation of a <g>-invariant sequence is <g>-invariant: one shift per orbit.
    shifts = [o[0] for o in orbits if o[0] != 0]
    paf = np.stack([(seqs * np.roll(seqs, -s, axis=1)).sum(1) for s in shifts], 1)  # [S, R]
    n_seq = len(seqs)
    # Hash each autocorrelation vector to one int64 (wrapping arithmetic, so the hash of a
    # sum is the sum of hashes); candidate matches are then checked exactly.
    w = np.random.default_rng(0).integers(1, 2**62, size=len(shifts), dtype=np.int64)
    h = paf @ w  # [S]
    key = (h[:, None] + h[None, :]).reshape(-1)  # [S*S], pair (a, b) at a * S + b
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    pos = np.searchsorted(sorted_key, -key)
    hit = pos < len(key)
    hit[hit] = sorted_key[pos[hit]] == -key[hit]
    for cd in np.flatnonzero(hit):
        a, b = divmod(int(order[pos[cd]]), n_seq)
        c, d = divmod(int(cd), n_seq)
        if np.array_equal(paf[a] + paf[b], -(paf[c] + paf[d])):
            return seqs[[a, b, c, d]]
    return None


def _goethals_seidel(t: int) -> np.ndarray:
    # Try each multiplier subgroup <g> once (one g per orbit partition), fewest orbits (the
    # smallest search) first.
    partitions: dict[frozenset, int] = {}
    for g in range(2, t):
        if math.gcd(g, t) == 1:
            key = frozenset(frozenset(o) for o in _orbits(t, g))
            partitions.setdefault(key, g)
    for n_orbits, g in sorted((len(key), g) for key, g in partitions.items()):
        found = _gs_search(t, g) if n_orbits <= _GS_MAX_ORBITS else None
        if found is not None:
            break
    else:
        raise ValueError(f"no Goethals-Seidel sequences of length {t} in the cyclotomic search")
    idx = np.arange(t)
    a, b, c, d = (s[(idx[None, :] - idx[:, None]) % t] for s in found)  # circulants [t, t]
    r = np.eye(t, dtype=np.int64)[::-1]  # back-diagonal: makes X R and Y^T R commute right
    return np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )


def _construction(n: int) -> tuple | None:
    """How to build a Hadamard matrix of order n, or None; cheap (no matrices built)."""
    if n in (1, 2) or (n > 0 and n & (n - 1) == 0):
        return ("sylvester", n)
    if n % 4:
        return None
    pq = _prime_power(n - 1)
    if pq and (n - 1) % 4 == 3:
        return ("paley1", n - 1)
    pq = _prime_power(n // 2 - 1)
    if pq and (n // 2 - 1) % 4 == 1:
        return ("paley2", n // 2 - 1)
    if n // 4 in _GS_ORDERS:
        return ("goethals-seidel", n // 4)
    for a in range(4, math.isqrt(n) + 1, 4):  # both factors must be Hadamard orders
        if n % a == 0 and _construction(a) and _construction(n // a):
            return ("kronecker", a, n // a)
    return None


@functools.cache
def _build(n: int) -> torch.Tensor:
    how = _construction(n)
    if how is None:
        raise ValueError(f"no Hadamard construction for order {n}")
    kind = how[0]
    if kind == "sylvester":
        h = _sylvester(n)
    elif kind == "paley1":
        h = _paley1(how[1])
    elif kind == "paley2":
        h = _paley2(how[1])
    elif kind == "goethals-seidel":
        h = _goethals_seidel(how[1])
    else:
        h = np.kron(_build(how[1]).numpy(), _build(how[2]).numpy())
    h = torch.from_numpy(np.ascontiguousarray(h)).to(torch.int8)
    if kind in ("paley1", "paley2", "goethals-seidel"):  # Sylvester and Kronecker are proofs
        gram = h.to(torch.int64) @ h.to(torch.int64).T
        if not torch.equal(gram, n * torch.eye(n, dtype=torch.int64)):
            raise AssertionError(f"{kind} construction of order {n} is not Hadamard")  # a bug
    return h


# ----------------------------------------------------------------------------- public


def hadamard_factor(n: int) -> tuple[int, int]:
    """(pow2, m) with n = pow2 * m and m the smallest constructible order for n's odd part.

    m == 1 for powers of two. H_n is built as H_pow2 (Sylvester) (x) H_m, so a fast
    transform runs butterflies over pow2 and one dense m x m product. Raises ValueError
    when n is not a Hadamard size this module can build.
    """
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    odd = n // (n & -n)
    if odd == 1:
        return n, 1
    m = 4 * odd
    while m <= n:
        if _construction(m) is not None:
            return n // m, m
        m *= 2
    raise ValueError(
        f"no Hadamard matrix of order {n} = 2**{(n // odd).bit_length() - 1} * {odd} can be "
        f"built here (needs 4*{odd}*2**j constructible by Sylvester, Paley I/II, "
        "Goethals-Seidel or Kronecker); use orthogonal_matrix for an offline rotation"
    )


def is_hadamard_size(n: int) -> bool:
    """Whether hadamard_matrix(n) succeeds (cheap: builds nothing)."""
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H [n, n] with entries +-1 and H @ H.T == n * I; H = H_pow2 (x) H_m (hadamard_factor)."""
    pow2, m = hadamard_factor(n)
    h = _build(m).to(dtype)
    return torch.kron(_build(pow2).to(dtype), h) if pow2 > 1 else h


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H @ diag(d) / sqrt(n), d uniform random +-1 from seed: an orthogonal matrix [n, n]."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    h = hadamard_matrix(n, torch.float64) * d.to(torch.float64)[None, :]
    return (h / math.sqrt(n)).to(dtype)


def orthogonal_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random orthogonal matrix [n, n] (Haar): QR of a Gaussian, columns sign-fixed.

    For offline folding only, where no Hadamard matrix of order n exists: it has no fast
    transform, so it cannot serve as an online rotation.
    """
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Fix the sign ambiguity of QR so the distribution is Haar and the result deterministic.
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1
    return (q * sign[None, :]).to(dtype)


__all__ = [
    "hadamard_factor",
    "hadamard_matrix",
    "is_hadamard_size",
    "orthogonal_matrix",
    "random_hadamard",
]
