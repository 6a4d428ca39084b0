"""int16-activation ops (mixed precision: activation sites quantized to 16 bits where int8
costs too much accuracy), declared once (lowering/registry.py) with their fake and every
implementation:

  quantize_int16    float -> int16 (static per-tensor scale, symmetric, round half to even)
  linear_a16w8      int16 x int8 (or packed int4) -> exact int64 accumulator -> + int64
                    bias, dyadic requant (one rounding, wide) -> int8
  linear_a16w8_dq   the same accumulator dequantized in float64: acc * s_x * s_w[n] + bias,
                    one cast to out_dtype (output enters a float island)

The accumulator, exact in every implementation family: an int16 x16 is two int8 bytes,
hi = x16 >> 8 (arithmetic, in [-128, 127]) and lo = (x16 & 255) - 128 (in [-128, 127]),
with x16 = 256 hi + lo + 128, so

    acc = x16 @ W^T = 256 (hi @ W^T) + (lo @ W^T) + 128 colsum(W),  colsum(W)[n] = sum_k W[n, k]

The two products are the int8 GEMM of the implementation family (Backend.gemm of
lowering/ops.py with an empty epilogue: the raw int32 accumulator, so each half obeys the
int32 contract, K <= 131071), run as ONE GEMM on the stacked rows [hi; lo] (one launch,
one read of W). The combine, the requantization (dyadic.rounding_shift_wide: |acc + bias|
< 2**62, q < 2**31, shift 1..62) and the float64 dequantization are torch int64 / float64
code shared by every family (`a16_accumulator`, `requantize_a16`, `dequantize_a16`), so
all implementations agree bit for bit.

colsum(W) is not an argument: `weight_colsum(w)` computes it from the weight the call
gets (int4 unpacked first) once per weight tensor and caches it beside the weight
(lowering/cpu.py `beside`: keyed by identity and version, dies with the weight).

Compile time: reference.check_a16_accumulator_range(K, w, bias=bias) proves the ranges
(each half's int32 bound and |acc + bias| < 2**62) and reference.check_requant_params(q,
shift) the per-channel multipliers; per call only shapes, dtypes and per-tensor scalars are
checked (reading per-channel vectors would sync a GPU), except in the reference, which
checks everything its arithmetic assumes.

Implementations: "reference", "cpu", every "cpu-<route>" and "triton" (lowering/ops.py
`gemm_op`; the CPU ones unpack int4 weights once, at `prepare`); quantize_int16 has
reference, cpu (Inductor-fused when large) and triton (kernels/quantize.py). The ops and
their graph targets are also reachable as lowering.ops attributes (ops.LINEAR_A16W8, ...).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from qcompile.lowering import ops as _ops
from qcompile.lowering.device import triton_runs_on
from qcompile.lowering.epilogue import Epilogue
from qcompile.lowering.ops import _FUSE_MIN_ELEMENTS, _elementwise, _int8_weight, _rows, gemm_op
from qcompile.lowering.registry import on_cpu, quantized_op
from qcompile.numerics.dyadic import (
    check_multiplier,
    rounding_shift_wide,
    rounding_shift_wide_unchecked,
)

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
_ACT_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _int(fn: str, name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{fn}: {name} must lie in [{lo}, {hi}], got {v}")
    return int(v)


def _bounds(fn: str, qmin, qmax, lo: int, hi: int) -> None:
    _int(fn, "qmin", qmin, lo, hi)
    _int(fn, "qmax", qmax, lo, hi)
    if qmin > qmax:
        raise ValueError(f"{fn}: need qmin <= qmax, got {qmin}, {qmax}")


# ---------------------------------------------------------------- float -> int16


def _check_quantize(x, scale, qmin, qmax) -> None:
    fn = "quantize_int16"
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: x must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: scale must be a finite number > 0, got {scale!r}")
    _bounds(fn, qmin, qmax, INT16_MIN, INT16_MAX)


def _quantize_int16_body(x, scale, qmin, qmax):
    # ops.quantize's arithmetic (float32 true division by the float32 scale, round half
    # to even), zero point 0, int16 storage
    return torch.round(x.float() / scale.float()).clamp(qmin, qmax).to(torch.int16)


def _scale32(scale: float) -> Tensor:
    return torch.tensor(float(scale), dtype=torch.float32)


@quantized_op
def quantize_int16(x: Tensor, scale: float, qmin: int, qmax: int) -> Tensor:
    """int16 = clamp(round_half_even(x / scale), qmin, qmax) in float32 (x cast to float32,
    divided by the float32 scale), zero point 0: quantize's arithmetic at 16 bits."""


