"""The CPU integer path: an exact int8 GEMM route for this CPU, then the epilogue.

What: `cpu_gemm_int8(a, w, epilogue, route=..., **values)` has exactly the semantics of
the Triton kernel (qcompile.lowering.gemm) and of reference.gemm_int8_ref, bit for bit:
the accumulator comes from one of the exact CPU routes (lowering/cpu_routes.py: oneDNN's
u8 x s8 kernel, torch._int_mm where AVX512-VNNI / AMX make it fast, float32 sgemm on K
chunks), prepared once per weight (cached beside the weight tensor, keyed weakly), then
the epilogue runs:

- integer steps and requantization from an int32 accumulator: reference's
  `apply_bound_epilogue` (the one implementation of the steps, requantization through
  qcompile.numerics.dyadic), fused into one loop by Inductor per epilogue signature;
- requantization from a float32 accumulator that holds the exact integers (oneDNN and
  the float32 route return those): `requantize_f32`, a float32 candidate and the exact
  int64 arithmetic only where the candidate could be off by one. On AVX2 this is what
  makes the quantized layer fast: ATen emulates int64 vector multiplies and shifts lane by
  lane without AVX-512, and the int64 epilogue cost more than the GEMM;
- dequantization from a float32 accumulator: the float steps directly, in the op order
  every implementation follows (float32(acc) is the accumulator itself there).

Why compiled: eagerly, an epilogue is ~10 passes over an [M, N] temporary; torch.compile
(Inductor's C++ backend, one compiled function per signature, dynamic shapes) fuses it
into one loop. Without a working compiler, mode="auto" falls back, with a warning, to the
eager epilogue over row chunks that stay in cache.

Care: runtime scalars (q, shift, zero point, bounds) reach the compiled functions as 0-d
int64 tensors. As symbolic Python ints, Inductor computed 1 << (shift - 1) wrongly for
large shifts (seen with torch 2.13); tests pin the exact results at shift 62.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
import weakref
from typing import Any

import torch

from qcompile.lowering import cpu_routes
from qcompile.lowering.device import inside_compiler
from qcompile.lowering.epilogue import (
    Bias,
    Dequantize,
    Epilogue,
    InputZeroPoint,
    Requantize,
    RowZeroPoint,
    bind_operands,
)
from qcompile.lowering.reference import apply_bound_epilogue, check_k
from qcompile.numerics.dyadic import requantize

MODES = ("auto", "compiled", "eager")
_CHUNK_ELEMENTS = 1 << 16  # eager fallback: rows per chunk so int64 temporaries fit in L2
# "auto" runs epilogues over fewer elements eagerly: a cold Inductor compile costs seconds
# per signature, the eager epilogue on 2**18 int64 elements about a millisecond.
_COMPILE_MIN_ELEMENTS = 1 << 18
_SCALARS = ("q", "shift", "out_zero_point", "qmin", "qmax")

# ---------------------------------------------------------------- prepared weights

# id(weight) -> (weakref to it, {route name or other key: (version, value)}); entries die
# with their weights (a WeakKeyDictionary would compare tensors with ==)
_PREPARED: dict[int, tuple[weakref.ref, dict]] = {}


def _cache_of(w: torch.Tensor) -> dict:
    key = id(w)
    entry = _PREPARED.get(key)
    if entry is None or entry[0]() is not w:
        entry = _PREPARED[key] = (weakref.ref(w, lambda _r, k=key: _PREPARED.pop(k, None)), {})
    return entry[1]


def beside(w: torch.Tensor, key: Any, make) -> Any:
    """`make(w)`, once per weight and key (again if w changed in place), cached beside the
    weight: the entry dies with it. Any device (lowering/a16_ops.py keeps column sums here)."""
    per_key = _cache_of(w)
    entry = per_key.get(key)
    if entry is None or entry[0] != w._version:
        entry = per_key[key] = (w._version, make(w))
    return entry[1]


def prepared(route: cpu_routes.Route, w: torch.Tensor) -> cpu_routes.Prepared:
    """`route.prepare(w)`, once per weight and route (again if w changed in place)."""
    return beside(w, route.name, route.prepare)


def weight_range(w: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an int8 weight, cached beside it like its prepared layouts."""
    return beside(w, "range", lambda w: (int(w.min()), int(w.max())) if w.numel() else (0, 0))


