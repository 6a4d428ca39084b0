"""Dyadic (integer-only) requantization: the contract every kernel and reference obeys.

A real multiplier M > 0 (for example s_x * s_w / s_y) becomes an integer q in
[2**30, 2**31) and a right shift s in 1..62 with M ~= q / 2**s. Applying it to an int32
accumulator is one int64 multiply and one rounding shift:

    p = acc * q;  y = sign(p) * ((|p| + 2**(s-1)) >> s)      # ties away from zero
    y = clamp(y + zero_point, qmin, qmax)

One rounding only (no gemmlowp-style double rounding), symmetric for negative values.
|acc| <= 2**31 and q < 2**31 keep |p| < 2**62, so |p| + 2**61 never overflows int64.
Exact rational references live in tests/numerics/test_dyadic.py.

Wider accumulators (int16 x int8 GEMMs: |acc| up to ~2**39, plus an int64 bias) take
`rounding_shift_wide(acc, q, shift)`: the same rounding of acc * q / 2**s, exact for
|acc| < 2**62 although the product needs up to 93 bits, computed in int64 on 31-bit limbs.

`requantize` refuses, with a ValueError naming the argument, what would give wrong numbers
silently: q outside [0, 2**31), shift outside 1..62, qmin > qmax, an output dtype that
cannot hold [qmin, qmax] (by default it is the narrowest that can), a zero point that is
not an integer, per-channel parameters that do not broadcast against the accumulator, and
an accumulator beyond the int64 headroom. That last check reads the data (one reduction),
so it runs only where the dtype does not already prove it: int32 accumulators (every kernel's) need
none; int64 ones (an accumulator plus bias) are checked against ACC_EXACT_LIMIT = 3 * 2**30,
up to which |acc * q| + 2**61 stays below 2**63 and the result is exact. That is the
arithmetic's own limit, looser than the contract's |acc| <= 2**31, which
lowering.reference.check_accumulator_range proves once at compile time. Under torch.compile
(the CPU epilogue is traced with fullgraph=True) checks that read tensor data are
skipped: a data-dependent raise cannot be traced, and those values were bound and checked
once before (lowering.epilogue.bind_operands).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from qcompile.numerics import _checks

Q_MIN = 1 << 30  # q is normalised into [Q_MIN, Q_MAX)
Q_MAX = 1 << 31
SHIFT_MIN = 1
SHIFT_MAX = 62
# |acc| up to this keeps |acc * q| + 2**61 (the rounding half at shift 62) below 2**63 for
# every q < 2**31: (3 * 2**30) * (2**31 - 1) + 2**61 = 2**63 - 3 * 2**30.
ACC_EXACT_LIMIT = 3 << 30
_OUT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


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
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real):
        raise TypeError(f"quantize_multiplier: multiplier must be a real number or a tensor, "
                        f"got {multiplier!r}")
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
    _checks.real("quantize_multiplier", "multiplier", multiplier)
    flat = multiplier.detach().to(torch.float64).cpu().reshape(-1).tolist()
    pairs = [quantize_multiplier_scalar(m, underflow=underflow) for m in flat]
    q = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(multiplier.shape)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(multiplier.shape)
    return q, s


def rounding_shift(p: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """round_half_away(p / 2**shift) for int64 p, exact; shift in 1..62 (an int or an
    integer tensor broadcasting against p). Anything else is refused: a shift of 0 or below,
    or above 62, or an int32 p, would give wrong numbers (or overflow) silently."""
    fn = "rounding_shift"
    _checks.integer(fn, "p", p, data=False)
    if p.dtype != torch.int64:
        raise TypeError(f"{fn}: p must be an int64 tensor (the product it rounds needs the "
                        f"headroom), got {p.dtype}")
    if isinstance(shift, torch.Tensor):
        _checks.integer(fn, "shift", shift)
        _checks.broadcasts_to(fn, "shift", shift, p.shape, "p")
    lo_hi = _extent("shift", shift)
    if lo_hi is not None and not (SHIFT_MIN <= lo_hi[0] and lo_hi[1] <= SHIFT_MAX):
        got = lo_hi[0] if lo_hi[0] < SHIFT_MIN else lo_hi[1]
        raise ValueError(f"{fn}: shift must be in {SHIFT_MIN}..{SHIFT_MAX}, got {got}")
    return rounding_shift_unchecked(p, shift)


def rounding_shift_unchecked(p: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """rounding_shift's arithmetic without its checks, for the per-batch integer ops, whose
    shifts were checked once where they were made (quantize_multiplier, fit_multiplier)."""
    if isinstance(shift, torch.Tensor):
        shift = shift.to(torch.int64)
        half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    else:
        half = 1 << (int(shift) - 1)
    mag = torch.bitwise_right_shift(p.abs() + half, shift)
    return torch.where(p < 0, -mag, mag)


# |acc| bound of rounding_shift_wide, and where its result saturates (see its docstring)
WIDE_ACC_LIMIT = 1 << 62
WIDE_SATURATION = 1 << 62
_LOW31 = (1 << 31) - 1


def rounding_shift_wide(acc: torch.Tensor, q: torch.Tensor | int,
                        shift: torch.Tensor | int) -> torch.Tensor:
    """round_half_away(acc * q / 2**shift) for int64 |acc| < 2**62, exact in int64, where
    the product acc * q (up to 2**93) does not fit: the requantization of accumulators
    wider than int32 (int16 x int8 GEMMs: |acc| up to ~2**39, plus an int64 bias).

    q in [0, 2**31) and shift in 1..62: ints, or integer tensors broadcasting against acc
    (per channel: [N] for acc [..., N]). A result beyond 2**62 in magnitude saturates to
    +-WIDE_SATURATION = +-2**62 (possible only for shifts below 31: at 31 and above
    |acc| * q / 2**shift < 2**62); any clamp to a range within +-2**62, such as int8's, is
    then exactly the clamp of the exact value. Refused with a ValueError or TypeError
    naming the argument: a non-int64 acc, |acc| >= 2**62 (one reduction, skipped under
    torch.compile), q or shift out of range. `rounding_shift_wide_unchecked` is the
    arithmetic, with its proof.
    """
    fn = "rounding_shift_wide"
    _checks.integer(fn, "acc", acc, data=False)
    if acc.dtype != torch.int64:
        raise TypeError(f"{fn}: acc must be an int64 tensor, got {acc.dtype}")
    check_multiplier(q, shift)
    for name, value in (("q", q), ("shift", shift)):
        if isinstance(value, torch.Tensor):
            _checks.broadcasts_to(fn, name, value, acc.shape, "acc")
    extent = _extent("acc", acc)
    if extent is not None and max(-extent[0], extent[1]) >= WIDE_ACC_LIMIT:
        raise ValueError(f"{fn}: |acc| must be below 2**62, got "
                         f"{max(-extent[0], extent[1])}")
    return rounding_shift_wide_unchecked(acc, q, shift)


def rounding_shift_wide_unchecked(acc: torch.Tensor, q: torch.Tensor | int,
                                  shift: torch.Tensor | int) -> torch.Tensor:
    """rounding_shift_wide's arithmetic without its checks (the ops check their q and
    shift where they are made, and prove |acc| < 2**62 at compile time).

    Why it is exact and nothing overflows int64 (every quantity below is >= 0). With
    A = |acc| < 2**62, q < 2**31, 1 <= s <= 62 and h = 2**(s-1), the result is
    sign(acc) * floor((A q + h) / 2**s) (= round_half_away(acc q / 2**s)).

    1. Limbs: A = A1 2**31 + A0 with A1 = A >> 31 < 2**31 and A0 = A & (2**31 - 1).
       L = A0 q < 2**62 and A1 q < 2**62: both products fit.
    2. L = L1 2**31 + L0 (L1 = L >> 31 < 2**31, L0 < 2**31), so
       A q = T 2**31 + L0 with T = A1 q + L1 < 2**62 + 2**31 < 2**63.
    3. Let c = min(s, 31), r = s - c and l = 31 - c (r = 0 or l = 0). Since 2**c divides
       T 2**31 = (T 2**l) 2**c:
           floor((A q + h) / 2**c) = T 2**l + floor((L0 + h) / 2**c)    (L0 + h < 2**62)
       and floor(floor(x / a) / b) = floor(x / (a b)) for integers a, b > 0 gives
           floor((A q + h) / 2**s) = (T 2**l + ((L0 + h) >> c)) >> r.
    4. s >= 31 (l = 0): T + ((L0 + h) >> 31) <= T + 2**30 + 1 < 2**63.
       s < 31 (r = 0, l = 31 - s): (L0 + h) >> s <= 2**l, so the sum is at most
       (T + 1) 2**l. If T < 2**(62 - l), that is <= 2**62: exact, and it fits. Otherwise
       the result is >= 2**62 and saturates to 2**62 (T is zeroed first, so T 2**l is
       never formed). Results of the s >= 31 branch above 2**62 saturate alike.
    Shift amounts stay in range: c in 1..31, l in 0..30, r in 0..31, 62 - l in 32..62.
    """
    dev = acc.device
    q = torch.as_tensor(q, dtype=torch.int64, device=dev)
    s = torch.as_tensor(shift, dtype=torch.int64, device=dev)
    a = acc.abs()
    low = a.bitwise_and(_LOW31) * q  # A0 q  < 2**62
    t = torch.bitwise_right_shift(a, 31) * q + torch.bitwise_right_shift(low, 31)  # T
    l0 = low.bitwise_and(_LOW31)
    c = s.clamp(max=31)
    left, right = 31 - c, s - c
    one = torch.ones_like(s)
    half = torch.bitwise_left_shift(one, s - 1)
    sat = (left > 0) & (t >= torch.bitwise_left_shift(one, 62 - left))
    t = torch.where(sat, 0, t)
    mag = torch.bitwise_right_shift(
        torch.bitwise_left_shift(t, left) + torch.bitwise_right_shift(l0 + half, c), right)
    mag = torch.where(sat, WIDE_SATURATION, mag.clamp(max=WIDE_SATURATION))
    return torch.where(acc < 0, -mag, mag)


def output_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest of int8, int16, int32 and int64 that holds [qmin, qmax]."""
    check_output_range(qmin, qmax)
    for dtype in _OUT_DTYPES:
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise ValueError(f"no integer dtype holds [qmin, qmax] = [{qmin}, {qmax}]")