@quantize_int16.fake
def _(x, scale, qmin, qmax):
    _check_quantize(x, scale, qmin, qmax)
    return torch.empty_like(x, dtype=torch.int16)


@quantize_int16.impl("reference")
def _(x, scale, qmin, qmax):
    _check_quantize(x, scale, qmin, qmax)
    return _quantize_int16_body(x, _scale32(scale), qmin, qmax)


@quantize_int16.impl("cpu", runs_on=on_cpu)
def _(x, scale, qmin, qmax):
    _check_quantize(x, scale, qmin, qmax)
    return _elementwise(_quantize_int16_body, x.numel() >= _FUSE_MIN_ELEMENTS, x,
                        _scale32(scale), qmin, qmax)


@quantize_int16.impl("triton", runs_on=triton_runs_on)
def _(x, scale, qmin, qmax):
    from qcompile.lowering.kernels.quantize import quantize_int16_triton

    _check_quantize(x, scale, qmin, qmax)
    if x.dtype not in _ACT_FLOATS:  # float64: the reference's x.float(), then the kernel
        x = x.float()
    return quantize_int16_triton(x.contiguous(), scale, qmin, qmax)


# ---------------------------------------------------------------- the exact accumulator


def _colsum(w: Tensor) -> Tensor:
    return _int8_weight(w).to(torch.int64).sum(dim=1)  # [N]


def weight_colsum(w: Tensor) -> Tensor:
    """colsum(W)[n] = sum_k W[n, k], int64 [N] on w's device, for a weight given as int8
    [N, K] or packed int4 uint8 [N, K // 2]: computed once per weight tensor (again if it
    changes in place) and kept beside it."""
    from qcompile.lowering.cpu import beside

    return beside(w, "a16 colsum", _colsum)


