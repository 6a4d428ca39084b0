"""Pure-torch integer reference for the int8 GEMM and its epilogues, and the range checks.

What: `gemm_int8_ref(a, w, epilogue, **values)` computes acc = A @ W^T exactly,
then applies the epilogue steps in int64, requantizing through
qcompile.numerics.dyadic.requantize (the one implementation of the contract). Float
epilogues use the op order every kernel must follow:
((float32(acc) * row_scale[m]) * col_scale[c]) + float_bias[c], then one cast.

Why: every kernel (generated Triton, CPU) is tested against this bit for bit; the CPU
path reuses `apply_epilogue_ref` itself so the arithmetic exists once.

Range: int8 x int8 products are at most 128 * 128 = 2**14 in magnitude, so an int32 sum
of K of them is exact for K <= 131071 (2**14 * 131071 < 2**31). `check_accumulator_range`
is the compile-time proof; a tighter, weight-aware bound also covers bias and zero-point
terms so that |acc + bias - zp_term| <= 2**31, as the dyadic contract requires.
"""

from __future__ import annotations

from typing import Any

import torch

from qcompile.lowering.epilogue import (
    Bias,
    Dequantize,
    Epilogue,
    InputZeroPoint,
    Requantize,
    RowZeroPoint,
    bind_operands,
)
from qcompile.numerics.dyadic import requantize

MAX_SAFE_K = 131071  # 2**14 * K < 2**31
ACC_LIMIT = 2**31  # |acc| bound of the dyadic contract


class AccumulatorRangeError(ValueError):
    """int32 accumulation (or the requantization input) could overflow for this GEMM."""


def check_k(k: int) -> None:
    """Reject a reduction length whose int32 accumulation could overflow."""
    if k > MAX_SAFE_K:
        raise AccumulatorRangeError(
            f"K = {k} > {MAX_SAFE_K}: an int8 x int8 dot product over K could overflow int32 "
            "(128 * 128 * K >= 2**31); split K into chunks of at most 131071 and add the "
            "partial products in int64"
        )


def accumulator_bound(
    w: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    zp_term: torch.Tensor | None = None,
    a_absmax: int = 128,
) -> int:
    """Largest possible |acc + bias - zp_term| over all int8 inputs, per the actual weights.

    Per channel c: a_absmax * sum_k |W[c, k]| + |bias[c]| + |zp_term[c]| (triangle bound).
    """
    bound = a_absmax * w.to(torch.int64).abs().sum(dim=1)  # [N]
    if bias is not None:
        bound = bound + bias.to(torch.int64).abs().reshape(-1)
    if zp_term is not None:
        bound = bound + zp_term.to(torch.int64).abs().reshape(-1)
    return int(bound.max()) if bound.numel() else 0


def check_accumulator_range(
    k: int,
    w: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    zp_term: torch.Tensor | None = None,
) -> None:
    """Compile-time proof that accumulation and requantization cannot overflow.

    Without weights only K is checked; with them the bound covers bias and zero-point terms.
    """
    check_k(k)
    if w is None:
        return
    bound = accumulator_bound(w, bias=bias, zp_term=zp_term)
    if bound > ACC_LIMIT:
        raise AccumulatorRangeError(
            f"|acc + bias - zp_term| can reach {bound} > 2**31 for these weights; the dyadic "
            "requantization needs |acc| <= 2**31 (lower the bias/zero point or split K)"
        )


# int16 x int8 GEMMs (lowering/a16_ops.py): |x16| <= 2**15, and the combined accumulator
# plus bias is requantized by dyadic.rounding_shift_wide, exact while below 2**62
A16_ABSMAX = 1 << 15
A16_ACC_LIMIT = 1 << 62