def check_output_range(
    qmin: int, qmax: int, out_dtype: torch.dtype | None = None, *, what: str = "out_dtype"
) -> None:
    """qmin <= qmax, and out_dtype (when given) holds both; the error names what fails.

    `what` names the output in the message: "out_dtype", or an op's fixed int8 storage.
    """
    if qmin > qmax:
        raise ValueError(f"need qmin <= qmax, got qmin={qmin}, qmax={qmax}")
    if out_dtype is None:
        return
    if out_dtype.is_floating_point or out_dtype.is_complex or out_dtype == torch.bool:
        raise TypeError(f"{what} must be an integer dtype, got {out_dtype}")
    info = torch.iinfo(out_dtype)
    bad = [f"{name}={v}" for name, v in (("qmin", qmin), ("qmax", qmax))
           if not info.min <= v <= info.max]
    if bad:
        raise ValueError(
            f"{what} is {out_dtype}, which holds [{info.min}, {info.max}]: "
            f"{' and '.join(bad)} out of range (values would wrap around)"
        )


def check_multiplier(q: torch.Tensor | int, shift: torch.Tensor | int) -> None:
    """0 <= q < 2**31 and 1 <= shift <= 62, per tensor (ints) or per channel (tensors), as
    quantize_multiplier makes them (q = 0: a multiplier flushed by underflow="zero")."""
    for name, value, lo, hi, rule in (("q", q, 0, Q_MAX - 1, "0 <= q < 2**31"),
                                      ("shift", shift, SHIFT_MIN, SHIFT_MAX, "1 <= shift <= 62")):
        extent = _extent(name, value)
        if extent is not None and not (lo <= extent[0] and extent[1] <= hi):
            got = extent[0] if extent[0] < lo else extent[1]
            raise ValueError(f"requantization needs {rule}, got {name}={got}")


