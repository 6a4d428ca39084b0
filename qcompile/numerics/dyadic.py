"""Dyadic (integer-only) requantization: the contract every kernel and reference obeys.

A real multiplier M > 0 (for example s_x * s_w / s_y) becomes an integer q in
[2**30, 2**31) and a right shift s in 1..62 with M ~= q / 2**s. Applying it to an int32
accumulator is one int64 multiply and one rounding shift:

    p = acc * q;  y = sign(p) * ((|p| + 2**(s-1)) >> s)      # ties away from zero
    y = clamp(y + zero_point, qmin, qmax)

One rounding only (no gemmlowp-style double rounding), symmetric for negative values.
|acc| <= 2**31 and q < 2**31 keep |p| < 2**62, so |p| + 2**61 never overflows int64.
Exact rational references live in tests/numerics/test_dyadic.py.
"""

from __future__ import annotations

import math

import torch

Q_MIN = 1 << 30  # q is normalised into [Q_MIN, Q_MAX)
Q_MAX = 1 << 31
SHIFT_MIN = 1
SHIFT_MAX = 62


class MultiplierRangeError(ValueError):
    """A multiplier whose shift falls outside 1..62 (too large, or too small to represent)."""


def _round_half_away(x: float) -> int:
    # x = m * 2**31 with m a float64 mantissa in [0.5, 1): exact, so floor(x + 0.5) is exact.
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def quantize_multiplier_scalar(multiplier: float, *, underflow: str = "error") -> tuple[int, int]:
    """(q, shift) for one real multiplier M > 0: M ~= q / 2**shift, 2**30 <= q < 2**31.

    underflow: "error" rejects multipliers below 2**-32 (shift would exceed 62);
    "zero" returns q = 0, shift = 62 for them (the requantized value is then 0 + zp).
    """
    if underflow not in ("error", "zero"):
        raise ValueError(f"underflow must be 'error' or 'zero', got {underflow!r}")
    m = float(multiplier)
    if not math.isfinite(m) or m <= 0.0:
        raise MultiplierRangeError(f"requantization multiplier must be finite and > 0, got {m!r}")
    mant, exp = math.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    q = _round_half_away(mant * float(Q_MAX))
    if q == Q_MAX:
        q, exp = Q_MIN, exp + 1
    shift = 31 - exp
    if shift < SHIFT_MIN:
        raise MultiplierRangeError(
            f"multiplier {m!r} is too large for dyadic requantization (shift {shift} < 1); "
            "the output scale is too small for these input scales"
        )
    if shift > SHIFT_MAX:
        if underflow == "zero":
            return 0, SHIFT_MAX
        raise MultiplierRangeError(
            f"multiplier {m!r} is too small for dyadic requantization (shift {shift} > 62); "
            "pass underflow='zero' to flush it to 0"
        )
    return q, shift


def quantize_multiplier(
    multiplier: float | torch.Tensor, *, underflow: str = "error"
) -> tuple[int, int] | tuple[torch.Tensor, torch.Tensor]:
    """Integer multiplier and shift for M (a float, or a tensor of per-channel multipliers).

    A float gives Python ints; a tensor gives two int64 tensors of its shape.
    """
    if not isinstance(multiplier, torch.Tensor):
        return quantize_multiplier_scalar(multiplier, underflow=underflow)
    flat = multiplier.detach().to(torch.float64).cpu().reshape(-1).tolist()
    pairs = [quantize_multiplier_scalar(m, underflow=underflow) for m in flat]
    q = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(multiplier.shape)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(multiplier.shape)
    return q, s


def rounding_shift(p: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """round_half_away(p / 2**shift) for int64 p, exact; shift in 1..62 (scalar or tensor)."""
    if isinstance(shift, torch.Tensor):
        shift = shift.to(torch.int64)
        half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    else:
        half = 1 << (int(shift) - 1)
    mag = torch.bitwise_right_shift(p.abs() + half, shift)
    return torch.where(p < 0, -mag, mag)


def requantize(
    acc: torch.Tensor,
    q: torch.Tensor | int,
    shift: torch.Tensor | int,
    zero_point: torch.Tensor | int = 0,
    qmin: int = -128,
    qmax: int = 127,
    *,
    out_dtype: torch.dtype | None = torch.int8,
) -> torch.Tensor:
    """clamp(round_half_away(acc * q / 2**shift) + zero_point, qmin, qmax), in int64 only.

    acc: integer tensor (int32 accumulators; int64 accepted while |acc| <= 2**31).
    q, shift, zero_point: Python ints (per-tensor) or integer tensors broadcasting against
    acc (per-channel: shape [N] for acc [..., N]). out_dtype None keeps int64.
    """
    if acc.dtype.is_floating_point or acc.dtype == torch.bool:
        raise TypeError(f"requantize takes an integer accumulator, got {acc.dtype}")
    if isinstance(q, torch.Tensor):
        q = q.to(device=acc.device, dtype=torch.int64)
    if isinstance(shift, torch.Tensor):
        shift = shift.to(device=acc.device, dtype=torch.int64)
    if isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.to(device=acc.device, dtype=torch.int64)
    p = acc.to(torch.int64) * q
    y = rounding_shift(p, shift) + zero_point
    y = y.clamp(qmin, qmax)
    return y if out_dtype is None else y.to(out_dtype)