def _weight_values(w: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] values of a weight given as int8, or as int4 packed uint8 [N, K // 2]."""
    if w.dtype == torch.uint8:
        from qcompile.numerics.specs import unpack_int4

        return unpack_int4(w)
    if w.dtype != torch.int8 or w.dim() != 2:
        raise TypeError(f"need an int8 weight [N, K] (or packed int4 uint8 [N, K // 2]), got "
                        f"{w.dtype} {tuple(w.shape)}")
    return w


def a16_accumulator_bound(w: torch.Tensor, *, bias: torch.Tensor | None = None) -> int:
    """Largest possible |x16 @ W^T + bias| over all int16 inputs, per the actual weights:
    per channel c, 2**15 * sum_k |W[c, k]| + |bias[c]|. w: int8 [N, K] or packed int4."""
    per_channel = (A16_ABSMAX * _weight_values(w).to(torch.int64).abs().sum(dim=1)).tolist()
    if bias is not None:  # in Python integers: |int64 bias| + the rest can pass 2**63
        per_channel = [b + abs(c) for b, c in zip(per_channel, _ints(bias), strict=True)]
    return max(per_channel, default=0)


def _ints(t: torch.Tensor) -> list[int]:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"need an integer bias, got {t.dtype}")
    return t.reshape(-1).tolist()


def check_a16_accumulator_range(
    k: int, w: torch.Tensor | None = None, *, bias: torch.Tensor | None = None
) -> None:
    """Compile-time proof for linear_a16w8 / linear_a16w8_dq (lowering/a16_ops.py).

    Each op runs two int8 GEMMs on the bytes of x16 (hi = x16 >> 8 and lo = (x16 & 255)
    - 128, both in [-128, 127]), so each obeys the int32 contract: K <= 131071 (check_k).
    The combined acc = 256 acc_hi + acc_lo + 128 colsum(W) is int64, and with the bias it
    must stay below 2**62 for the wide dyadic rounding: 2**15 * sum_k |W[c, k]| + |bias[c]|
    < 2**62 per channel (with weights), or 2**22 * K + max |bias| without them.
    Raises AccumulatorRangeError otherwise.
    """
    check_k(k)
    if w is not None:
        bound = a16_accumulator_bound(w, bias=bias)
    else:
        top = max((abs(c) for c in _ints(bias)), default=0) if bias is not None else 0
        bound = A16_ABSMAX * 128 * k + top
    if bound >= A16_ACC_LIMIT:
        raise AccumulatorRangeError(
            f"|x16 @ w^T + bias| can reach {bound} >= 2**62: the wide dyadic requantization "
            "of an int16 x int8 accumulator needs |acc + bias| < 2**62 (lower the bias)"
        )


def check_requant_params(q: torch.Tensor | int, shift: torch.Tensor | int) -> None:
    """q in [0, 2**31) and shift in 1..62 (per tensor or per channel), as made by
    dyadic.quantize_multiplier; call once at compile time."""
    q_t = torch.as_tensor(q, dtype=torch.int64)
    s_t = torch.as_tensor(shift, dtype=torch.int64)
    if q_t.numel() and (int(q_t.min()) < 0 or int(q_t.max()) >= 2**31):
        raise ValueError("requantization multiplier q must lie in [0, 2**31)")
    if s_t.numel() and (int(s_t.min()) < 1 or int(s_t.max()) > 62):
        raise ValueError("requantization shift must lie in 1..62")


def input_zero_point_term(w: torch.Tensor, zp_x: int) -> torch.Tensor:
    """zp_x * colsum(W)[c] as int32 [N]: what an input zero point removes from acc."""
    term = int(zp_x) * w.to(torch.int64).sum(dim=1)  # [N]
    if term.numel() and int(term.abs().max()) >= 2**31:
        raise AccumulatorRangeError("zp_x * colsum(W) does not fit in int32")
    return term.to(torch.int32)


def apply_epilogue_ref(acc: torch.Tensor, epilogue: Epilogue, **values: Any) -> torch.Tensor:
    """Apply the steps to an exact accumulator acc [M, N] (int32 or int64); values bound
    with epilogue.bind_operands (already-bound values pass through unchanged)."""
    m, n = acc.shape
    v = bind_operands(epilogue, m, n, acc.device, values)
    return apply_bound_epilogue(acc, epilogue, v)