def _extent(name: str, value: torch.Tensor | int) -> tuple[int, int] | None:
    """(min, max) of an integer scalar or tensor. None for an empty tensor, and for any
    tensor under torch.compile (reading its data cannot be traced)."""
    if not isinstance(value, torch.Tensor):
        try:
            v = operator.index(value)  # ints; not floats, which would truncate
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {value!r}") from None
        return v, v
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    _checks.has_data("requantize", name, value)
    if value.numel() == 0 or not _checks.reads_data(value):
        return None
    lo, hi = torch.aminmax(value.to(torch.int64))  # one reduction, one read back
    return int(lo), int(hi)


def _check_accumulator(acc: torch.Tensor) -> None:
    info = torch.iinfo(acc.dtype)
    if -ACC_EXACT_LIMIT <= info.min and info.max <= ACC_EXACT_LIMIT:
        return  # the dtype proves it (int32 and narrower): no reduction
    extent = _extent("acc", acc)
    if extent is not None and max(-extent[0], extent[1]) > ACC_EXACT_LIMIT:
        raise ValueError(
            f"requantize: |acc| reaches {max(-extent[0], extent[1])} > 3 * 2**30, where "
            "acc * q can overflow int64 (the contract needs |acc| <= 2**31: split K, or "
            "lower the bias)"
        )