def route_for(m: int, w: torch.Tensor) -> cpu_routes.Route:
    """The fastest exact route on this CPU for [M, K] x w^T with w's actual values."""
    n, k = w.shape
    return cpu_routes.choose_route(cpu_routes.cpu_capabilities(), m, k, n,
                                   weight_range(w)).route


# ---------------------------------------------------------------- int32 epilogues


def _chunked_eager(acc: torch.Tensor, epilogue: Epilogue, v: dict[str, Any]) -> torch.Tensor:
    m, n = acc.shape
    out = torch.empty((m, n), dtype=epilogue.out_dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, n))
    for i in range(0, m, rows):
        part = dict(v)
        for name in ("row_scale", "row_zero_point"):
            if name in v:
                part[name] = v[name][i : i + rows]
        out[i : i + rows] = apply_bound_epilogue(acc[i : i + rows], epilogue, part)
    return out


@functools.cache
def _compiled_epilogue(epilogue: Epilogue):
    # A distinct function (code object) per signature: Dynamo's recompile limit counts per
    # code object, so one shared function would fall back to eager after 8 signatures.
    name = "epilogue_" + re.sub(r"[^a-zA-Z0-9]+", "_", epilogue.signature())
    src = f"def {name}(acc, v):\n    return apply_bound_epilogue(acc, EPILOGUE, v)\n"
    scope = {"apply_bound_epilogue": apply_bound_epilogue, "EPILOGUE": epilogue}
    exec(compile(src, f"<qcompile cpu epilogue {epilogue.signature()}>", "exec"), scope)
    return torch.compile(scope[name], dynamic=True, fullgraph=True)


_FAILED: set[str] = set()


def _compiled_or_eager(key: str, mode: str, size: int, compiled, eager):
    """Run `compiled()` when the mode and size call for it (and it has not failed before
    for this key), else `eager()`; in "auto", a failed compile warns and runs eagerly."""
    if inside_compiler():
        # Inside an outer torch.compile (tracing, or a backend such as qcompile's running
        # a probe): a nested compile would re-enter Dynamo, so run the plain ops.
        return eager()
    small = size < _COMPILE_MIN_ELEMENTS  # compiling would cost more than it saves
    if mode == "eager" or (mode == "auto" and (key in _FAILED or small)):
        return eager()
    try:
        return compiled()
    except Exception as e:
        if mode == "compiled":
            raise
        _FAILED.add(key)
        warnings.warn(f"qcompile cpu: compiling the {key} epilogue failed ({type(e).__name__}: "
                      f"{e}); running it eagerly (correct, but several times slower)",
                      stacklevel=3)
        return eager()


def _tensor_scalars(v: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.tensor(x, dtype=torch.int64) if k in _SCALARS and isinstance(x, int) else x
            for k, x in v.items()}