def apply_bound_epilogue(acc: torch.Tensor, epilogue: Epilogue, v: dict[str, Any]) -> torch.Tensor:
    """The arithmetic of the steps, on already-bound values (see bind_operands).

    Per-tensor q, shift, zero point and bounds may be Python ints or 0-d int64 tensors (the
    CPU path passes tensors: compiled code must not see them as symbolic ints).
    """
    x = acc.to(torch.int64)  # [M, N]; exact: |acc + bias - zp_term| <= 2**31
    for step in epilogue.steps:
        if isinstance(step, InputZeroPoint):
            x = x - v["zp_term"].to(torch.int64)
        elif isinstance(step, RowZeroPoint):
            x = x - v["row_zero_point"].to(torch.int64)[:, None] * v["col_sum"].to(torch.int64)
        elif isinstance(step, Bias):
            x = x + v["bias"].to(torch.int64)
        elif isinstance(step, Requantize):
            return requantize(
                x, v["q"], v["shift"], v["out_zero_point"], v["qmin"], v["qmax"],
                out_dtype=torch.int8,
            )
        elif isinstance(step, Dequantize):
            # The op order every kernel follows; each product rounds to float32 once.
            y = x.to(torch.float32) * v["row_scale"][:, None]
            y = y * v["col_scale"][None, :]
            if step.has_bias:
                y = y + v["float_bias"][None, :]
            return y.to(epilogue.out_dtype)
    return x.to(torch.int32)


def gemm_int8_ref(
    a: torch.Tensor, w: torch.Tensor, epilogue: Epilogue | None = None, **values: Any
) -> torch.Tensor:
    """Reference int8 GEMM: epilogue(A[M, K] @ W[N, K]^T), accumulation exact.

    The dot products run as a float64 matmul on a's device (BLAS / cuBLAS speed): every
    product and every partial sum is an integer below 2**31 <= 2**53 in magnitude, so
    float64 represents each exactly whatever the summation order, and the result
    converts to int64 without error. tests/lowering/test_epilogue.py checks it against
    Python integers.
    """
    epilogue = epilogue if epilogue is not None else Epilogue()
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"gemm_int8_ref takes int8 A and W, got {a.dtype}, {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"need A [M, K], W [N, K]; got {tuple(a.shape)}, {tuple(w.shape)}")
    check_k(a.shape[1])
    acc = (a.to(torch.float64) @ w.to(torch.float64).T).to(torch.int64)  # [M, N], exact
    return apply_epilogue_ref(acc, epilogue, **values)


def random_operands(
    epilogue: Epilogue, m: int, n: int, k: int, *, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A random problem for `epilogue`: A [M, K], W [N, K] int8 and plausible values.

    Requantization multipliers come from dyadic.quantize_multiplier for scales that keep
    outputs mostly inside int8 (so tests see rounding, not only saturation).
    """
    from qcompile.numerics.dyadic import quantize_multiplier

    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    values: dict[str, Any] = {}
    spread = 40.0 * max(1, k) ** 0.5 * 70.0  # ~ std of acc for uniform int8 inputs
    for name in epilogue.operand_names():
        if name == "bias":
            values[name] = torch.randint(-2**16, 2**16, (n,), dtype=torch.int32, generator=g)
        elif name == "zp_term":
            values[name] = input_zero_point_term(w, int(torch.randint(-20, 20, (1,), generator=g)))
        elif name == "q":
            mult = (0.5 + torch.rand(n if epilogue.requantize.per_channel else 1, generator=g))
            q, s = quantize_multiplier((mult * 100.0 / spread).to(torch.float64))
            values["q"], values["shift"] = (q, s) if epilogue.requantize.per_channel else (
                int(q[0]), int(s[0]))
        elif name == "out_zero_point":
            values[name] = int(torch.randint(-10, 10, (1,), generator=g))
        elif name == "row_scale":
            values[name] = torch.rand(m, generator=g) * 0.02 + 1e-3
        elif name == "col_scale":
            values[name] = torch.rand(n, generator=g) * 0.02 + 1e-3
        elif name == "float_bias":
            values[name] = torch.randn(n, generator=g)
    return a.to(device), w.to(device), {
        k_: (v.to(device) if isinstance(v, torch.Tensor) else v) for k_, v in values.items()
    }