def _check_linear(fn: str, x, w, bias, *, float_bias: bool) -> None:
    """Shapes and dtypes (no data is read: the fakes run it too)."""
    if not isinstance(x, Tensor) or x.dtype != torch.int16 or x.dim() < 1:
        raise TypeError(f"{fn}: x must be an int16 tensor [..., K], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(w, Tensor) or w.dtype not in (torch.int8, torch.uint8) or w.dim() != 2:
        raise TypeError(f"{fn}: w must be int8 [N, K] or packed int4 uint8 [N, K // 2], got "
                        f"{getattr(w, 'dtype', type(w).__name__)} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    k = w.shape[1] * (2 if w.dtype == torch.uint8 else 1)
    if x.shape[-1] != k:
        raise ValueError(f"{fn}: x has K = {x.shape[-1]} but w {tuple(w.shape)} "
                         f"({w.dtype}) has K = {k}")
    if bias is None:
        return
    n = w.shape[0]
    if float_bias:
        if not bias.dtype.is_floating_point:
            raise TypeError(f"{fn}: bias must be a float tensor [N], got {bias.dtype}")
    elif bias.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: bias must be an int64 (or int32) tensor [N] in the "
                        f"accumulator's scale, got {bias.dtype}")
    if bias.numel() != n:
        raise ValueError(f"{fn}: bias must have N = {n} elements, got {tuple(bias.shape)}")


def _stacked_bytes(rows: Tensor) -> Tensor:
    """int16 [M, K] -> int8 [2M, K]: the hi bytes' rows, then the lo bytes' rows."""
    hi = torch.bitwise_right_shift(rows, 8)  # floor(x / 256), in [-128, 127]
    lo = torch.bitwise_and(rows, 255) - 128  # in [-128, 127]
    return torch.cat([hi, lo]).to(torch.int8)


def _halves(backend, x: Tensor, w: Tensor, origin: str = "") -> tuple[Tensor, Tensor]:
    """(hi @ W^T, lo @ W^T) [M, N]: the backend's int8 GEMM on the stacked bytes [hi; lo]
    (its raw accumulator: int32, or float32 holding the exact integers)."""
    rows = _rows(x)  # [M, K]
    m = rows.shape[0]
    acc = backend.gemm(_stacked_bytes(rows), _int8_weight(w), Epilogue(), origin)  # [2M, N]
    return acc[:m], acc[m:]


def _combine(hi: Tensor, lo: Tensor, colsum: Tensor) -> Tensor:
    """256 acc_hi + acc_lo + 128 colsum(W), int64 (|acc| <= 2**22 K < 2**39)."""
    return hi.to(torch.int64) * 256 + lo.to(torch.int64) + 128 * colsum


def a16_accumulator(backend, x: Tensor, w: Tensor, origin: str = "") -> Tensor:
    """acc = x @ W^T exactly, int64 [M, N] for int16 x [..., K] (rows flattened)."""
    hi, lo = _halves(backend, x, w, origin)
    return _combine(hi, lo, weight_colsum(w).to(hi.device))


def _epilogue(backend, body, x: Tensor, *args):
    """Run an epilogue body on the halves: fused by Inductor on the CPU path when large
    (one loop over [M, N] instead of ~8 passes over int64 temporaries; the body is the
    same arithmetic, integers and float64 alike: Inductor compiles C++ with
    -ffp-contract=off, and the tests compare it with the eager reference on large shapes),
    eagerly elsewhere."""
    hi = args[0]
    if backend.name.startswith("cpu"):
        return _elementwise(body, hi.numel() >= _FUSE_MIN_ELEMENTS, *args)
    return body(*args)


# ---------------------------------------------------------------- int16 x int8 -> int8


def _multiplier(q: Tensor, shift: Tensor, n: int, device) -> tuple:
    """Per tensor (numel 1): checked Python ints; per channel: int64 [N] on device."""
    for name, v in (("q", q), ("shift", shift)):
        if not isinstance(v, Tensor) or v.dtype.is_floating_point or v.dtype == torch.bool:
            raise TypeError(f"linear_a16w8: {name} must be an integer tensor, got "
                            f"{getattr(v, 'dtype', type(v).__name__)}")
        if v.numel() not in (1, n):
            raise ValueError(f"linear_a16w8: {name} must have 1 or N = {n} elements, got "
                             f"{tuple(v.shape)}")
    if q.numel() == 1 and shift.numel() == 1:
        qv, sv = int(q), int(shift)
        check_multiplier(qv, sv)
        return qv, sv
    return (q.reshape(-1).to(device=device, dtype=torch.int64),
            shift.reshape(-1).to(device=device, dtype=torch.int64))


def _requant_body(hi, lo, colsum, bias, q, shift, out_zp, qmin, qmax):
    # one rounding of (acc + bias) * q / 2**shift (dyadic.rounding_shift_wide), int64
    acc = _combine(hi, lo, colsum)
    if bias is not None:
        acc = acc + bias
    y = rounding_shift_wide_unchecked(acc, q, shift) + out_zp  # |rounded| <= 2**62
    return y.clamp(qmin, qmax).to(torch.int8)


def _linear_a16w8(backend, x, w, bias, q, shift, out_zp, qmin, qmax, origin=""):
    fn = "linear_a16w8"
    _check_linear(fn, x, w, bias, float_bias=False)
    _bounds(fn, qmin, qmax, -128, 127)
    _int(fn, "out_zp", out_zp, -(1 << 31), (1 << 31) - 1)
    hi, lo = _halves(backend, x, w, origin)
    n, dev = w.shape[0], hi.device
    qv, sv = _multiplier(q, shift, n, dev)
    if backend.name == "reference":  # every data check its arithmetic assumes
        acc = _combine(hi, lo, weight_colsum(w).to(dev))
        if bias is not None:
            acc = acc + bias.reshape(-1).to(device=dev, dtype=torch.int64)
        rounding_shift_wide(acc, qv, sv)
    b = bias.reshape(-1).to(device=dev, dtype=torch.int64) if bias is not None else None
    y = _epilogue(backend, _requant_body, x, hi, lo, weight_colsum(w).to(dev), b,
                  torch.as_tensor(qv, dtype=torch.int64, device=dev),
                  torch.as_tensor(sv, dtype=torch.int64, device=dev), out_zp, qmin, qmax)
    return y.reshape(*x.shape[:-1], n)


def _int32_epilogue(args: dict) -> Epilogue:
    """The generated GEMM both halves run: the int32 accumulator, no epilogue step."""
    return Epilogue()


@gemm_op(_linear_a16w8, epilogue=_int32_epilogue)
@quantized_op
def linear_a16w8(x: Tensor, w: Tensor, bias: Tensor | None, q: Tensor, shift: Tensor,
                 out_zp: int, qmin: int, qmax: int) -> Tensor:
    """y int8 [..., N] = clamp(round_half_away((x @ w^T + bias) * q / 2**shift) + out_zp,
    qmin, qmax) for int16 x [..., K] (symmetric, zero point 0) and int8 w [N, K] (or int4
    packed uint8 [N, K // 2]); bias int64 [N] in the scale s_x * s_w[n]; q / shift per
    channel [N] or per tensor (1 element). The accumulator is exact (int64), one rounding."""


@linear_a16w8.fake
def _(x, w, bias, q, shift, out_zp, qmin, qmax):
    _check_linear("linear_a16w8", x, w, bias, float_bias=False)
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int8)