def _bound(name: str, value: torch.Tensor | int) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    extent = _extent(name, value)
    return None if extent is None else extent[0]


def _check_zero_point(zero_point) -> None:
    """An integer: a float one would round the output a second time. Its value is free:
    [qmin, qmax] are clamp bounds (a fused activation clamp can exclude the zero point)."""
    if isinstance(zero_point, torch.Tensor):
        _checks.integer("requantize", "zero_point", zero_point, data=False)
    else:
        _checks.int_arg("requantize", "zero_point", zero_point)


def requantize(
    acc: torch.Tensor,
    q: torch.Tensor | int,
    shift: torch.Tensor | int,
    zero_point: torch.Tensor | int = 0,
    qmin: torch.Tensor | int = -128,
    qmax: torch.Tensor | int = 127,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """clamp(round_half_away(acc * q / 2**shift) + zero_point, qmin, qmax), in int64 only.

    acc: integer tensor (int32 accumulators; int64 accepted while |acc| <= 3 * 2**30).
    q, shift, zero_point: Python ints (per-tensor) or integer tensors broadcasting against
    acc (per-channel: shape [N] for acc [..., N]). qmin, qmax: ints or 0-d integer tensors.
    out_dtype: None gives the narrowest of int8/int16/int32/int64 holding [qmin, qmax]
    (int8 for the default bounds); an explicit dtype that cannot hold them is refused.
    What breaks the contract raises ValueError or TypeError naming the argument (the
    module docstring says which checks run under torch.compile).
    """
    fn = "requantize"
    _checks.integer(fn, "acc", acc, data=False)
    lo, hi = _bound("qmin", qmin), _bound("qmax", qmax)  # None: a tensor under torch.compile
    if lo is not None and hi is not None:
        out_dtype = output_dtype(lo, hi) if out_dtype is None else out_dtype
        check_output_range(lo, hi, out_dtype)
    elif out_dtype is None:
        raise TypeError("requantize traced by torch.compile with tensor qmin/qmax needs an "
                        "explicit out_dtype")
    check_multiplier(q, shift)
    for name, value in (("q", q), ("shift", shift), ("zero_point", zero_point)):
        if isinstance(value, torch.Tensor):
            _checks.broadcasts_to(fn, name, value, acc.shape, "acc")
    _check_zero_point(zero_point)
    _check_accumulator(acc)
    if isinstance(q, torch.Tensor):
        q = q.to(device=acc.device, dtype=torch.int64)
    if isinstance(shift, torch.Tensor):
        shift = shift.to(device=acc.device, dtype=torch.int64)
    if isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.to(device=acc.device, dtype=torch.int64)
    p = acc.to(torch.int64) * q
    y = rounding_shift(p, shift) + zero_point
    y = y.clamp(qmin, qmax)
    return y.to(out_dtype)