def run_epilogue(
    acc: torch.Tensor, epilogue: Epilogue, v: dict[str, Any], mode: str = "auto"
) -> torch.Tensor:
    """Apply the epilogue to acc [M, N] (int32, or float32 holding the exact integers)
    with already-bound values (bind_operands). A float32 acc is consumed: a dequantizing
    epilogue writes its result into it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if acc.is_floating_point():
        fast = _float_epilogue(acc, epilogue, v, mode)
        if fast is not None:
            return fast
        acc = acc.to(torch.int32)  # exact: the route held |acc| <= 2**24 in float32
    if not epilogue.steps:
        return acc
    return _compiled_or_eager(
        epilogue.signature(), mode, acc.numel(),
        lambda: _compiled_epilogue(epilogue)(acc, _tensor_scalars(v)),
        lambda: _chunked_eager(acc, epilogue, v))


# ---------------------------------------------------------------- float32 accumulators

F32_EXACT = cpu_routes.F32_EXACT
# requantize_f32 recomputes blocks of this many elements where the candidate is doubtful
FIX_BLOCK = 64


def _float_epilogue(acc: torch.Tensor, epilogue: Epilogue, v: dict[str, Any], mode: str):
    """The epilogue on an exact float32 accumulator, where a float path is exact (the
    dequantization overwrites acc); None where the integer path must run."""
    kinds = [type(s) for s in epilogue.steps]
    one_subtraction = not (InputZeroPoint in kinds and RowZeroPoint in kinds)
    if kinds and kinds[-1] is Dequantize and Bias not in kinds and one_subtraction:
        zp = rows = None
        if InputZeroPoint in kinds:
            zp = v["zp_term"]
            if zp.numel() and int(zp.abs().max()) > F32_EXACT:
                return None
            zp = zp.to(torch.float32)
        if RowZeroPoint in kinds:
            # row_zero_point[m] * col_sum[c] is an exact float32 integer within 2**24
            rzp, cs = v["row_zero_point"], v["col_sum"]
            if rzp.numel() and cs.numel() and \
                    int(rzp.abs().max()) * int(cs.abs().max()) > F32_EXACT:
                return None
            rows = (rzp.to(torch.float32), cs.to(torch.float32))
        return _dequantize_f32(acc, zp, epilogue, v, mode, rows)
    if kinds and kinds[-1] is Requantize:
        offset = _integer_offset(epilogue, v, acc.shape[1])
        if offset is not None:
            return requantize_f32(acc, offset, v, mode)
    return None


def dequant_body(acc, zp_term, row_scale, col_scale, float_bias, row_zp=None, col_sum=None):
    # the reference's op order: ((float32(acc - zp_term) * row_scale[m]) * col_scale[c])
    # + bias[c]. acc and zp_term are exact float32 integers, and IEEE subtraction rounds
    # the exact difference to nearest even, as the reference's int64 -> float32 does.
    # row_zp, col_sum (float32, exact; their products within 2**24): acc - row_zp[m] *
    # col_sum[c] instead, the one other subtraction an epilogue has (RowZeroPoint).
    # In place: the route's accumulator is a fresh temporary, and writing the result into
    # it spares allocating (and page-faulting) another [M, N] float32 tensor per call
    if zp_term is not None:
        acc.sub_(zp_term[None, :])
    if row_zp is not None:
        acc.sub_(row_zp[:, None] * col_sum[None, :])
    acc.mul_(row_scale[:, None])
    acc.mul_(col_scale[None, :])
    if float_bias is not None:
        acc.add_(float_bias[None, :])
    return acc


@functools.cache
def _compiled_dequant():
    return torch.compile(dequant_body, dynamic=True, fullgraph=True)


def _dequantize_f32(acc, zp_term, epilogue, v, mode, rows=None):
    step = epilogue.dequantize
    bias = v.get("float_bias") if step.has_bias else None
    args = (acc, zp_term, v["row_scale"], v["col_scale"], bias, *(rows or (None, None)))
    y = _compiled_or_eager("f32 " + epilogue.signature(), mode, acc.numel(),
                           lambda: _compiled_dequant()(*args), lambda: dequant_body(*args))
    return y.to(epilogue.out_dtype)


def _integer_offset(epilogue: Epilogue, v: dict[str, Any], n: int) -> torch.Tensor | None:
    """bias - zp_term as one exact float32 [N] vector, or None when it is not within
    2**24 (then the float candidate's error bound does not hold)."""
    off = torch.zeros(n, dtype=torch.int64)
    if epilogue.step(Bias) is not None:
        off = off + v["bias"].to(torch.int64)
    if epilogue.step(InputZeroPoint) is not None:
        off = off - v["zp_term"].to(torch.int64)
    if n and int(off.abs().max()) > F32_EXACT:
        return None
    return off.to(torch.float32)


def _requant_candidate(block: int):
    def body(acc, offset, mult, zp, qmin, qmax):
        t = (acc + offset) * mult  # [M, N] float32: three roundings, |t - exact| < |t| 2**-22.3
        r = torch.round(t)
        # doubtful: within |t| 2**-21 of a half-integer, where t and the exact value could
        # round apart (and where the exact value could be a tie); |t| >= 512 saturates
        doubtful = ((t - r).abs() > 0.5 - t.abs() * 2.0**-21) & (t.abs() < 512)
        m, n = t.shape
        blocks = torch.where(doubtful, 1.0, 0.0).view(m, n // block, block).amax(dim=2)
        return (r + zp).clamp(qmin, qmax).to(torch.int8), blocks

    body.__name__ = f"requant_candidate_{block}"
    return body


def _requant_kernel(mode: str):
    """The C++ requantization (lowering/kernels/requant_cpu.py) unless mode is "eager";
    None where it does not build ("auto": the eager path runs, the build failure warned
    once), raising the build error in "compiled"."""
    if mode == "eager":
        return None
    from qcompile.lowering.kernels import requant_cpu

    if requant_cpu.kernel_builds():
        return requant_cpu.requantize_f32_cpu
    if mode == "compiled":
        requant_cpu._kernel()  # raises what the build raised
    return None


def requantize_f32(acc: torch.Tensor, offset: torch.Tensor, v: dict[str, Any],
                   mode: str = "auto") -> torch.Tensor:
    """clamp(round_half_away((acc + offset) * q / 2**shift) + zp) for a float32 acc
    [M, N] holding exact integers (|acc| <= 2**24) and an exact float32 offset
    (bias - zp_term, |offset| <= 2**24): bit for bit dyadic.requantize.

    A float32 candidate t = fl(fl(acc + offset) * fl(q 2**-shift)) has three roundings,
    so |t - exact| < |t| 2**-22.3. Where t is farther than |t| 2**-21 from a
    half-integer, t and the exact value round alike and the exact value is no tie, so
    torch.round (half to even) gives round_half_away; where |t| >= 512 the output
    saturates either way. The remaining elements (about one in a thousand on real data)
    are recomputed with the exact int64 arithmetic: by the C++ kernel as it meets them
    (lowering/kernels/requant_cpu.py), or in "eager" mode (and where no compiler builds
    the kernel) in blocks of 64 after a candidate pass over the whole accumulator.
    """
    m, n = acc.shape
    q, shift = v["q"], v["shift"]
    if isinstance(q, torch.Tensor):
        mult = (q.to(torch.float64) * torch.pow(2.0, -shift.to(torch.float64))).float()
    else:
        mult = torch.tensor(math.ldexp(q, -shift), dtype=torch.float32)
    kernel = _requant_kernel(mode)
    if kernel is not None:
        def per_column(t, dtype):
            return torch.as_tensor(t, dtype=dtype).expand(n).contiguous()

        return kernel(acc, offset.contiguous(), per_column(mult, torch.float32),
                      per_column(q, torch.int64), per_column(shift, torch.int64),
                      v["out_zero_point"], v["qmin"], v["qmax"])
    block = math.gcd(n, FIX_BLOCK) or 1
    scalars = [torch.tensor(v[k], dtype=torch.float32) for k in ("out_zero_point", "qmin",
                                                                 "qmax")]
    y, blocks = _requant_candidate(block)(acc, offset, mult, *scalars)
    bad = blocks.reshape(-1).nonzero().squeeze(1)
    if bad.numel():
        idx = (bad[:, None] * block + torch.arange(block)).reshape(-1)  # flat [M * N]
        cols = idx % n
        x = acc.reshape(-1)[idx].to(torch.int64) + offset[cols].to(torch.int64)
        qv = q[cols] if isinstance(q, torch.Tensor) else q
        sv = shift[cols] if isinstance(shift, torch.Tensor) else shift
        y.view(-1)[idx] = requantize(x, qv, sv, v["out_zero_point"], v["qmin"], v["qmax"],
                                     out_dtype=torch.int8)
    return y


# ---------------------------------------------------------------- the GEMM


def cpu_gemm_int8(
    a: torch.Tensor,
    w: torch.Tensor,
    epilogue: Epilogue | None = None,
    *,
    route: str | None = None,
    mode: str = "auto",
    **values: Any,
) -> torch.Tensor:
    """C[M, N] = epilogue(A[M, K] @ W[N, K]^T) on CPU; same values as gemm.gemm_int8.

    A: int8 [M, K], any strides. W: int8 [N, K], any strides. route: a name in
    cpu_routes.ROUTES, or None for the fastest exact route for this M and W on this CPU
    (chosen per call; each route's weight layout is prepared once per weight). mode:
    "compiled" (Inductor-fused epilogue), "eager" (no compiler needed), "auto" (compiled
    for M * N >= 2**18, else eager; eager with a warning if compiling fails).
    """
    epilogue = epilogue if epilogue is not None else Epilogue()
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"cpu_gemm_int8 takes int8 A and W, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"need A [M, K] and W [N, K], got {tuple(a.shape)}, {tuple(w.shape)}")
    if a.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"cpu_gemm_int8 takes CPU tensors, got {a.device} and {w.device}")
    check_k(a.shape[1])
    v = bind_operands(epilogue, a.shape[0], w.shape[0], "cpu", values)
    r = cpu_routes.ROUTES[route] if route is not None else route_for(a.shape[0], w)
    p = prepared(r, w)
    return run_epilogue(r.accumulate(a, p), epilogue, v, mode)


# ---------------------------------------------------------------- the GEMM as a graph op


@torch.library.custom_op("qcompile::cpu_acc", mutates_args=())
def cpu_acc(a: torch.Tensor, w: torch.Tensor, route: str) -> torch.Tensor:
    """acc [..., N] = A [..., K] @ W [N, K]^T through `route`: float32 holding the exact
    integers where the route computes in float32, else int32 (the dtype the fake promises:
    the caller checked, once, that this weight keeps a float32 accumulator exact,
    `inline_route`). The GEMM alone, for graphs whose epilogue Inductor fuses with the ops
    around it (lowering/inline.py)."""
    r = cpu_routes.ROUTES[route]
    acc = r.accumulate(a.reshape(-1, a.shape[-1]), prepared(r, w))  # [M, N]
    return acc.reshape(*a.shape[:-1], w.shape[0])


@cpu_acc.register_fake
def _(a, w, route):
    dtype = torch.float32 if cpu_routes.ROUTES[route].native_f32 else torch.int32
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=dtype)


def inline_route(impl: str, w: torch.Tensor) -> str | None:
    """The route of a call bound to `impl` ("cpu-<route>") for which cpu_acc returns the
    exact accumulator with weight w (int8 [N, K]), else None: a route chosen per call
    ("cpu"), or a float32 route with a weight that allows |acc| > 2**24."""
    route = impl.removeprefix("cpu-")
    r = cpu_routes.ROUTES.get(route)
    if not impl.startswith("cpu-") or r is None or w.dtype != torch.int8:
        return None
    return route if not r.native_f32 or prepared(r, w).f32_exact else None


def acc_to_f32(acc: torch.Tensor, zp_term: torch.Tensor | None) -> torch.Tensor:
    """float32(acc - zp_term), rounded once as the reference rounds it, from cpu_acc's
    accumulator: a float32 one (exact integers; zp_term given as exact float32, IEEE
    subtraction rounds the exact difference) or an int32 one (subtracted in int64)."""
    if acc.dtype == torch.float32:
        return acc - zp_term if zp_term is not None else acc
    if zp_term is not None:
        return (acc.to(torch.int64) - zp_term.to(torch.int64)).to(torch.float32)
    return acc.to(torch.float32)