# ---------------------------------------------------------------- int16 x int8 -> float


def _check_dequant(x_scale, w_scale, n: int, out_dtype) -> None:
    fn = "linear_a16w8_dq"
    if isinstance(x_scale, bool) or not isinstance(x_scale, numbers.Real) or not math.isfinite(
            x_scale):
        raise ValueError(f"{fn}: x_scale must be a finite number, got {x_scale!r}")
    if not isinstance(w_scale, Tensor) or not w_scale.dtype.is_floating_point:
        raise TypeError(f"{fn}: w_scale must be a float tensor [N], got "
                        f"{getattr(w_scale, 'dtype', type(w_scale).__name__)}")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"{fn}: w_scale must have 1 or N = {n} elements, got "
                         f"{tuple(w_scale.shape)}")
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"{fn}: out_dtype must be a float dtype, got {out_dtype!r}")


def _dequant_body(hi, lo, colsum, bias, x_scale, w_scale, out_dtype):
    # ((float64(acc) * x_scale) * w_scale[n]) + bias[n], each op rounded once in float64
    # (acc is exact there: |acc| < 2**53), then one cast to out_dtype
    y = _combine(hi, lo, colsum).to(torch.float64) * x_scale
    y = y * w_scale
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def _linear_a16w8_dq(backend, x, w, bias, x_scale, w_scale, out_dtype, origin=""):
    _check_linear("linear_a16w8_dq", x, w, bias, float_bias=True)
    _check_dequant(x_scale, w_scale, w.shape[0], out_dtype)
    hi, lo = _halves(backend, x, w, origin)
    dev = hi.device
    b = bias.reshape(-1).to(device=dev, dtype=torch.float64) if bias is not None else None
    y = _epilogue(backend, _dequant_body, x, hi, lo, weight_colsum(w).to(dev), b,
                  torch.tensor(float(x_scale), dtype=torch.float64, device=dev),
                  w_scale.reshape(-1).to(device=dev, dtype=torch.float64), out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


@gemm_op(_linear_a16w8_dq, epilogue=_int32_epilogue)
@quantized_op
def linear_a16w8_dq(x: Tensor, w: Tensor, bias: Tensor | None, x_scale: float,
                    w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """y [..., N] = x @ w^T * x_scale * w_scale[n] (+ bias[n]) for int16 x [..., K]
    (symmetric) and int8 w [N, K] (or packed int4): the exact int64 accumulator scaled in
    float64, one cast to out_dtype. For an int16 linear whose output enters a float island."""


@linear_a16w8_dq.fake
def _(x, w, bias, x_scale, w_scale, out_dtype):
    _check_linear("linear_a16w8_dq", x, w, bias, float_bias=True)
    _check_dequant(x_scale, w_scale, w.shape[0], out_dtype)
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


# Graph targets: the OpOverloads.
QUANTIZE_INT16 = quantize_int16.overload
LINEAR_A16W8 = linear_a16w8.overload
LINEAR_A16W8_DQ = linear_a16w8_dq.overload
# a requantizing op like linear_int8: compute-dyadic fills its q and shift, integer-dataflow
# gives it a float epilogue where its output only feeds float islands
_ops.REQUANT_OPS = (*_ops.REQUANT_OPS, LINEAR_A16W8)
