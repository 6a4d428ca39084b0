"""The quantized ops, each declared once (lowering/registry.py) with its fake and every
implementation beside the declaration.

The rewrite passes put these ops in the graph; the `lower` pass binds each call to an
implementation: "triton" (generated Triton kernels: compiled on CUDA, the interpreter on
CPU tensors), "cpu" (the CPU integer path: lowering/cpu.py and Inductor-fused torch
ops), or "reference" (the exact definition: int64 / float64). Integer ops give identical
integers in every implementation; float-output ops (float softmax, float rotation) agree
within the tolerance they declare. Because they are custom ops with fake
implementations, a lowered graph still propagates shapes symbolically and can be handed
to Inductor, which treats them as opaque calls.

Integer-only ops (no float anywhere between int8 input and int8 output):
  linear_int8      int8 x int8 -> int32 -> bias, input zero point, dyadic requant -> int8
  linear_w4a8      int8 x packed int4 -> the same epilogue -> int8
  linear_w4a8_grouped  int8 x packed int4 in groups whose scales are the row's times small
                   integers: the same GEMM on the int8 values (q - z) * mult, the same epilogue
  requant_int8     int8 -> int8 at another scale (replaces dequantize -> quantize)
  add_int8         two int8 tensors, each side rescaled dyadically, one rounding -> int8
Boundary ops (float islands start and end here):
  linear_int8_dq   int8 x int8 -> int32 -> dequantized to float (output enters a float
                   island: no requantization to int8 needed)
  quantize         float -> int8 (static per-tensor scale, round half to even)
  dequantize       int8 -> float
Float-output ops:
  attention_int8   int8 q, k, v -> fused attention with a float softmax -> float
  attention_int8_q the same, its output quantized (static) -> int8, token-major layout
  linear_dynamic   per-token dynamic int8 activations, int8 weights, float epilogue
  linear_w4a16     int4 group-wise weights dequantized in the kernel, float activations
  quantize_absmax  float -> (int8, scale): dynamic per-tensor, for attention inputs
  hadamard_transform  x @ H^T / sqrt(n) over the last dim (online rotations)
The I-BERT integer non-linear ops are declared in lowering/int_ops.py; the int16-activation
ops (quantize_int16, linear_a16w8, linear_a16w8_dq: int16 x int8 as two int8 GEMMs, for
mixed precision) in lowering/a16_ops.py; the int4-activation ops (quantize_per_token_int4,
linear_a4w4_dynamic: per-token dynamic int4 x int4, float epilogue, for w4a4) in
lowering/a4_ops.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile.lowering import cpu_routes
from qcompile.lowering.device import inside_compiler, triton_runs_on
from qcompile.lowering.epilogue import (
    Bias,
    Dequantize,
    Epilogue,
    InputZeroPoint,
    Requantize,
    RowZeroPoint,
)
from qcompile.lowering.registry import Inline, on_cpu, quantized_op
from qcompile.numerics import specs
from qcompile.numerics.dyadic import rounding_shift_unchecked

# Element-wise integer ops on at least this many elements run fused by Inductor on the CPU
# path (one loop instead of ~8 passes over int64 temporaries; bit-identical, tested);
# smaller ones run eagerly, where a cold compile would cost more than it saves.
_FUSE_MIN_ELEMENTS = 1 << 18


@functools.cache
def _fused(body):
    return torch.compile(body, dynamic=True, fullgraph=True)


def _elementwise(body, big: bool, *args):
    """Run `body` fused when big (and not already inside a compiler), else eagerly.
    Scalars reach it as 0-d tensors, so one compiled loop serves every layer."""
    args = tuple(torch.tensor(a) if isinstance(a, (int, float)) else a for a in args)
    if big and not inside_compiler():
        return _fused(body)(*args)
    return body(*args)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]


# ---------------------------------------------------------------- boundary: float <-> int8


def _quantize_body(x, scale, zero_point, qmin, qmax):
    # numerics.specs.quantize's arithmetic: float32 true division, round half to even
    y = torch.round(x.float() / scale.float()) + zero_point
    return y.clamp(qmin, qmax).to(torch.int8)


@quantized_op
def quantize(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """int8 = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), in float32."""


@quantize.fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x, dtype=torch.int8)


@quantize.impl("reference")
def _(x, scale, zero_point, qmin, qmax):
    spec = specs.QuantSpec(bits=8, symmetric=zero_point == 0)
    q = specs.quantize(x, torch.tensor(scale), torch.tensor(zero_point), spec)
    return q.clamp(qmin, qmax)


@quantize.impl("cpu", runs_on=on_cpu)
def _(x, scale, zero_point, qmin, qmax):
    return _elementwise(_quantize_body, x.numel() >= _FUSE_MIN_ELEMENTS, x,
                        torch.tensor(scale, dtype=torch.float32), zero_point, qmin, qmax)


@quantize.inliner("cpu")
def _(a, impl):
    return Inline(_quantize_inline, {"scale_t": torch.tensor(a["scale"], dtype=torch.float32)})


def _quantize_inline(x, scale, zero_point, qmin, qmax, *, scale_t):
    return _quantize_body(x, scale_t, zero_point, qmin, qmax)


@quantize.impl("triton", runs_on=triton_runs_on)
def _(x, scale, zero_point, qmin, qmax):
    from qcompile.lowering.kernels.quantize import quantize_per_tensor_triton

    bits = 4 if -8 <= qmin and qmax <= 7 else 8
    q = quantize_per_tensor_triton(x.contiguous(), scale, zero_point, bits=bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return q if (qmin, qmax) == (lo, hi) else q.clamp(qmin, qmax)


@quantized_op
def dequantize(q: Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> Tensor:
    """(q - zero_point) * scale in float32, cast to dtype."""


@dequantize.fake
def _(q, scale, zero_point, dtype):
    return torch.empty_like(q, dtype=dtype)


@dequantize.impl("reference")
def _(q, scale, zero_point, dtype):
    return ((q.float() - zero_point) * torch.tensor(scale, dtype=torch.float32)).to(dtype)


# ---------------------------------------------------------------- integer-only element-wise


def _requant_body(x, in_zp, q, shift, out_zp, qmin, qmax):
    y = rounding_shift_unchecked((x.to(torch.int64) - in_zp) * q, shift) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


@quantized_op
def requant_int8(x: Tensor, in_zp: int, q: int, shift: int, out_zp: int, qmin: int,
                 qmax: int) -> Tensor:
    """int8 -> int8 at another scale: clamp(round_half_away((x - in_zp) * q / 2**shift)
    + out_zp): the integer-only replacement of dequantize -> quantize."""


@requant_int8.fake
def _(x, in_zp, q, shift, out_zp, qmin, qmax):
    return torch.empty_like(x, dtype=torch.int8)


@requant_int8.impl("reference")
def _(x, in_zp, q, shift, out_zp, qmin, qmax):
    return _requant_body(x, in_zp, q, shift, out_zp, qmin, qmax)


@requant_int8.impl("cpu", runs_on=on_cpu)
def _(x, in_zp, q, shift, out_zp, qmin, qmax):
    return _elementwise(_requant_body, x.numel() >= _FUSE_MIN_ELEMENTS, x, in_zp, q, shift,
                        out_zp, qmin, qmax)


def _add_body(a, b, a_zp, b_zp, qa, qb, s, out_zp, qmin, qmax):
    pa = (a.to(torch.int64) - a_zp) * qa
    pb = (b.to(torch.int64) - b_zp) * qb
    y = rounding_shift_unchecked(pa + pb, s) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


def _aligned(qa: int, sa: int, qb: int, sb: int) -> tuple[int, int, int]:
    """(qa', qb', s): both sides at the larger shift, so the sum is rounded once."""
    s = max(sa, sb)
    return qa << (s - sa), qb << (s - sb), s


@quantized_op
def add_int8(a: Tensor, b: Tensor, a_zp: int, b_zp: int, qa: int, sa: int, qb: int, sb: int,
             out_zp: int, qmin: int, qmax: int) -> Tensor:
    """y = clamp(round_half_away((a - a_zp) * qa / 2**sa + (b - b_zp) * qb / 2**sb) + zp).

    Both sides are brought to the larger shift s = max(sa, sb) so the sum is rounded once:
    |a - a_zp| <= 255 and q < 2**31 leave 23 bits of headroom in int64 for the alignment;
    `add_multipliers` (which computes qa, sa, qb, sb) keeps |sa - sb| <= 23.
    """


@add_int8.fake
def _(a, b, a_zp, b_zp, qa, sa, qb, sb, out_zp, qmin, qmax):
    shape = torch.broadcast_shapes(a.shape, b.shape)
    # element-wise results keep the full-shaped input's memory format (channels-last
    # convolution outputs stay channels-last), as every implementation's torch ops do
    for t in (a, b):
        if t.shape == shape:
            return torch.empty_like(t, dtype=torch.int8)
    return torch.empty(shape, dtype=torch.int8, device=a.device)


@add_int8.impl("reference")
def _(a, b, a_zp, b_zp, qa, sa, qb, sb, out_zp, qmin, qmax):
    qa, qb, s = _aligned(qa, sa, qb, sb)
    return _add_body(a, b, a_zp, b_zp, qa, qb, s, out_zp, qmin, qmax)


@add_int8.impl("cpu", runs_on=on_cpu)
def _(a, b, a_zp, b_zp, qa, sa, qb, sb, out_zp, qmin, qmax):
    qa, qb, s = _aligned(qa, sa, qb, sb)
    fast = _add_f32(a, b, a_zp, b_zp, qa, qb, s, out_zp, qmin, qmax)
    if fast is not None:
        return fast
    return _elementwise(_add_body, a.numel() >= _FUSE_MIN_ELEMENTS, a, b, a_zp, b_zp, qa, qb,
                        s, out_zp, qmin, qmax)


_ADD_BLOCK = 64  # doubtful elements are recomputed exactly in blocks of this many
_ADD_MIN = 1 << 14  # below, the int64 path's few passes cost less than a compiled call


def _add_candidate(a, b, a_zp, b_zp, ma, mb, out_zp, qmin, qmax):
    # float32: A = fl(fl(a - zp) * fl(ma)), B alike, t = fl(A + B): |t - exact| <
    # (|A| + |B|) 2**-22 (two roundings per side, one for the sum; cancellation between
    # the sides is why the bound is on |A| + |B|, not |t|)
    ta = (a.float() - a_zp) * ma
    tb = (b.float() - b_zp) * mb
    t = ta + tb
    r = torch.round(t)
    # doubtful: within twice that bound of a half-integer (t and the exact value could
    # round apart, or the exact value is a tie); |t| >= 512 saturates either way
    doubtful = ((t - r).abs() > 0.5 - (ta.abs() + tb.abs()) * 2.0**-21) & (t.abs() < 512)
    blocks = torch.where(doubtful, 1.0, 0.0).view(-1, _ADD_BLOCK).amax(dim=1)
    return (r + out_zp).clamp(qmin, qmax).to(torch.int8), blocks


def _dense_format(t: Tensor) -> torch.memory_format | None:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _add_f32(a, b, a_zp, b_zp, qa, qb, s, out_zp, qmin, qmax):
    """add_int8 through a float32 candidate, bit for bit the int64 arithmetic: ATen
    emulates int64 multiplies lane by lane without AVX-512, which made a ResNet's residual
    adds a fifth of its integer forward. The elements whose candidate could round
    differently are recomputed exactly (requantize_f32's method, lowering/cpu.py). Same
    shape and dense memory order only (None otherwise: the int64 path runs)."""
    fmt = _dense_format(a)
    n = a.numel()
    if a.shape != b.shape or fmt is None or n % _ADD_BLOCK or n < _ADD_MIN or inside_compiler():
        return None
    if _dense_format(b) != fmt:  # e.g. a channels-last conv output and an NCHW shortcut
        b = b.contiguous(memory_format=fmt)
    flat_a = a.as_strided((n,), (1,))  # the elements in memory order, a and b alike
    flat_b = b.as_strided((n,), (1,))
    ma, mb = math.ldexp(qa, -s), math.ldexp(qb, -s)
    # int8 -> float32 by ATen's vectorized copy: Inductor's CPU code loads int8 lane by lane
    # (3-4x slower for the whole candidate, measured on AVX2)
    fa = torch.empty(n, dtype=torch.float32).copy_(flat_a)
    fb = torch.empty(n, dtype=torch.float32).copy_(flat_b)
    y, blocks = _elementwise(_add_candidate, True, fa, fb, a_zp, b_zp, ma, mb, out_zp,
                             qmin, qmax)
    bad = blocks.nonzero().squeeze(1)
    if bad.numel():
        idx = (bad[:, None] * _ADD_BLOCK + torch.arange(_ADD_BLOCK)).reshape(-1)
        y[idx] = _add_body(flat_a[idx], flat_b[idx], a_zp, b_zp, qa, qb, s, out_zp, qmin, qmax)
    if fmt is torch.channels_last:
        bsz, c, h, w = a.shape
        return y.view(bsz, h, w, c).permute(0, 3, 1, 2)
    return y.view(a.shape)


def add_multipliers(ma: float, mb: float) -> tuple[int, int, int, int]:
    """(qa, sa, qb, sb) for add_int8 with real multipliers ma = s_a / s_y, mb = s_b / s_y.

    The side with the smaller multiplier loses low bits of q when the shifts are more than
    23 apart (its contribution is then below 2**-23 of the other's anyway)."""
    from qcompile.numerics.dyadic import quantize_multiplier

    (qa, sa), (qb, sb) = quantize_multiplier(ma), quantize_multiplier(mb)
    if sa - sb > 23:
        drop = sa - sb - 23
        qa, sa = (qa + (1 << (drop - 1))) >> drop, sa - drop
    elif sb - sa > 23:
        drop = sb - sa - 23
        qb, sb = (qb + (1 << (drop - 1))) >> drop, sb - drop
    return qa, sa, qb, sb


# ---------------------------------------------------------------- int8 GEMM ops


def requant_epilogue(has_bias: bool, has_zp_term: bool, per_channel: bool) -> Epilogue:
    """The epilogue of linear_int8 / linear_w4a8 (the lower pass prints its kernel)."""
    steps = []
    if has_zp_term:
        steps.append(InputZeroPoint())
    if has_bias:
        steps.append(Bias())
    steps.append(Requantize(per_channel=per_channel))
    return Epilogue(tuple(steps))


def dequant_epilogue(has_bias: bool, has_zp_term: bool) -> Epilogue:
    """The epilogue of linear_int8_dq: input zero point, then s_x * s_w[n] (+ bias)."""
    steps = [InputZeroPoint()] if has_zp_term else []
    return Epilogue((*steps, Dequantize(out_dtype="float32", has_bias=has_bias)))


def dynamic_epilogue(has_bias: bool, row_zero_points: bool = False) -> Epilogue:
    """The epilogue of linear_dynamic: per-token x per-channel scales, float32 out;
    row_zero_points: the per-token zero points of asymmetric activations removed first."""
    dequantize = Dequantize(out_dtype="float32", has_bias=has_bias)
    return Epilogue((RowZeroPoint(), dequantize) if row_zero_points else (dequantize,))


def accumulate_epilogue(has_bias: bool, has_zp_term: bool) -> Epilogue:
    """The int32 accumulator with the input zero point removed and the bias added."""
    steps = [InputZeroPoint()] if has_zp_term else []
    return Epilogue((*steps, Bias()) if has_bias else tuple(steps))


@dataclass(frozen=True)
class Backend:
    """How one implementation family runs the pieces every GEMM op is made of."""

    name: str
    gemm: object  # (a int8 [M, K], w int8 [N, K], epilogue, origin, **values) -> [M, N]
    per_token: object  # float [M, K] -> (int8 [M, K], float32 scale [M])


def _gemm_reference(a, w, epilogue, origin, **values):
    from qcompile.lowering.reference import gemm_int8_ref

    return gemm_int8_ref(a, w, epilogue, **values)


def _gemm_cpu(route: str | None):
    def gemm(a, w, epilogue, origin, **values):
        from qcompile.lowering.cpu import cpu_gemm_int8

        return cpu_gemm_int8(a, w, epilogue, route=route, **values)

    return gemm


def _gemm_triton(a, w, epilogue, origin, **values):
    from qcompile.lowering.gemm import gemm_int8

    return gemm_int8(a.contiguous(), w, epilogue, origin=origin, **values)


def _per_token_reference(rows):
    from qcompile.lowering.kernels.quantize import quantize_per_token_ref

    return quantize_per_token_ref(rows)


def _per_token_body(x, qmax, eps, clip=None):
    # numerics.specs.dynamic_per_token_qparams + quantize: scale = max(-min, max) / qmax
    # over the row (the range stretched to include 0), at least eps; round half to even.
    # clip (a float32 0-d tensor, the int4 activations' clip ratio): (absmax * clip) / qmax,
    # the product rounded to float32 before the division, as the spec; None (int8): no
    # factor at all, so the int8 graphs are the unclipped ones
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    absmax = torch.maximum(-lo, hi)
    if clip is not None:
        absmax = absmax * clip
    scale = (absmax / qmax).clamp(min=eps)
    q = torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale.squeeze(-1)


def _per_token_asym_body(x, qmin, qmax, eps, clip):
    # numerics.specs.dynamic_per_token_qparams with an asymmetric spec + quantize: the row's
    # min and max times clip, stretched to include 0, then compute_qparams' op order
    # (scale = (hi - lo) / (qmax - qmin) at least eps, zero point qmin - round(lo / scale)
    # clamped), q = clamp(round(x / scale) + zero point); round half to even throughout
    xf = x.float()
    lo = (xf.amin(dim=-1, keepdim=True) * clip).clamp(max=0.0)
    hi = (xf.amax(dim=-1, keepdim=True) * clip).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = (torch.round(xf / scale) + zp).clamp(qmin, qmax).to(torch.int8)
    return q, scale.squeeze(-1), zp.squeeze(-1).to(torch.int32)


def _per_token_cpu(rows):
    return _elementwise(_per_token_body, rows.numel() >= _FUSE_MIN_ELEMENTS, rows, 127.0,
                        specs.SCALE_EPS)


def _per_token_triton(rows):
    from qcompile.lowering.kernels.quantize import quantize_per_token_triton

    return quantize_per_token_triton(rows.contiguous())


def _route_runs_on(route: str):
    def runs_on(device: str) -> bool:
        caps = cpu_routes.cpu_capabilities()
        return device == "cpu" and cpu_routes.ROUTES[route].available(caps)

    return runs_on


# "cpu": the fastest exact route for each call's M and weights on this CPU; "cpu-<route>":
# one route of lowering/cpu_routes.py (the lower pass binds the route select-layers chose)
_CPU_ROUTES = tuple(cpu_routes.ROUTES)
BACKENDS = {
    "reference": Backend("reference", _gemm_reference, _per_token_reference),
    "cpu": Backend("cpu", _gemm_cpu(None), _per_token_cpu),
    **{f"cpu-{r}": Backend(f"cpu-{r}", _gemm_cpu(r), _per_token_cpu) for r in _CPU_ROUTES},
    "triton": Backend("triton", _gemm_triton, _per_token_triton),
}
_RUNS_ON = {"reference": None, "cpu": on_cpu, "triton": triton_runs_on,
            **{f"cpu-{r}": _route_runs_on(r) for r in _CPU_ROUTES}}


def _cpu_weights(args: dict) -> dict:
    """Once, at lowering: int4 weights unpacked to int8 values (the CPU routes have no int4
    path). Each route lays the int8 weight out itself, once (cpu.prepared)."""
    w = args["w"]
    return {"w": specs.unpack_int4(w)} if w.dtype == torch.uint8 else {}


def gemm_op(body, epilogue=None, *, triton: bool = True):
    """Register `body(backend, *args, origin)` as the reference, every CPU and the triton
    implementation of a GEMM op: one body, the backend's pieces swapped in. `epilogue`
    maps the call's arguments (by name) to the Epilogue its generated kernel runs.
    triton=False: the op registers its Triton implementation itself (a kernel other than
    the int8 GEMM, e.g. the packed W4A4 GEMM of lowering/a4_ops.py)."""

    def register(op):
        op.epilogue = epilogue
        for name, backend in BACKENDS.items():
            if name == "triton" and not triton:
                continue
            prepare = _cpu_weights if name.startswith("cpu") else None
            runs_on = _RUNS_ON[name]
            kw = {"runs_on": runs_on} if runs_on is not None else {}
            op.impl(name, prepare=prepare, **kw)(functools.partial(body, backend))
        return op

    return register


def _requant_values(bias, zp_term, q, shift, out_zp, qmin, qmax) -> dict:
    per_channel = q.numel() > 1
    values = dict(q=q if per_channel else int(q), shift=shift if per_channel else int(shift),
                  out_zero_point=out_zp, qmin=qmin, qmax=qmax)
    if bias is not None:
        values["bias"] = bias
    if zp_term is not None:
        values["zp_term"] = zp_term
    return values


def _int8_weight(w: Tensor) -> Tensor:
    """int8 [N, K] values of a weight given packed (uint8 [N, K // 2]) or unpacked."""
    return specs.unpack_int4(w) if w.dtype == torch.uint8 else w


def _linear_requant(backend, x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, origin=""):
    epilogue = requant_epilogue(bias is not None, zp_term is not None, q.numel() > 1)
    values = _requant_values(bias, zp_term, q, shift, out_zp, qmin, qmax)
    y = backend.gemm(_rows(x), _int8_weight(w), epilogue, origin, **values)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _requant_epilogue_of(a: dict) -> Epilogue:
    q = a["q"]
    per_channel = q is not None and q.numel() > 1
    return requant_epilogue(a["bias"] is not None, a["zp_term"] is not None, per_channel)


@gemm_op(_linear_requant, epilogue=_requant_epilogue_of)
@quantized_op
def linear_int8(x: Tensor, w: Tensor, bias: Tensor | None, zp_term: Tensor | None, q: Tensor,
                shift: Tensor, out_zp: int, qmin: int, qmax: int) -> Tensor:
    """y int8 [..., N] = requant(x int8 [..., K] @ w int8 [N, K]^T - zp_term + bias)."""


@linear_int8.fake
def _(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int8)


def _requant_inline_plan(a, impl, fn):
    """The written-out requantizing GEMM for a call whose weight is int8 values (after
    `prepare`) on a fixed route with an int32 accumulator (int-mm: CPUs with AVX512-VNNI
    or AMX, whose AVX512-DQ multiplies int64 natively; the ARM NEON routes, whose layers
    auto keeps quantized only where timed faster than float); else None, and the op runs as it
    is (a float32 accumulator's requantize_f32 is faster than int64 arithmetic on CPUs
    that emulate it)."""
    from qcompile.lowering.cpu import inline_route

    route = inline_route(impl, a["w"])
    if route is None or cpu_routes.ROUTES[route].native_f32:
        return None
    return Inline(fn, {}, {"route": route}, opaque_input=True)


def _linear_int8_inline(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, *, route):
    from qcompile.lowering.cpu import cpu_acc

    acc = cpu_acc(_operand(_rows(x), route), w, route).to(torch.int64)
    if zp_term is not None:
        acc = acc - zp_term.to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    y = rounding_shift_unchecked(acc * q.to(torch.int64), shift.to(torch.int64)) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8).reshape(*x.shape[:-1], w.shape[0])


def _linear_grouped_inline(x, w, mult, wzp, bias, zp_term, q, shift, out_zp, qmin, qmax,
                           **plan):
    # w holds the int8 values (q - wzp) * mult since `prepare`: mult and wzp are spent
    return _linear_int8_inline(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, **plan)


linear_int8.inliner("cpu")(functools.partial(_requant_inline_plan, fn=_linear_int8_inline))


@quantized_op
def linear_w4a8(x: Tensor, w: Tensor, bias: Tensor | None, zp_term: Tensor | None,
                q: Tensor, shift: Tensor, out_zp: int, qmin: int, qmax: int) -> Tensor:
    """linear_int8 with int4 weights packed two per byte along K (uint8 [N, K // 2]).
    Implementations may hold the weights unpacked (int8 [N, K]) after `prepare`."""


linear_w4a8.epilogue = _requant_epilogue_of


@linear_w4a8.fake
def _(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int8)


@linear_w4a8.impl("reference")
def _(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, origin=""):
    if zp_term is not None or w.dtype == torch.int8:
        return _linear_requant(BACKENDS["reference"], x, w, bias, zp_term, q, shift,
                               out_zp, qmin, qmax)
    from qcompile.lowering.kernels import w4

    qv, sv = (q, shift) if q.numel() > 1 else (int(q), int(shift))
    y = w4.w4a8_gemm_requant_ref(_rows(x), w, qv, sv, out_zp, bias, qmin, qmax)
    return y.reshape(*x.shape[:-1], w.shape[0])


for _name in BACKENDS:
    if _name.startswith("cpu"):
        # the CPU routes have no int4 path: the int4 values run through the int8 GEMM
        # (same integers); `prepare` unpacks them once, at lowering
        linear_w4a8.impl(_name, runs_on=_RUNS_ON[_name], prepare=_cpu_weights)(
            functools.partial(_linear_requant, BACKENDS[_name]))


@linear_w4a8.impl("triton", runs_on=triton_runs_on)
def _(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, origin=""):
    if zp_term is not None or w.dtype == torch.int8:
        # the W4A8 kernel has no input zero-point step: the int8 GEMM on the int4 values
        return _linear_requant(BACKENDS["triton"], x, w, bias, zp_term, q, shift,
                               out_zp, qmin, qmax, origin)
    from qcompile.lowering.kernels import w4

    y = w4.w4a8_gemm_requant_triton(_rows(x).contiguous(), w, q, shift, out_zp, bias,
                                    qmin, qmax)
    return y.reshape(*x.shape[:-1], w.shape[0])


def grouped_int4_values(w: Tensor, mult: Tensor, wzp: Tensor | None = None) -> Tensor:
    """int8 [N, K]: linear_w4a8_grouped's integer weight, each int4 value of w (packed,
    uint8 [N, K // 2]) less its group's zero point in wzp (int8 [N, K // g] in [-8, 7], or
    None: 0) times its group's multiplier in mult (int8 [N, K // g], >= 1). The products
    must be int8 values (q * mult for q in [-8, 7] with mult <= 16; (q - wzp) * mult with
    mult <= 8): a ValueError, never a wrapped integer, where they are not."""
    from qcompile.numerics import _checks

    q = specs.unpack_int4(w)
    n, k = q.shape
    for name, t in (("mult", mult), ("wzp", wzp)):
        if t is not None and (t.dtype != torch.int8 or t.dim() != 2 or t.shape[0] != n or
                              not t.shape[1] or k % t.shape[1] or t.shape != mult.shape):
            raise ValueError(f"linear_w4a8_grouped: {name} must be int8 [N, K // group_size] "
                             f"with a group size dividing K = {k}, N = {n} (wzp shaped like "
                             f"mult); got {t.dtype} {tuple(t.shape)}")
    g = k // mult.shape[1]
    v = q.to(torch.int16)
    if wzp is not None:
        if _checks.reads_data(wzp) and wzp.numel() and \
                (int(wzp.min()) < -8 or int(wzp.max()) > 7):
            raise ValueError(f"linear_w4a8_grouped: weight zero points must lie in [-8, 7], "
                             f"got [{int(wzp.min())}, {int(wzp.max())}]")
        v = v - wzp.to(torch.int16).repeat_interleave(g, dim=1)
    v = v * mult.to(torch.int16).repeat_interleave(g, dim=1)
    if _checks.reads_data(mult) and mult.numel():
        lo, hi = int(v.min()), int(v.max())
        if int(mult.min()) < 1 or lo < -128 or hi > 127:
            raise ValueError(
                f"linear_w4a8_grouped: group multipliers must be >= 1 and the integer weight "
                f"(q{' - wzp' if wzp is not None else ''}) * mult an int8 value (mult <= 16 "
                f"for symmetric int4, <= 8 with zero points); got multipliers "
                f"[{int(mult.min())}, {int(mult.max())}], products [{lo}, {hi}]")
    return v.to(torch.int8)


def grouped_weight(w: Tensor, mult: Tensor, wzp: Tensor | None = None) -> Tensor:
    """The int8 values of a grouped int4 weight given packed (expanded here) or as
    `_grouped_weights` prepared it (int8 [N, K], as it is)."""
    return grouped_int4_values(w, mult, wzp) if w.dtype == torch.uint8 else w


def _grouped_weights(args: dict) -> dict:
    """Once, at lowering: the grouped int4 weight as its int8 values (q - wzp) * mult,
    which every int8 GEMM route multiplies as it is (the same integers as the
    reference's)."""
    return {"w": grouped_weight(args["w"], args["mult"], args.get("wzp"))}


def _linear_grouped(backend, x, w, mult, wzp, bias, zp_term, q, shift, out_zp, qmin, qmax,
                    origin=""):
    return _linear_requant(backend, x, grouped_weight(w, mult, wzp), bias, zp_term, q, shift,
                           out_zp, qmin, qmax, origin)


@quantized_op
def linear_w4a8_grouped(x: Tensor, w: Tensor, mult: Tensor, wzp: Tensor | None,
                        bias: Tensor | None, zp_term: Tensor | None, q: Tensor, shift: Tensor,
                        out_zp: int, qmin: int, qmax: int) -> Tensor:
    """linear_int8 with group-wise int4 weights, packed two per byte along K (uint8
    [N, K // 2]), whose group scales are the row's scale times small integers: mult int8
    [N, K // g] (g = K // mult.shape[1]), with a zero point per group in wzp (int8
    [N, K // g] in [-8, 7]) or none (None). The integer weight (q[n, k] - wzp[n, k // g]) *
    mult[n, k // g] is an int8 value (grouped_int4_values), so the int32 accumulator, the
    zero-point term and the per-row dyadic requantization are linear_int8's.
    Implementations may hold the weight as those int8 values (int8 [N, K]) after
    `prepare`."""


linear_w4a8_grouped.epilogue = _requant_epilogue_of


@linear_w4a8_grouped.fake
def _(x, w, mult, wzp, bias, zp_term, q, shift, out_zp, qmin, qmax):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int8)


for _name, _backend in BACKENDS.items():
    # the reference expands the int4 values at every call (the definition); every other
    # implementation once, at lowering, and runs its int8 GEMM on them
    linear_w4a8_grouped.impl(
        _name, prepare=None if _name == "reference" else _grouped_weights,
        **({"runs_on": _RUNS_ON[_name]} if _RUNS_ON[_name] is not None else {}))(
        functools.partial(_linear_grouped, _backend))

# the CPU implementations hold int8 weight values after `prepare`: linear_int8's GEMM
linear_w4a8.inliner("cpu")(functools.partial(_requant_inline_plan, fn=_linear_int8_inline))
linear_w4a8_grouped.inliner("cpu")(functools.partial(_requant_inline_plan,
                                                     fn=_linear_grouped_inline))


def _linear_dequant(backend, x, w, bias, zp_term, x_scale, w_scale, out_dtype, origin=""):
    values = dict(row_scale=x_scale, col_scale=w_scale.float())
    if bias is not None:
        values["float_bias"] = bias.float()
    if zp_term is not None:
        values["zp_term"] = zp_term
    epilogue = dequant_epilogue(bias is not None, zp_term is not None)
    y = backend.gemm(_rows(x), _int8_weight(w), epilogue, origin, **values)
    return y.to(out_dtype).reshape(*x.shape[:-1], w.shape[0])


@gemm_op(_linear_dequant, epilogue=lambda a: dequant_epilogue(a["bias"] is not None,
                                                            a["zp_term"] is not None))
@quantized_op
def linear_int8_dq(x: Tensor, w: Tensor, bias: Tensor | None, zp_term: Tensor | None,
                   x_scale: float, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """A static int8 linear whose output enters a float island: the int32 accumulator
    (minus the input zero-point term) is dequantized, acc * s_x * s_w[n] + bias, with no
    requantization to int8 in between (there is no integer consumer to requantize for)."""


@linear_int8_dq.fake
def _(x, w, bias, zp_term, x_scale, w_scale, out_dtype):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


@linear_int8_dq.inliner("cpu")
def _(a, impl):
    from qcompile.lowering.cpu import F32_EXACT, inline_route

    route = inline_route(impl, a["w"])
    zp = a["zp_term"]
    if route is None:
        return None
    consts = {"row_scale": torch.tensor([a["x_scale"]], dtype=torch.float32)}
    if zp is not None and cpu_routes.ROUTES[route].native_f32:
        if zp.numel() and int(zp.abs().max()) > F32_EXACT:
            return None  # not exact in float32: the op runs as it is
        consts["zp_f32"] = zp.to(torch.float32)
    return Inline(_linear_dq_inline, consts, {"route": route}, opaque_input=True)


def _operand(a, route):
    """The A operand of an inlined GEMM in the layout its route reads: a route that takes
    a + 128 as uint8 (oneDNN's u8 x s8) gets it from the loop that quantizes a, which
    Inductor fuses it into (the route would otherwise add 128 in a pass of its own)."""
    if cpu_routes.ROUTES[route].reads_u8:
        return (a.to(torch.float32) + 128).to(torch.uint8)  # exact: integers below 2**8
    return a


def _linear_dq_inline(x, w, bias, zp_term, x_scale, w_scale, out_dtype, *, row_scale, route,
                      zp_f32=None):
    from qcompile.lowering.cpu import acc_to_f32, cpu_acc, dequant_body

    acc = cpu_acc(_operand(_rows(x), route), w, route)  # [M, N]
    zp = zp_f32 if acc.dtype == torch.float32 else zp_term
    bias = bias.float() if bias is not None else None
    y = dequant_body(acc_to_f32(acc, zp), None, row_scale, w_scale.float(), bias)
    return y.to(out_dtype).reshape(*x.shape[:-1], w.shape[0])


def _linear_dynamic(backend, x, w, w_scale, bias, origin=""):
    rows = _rows(x)
    xq, x_scale = backend.per_token(rows)
    values = dict(row_scale=x_scale.float(), col_scale=w_scale.float())
    if bias is not None:
        values["float_bias"] = bias.float()
    y = backend.gemm(xq, w, dynamic_epilogue(bias is not None), origin, **values)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


@gemm_op(_linear_dynamic, epilogue=lambda a: dynamic_epilogue(a["bias"] is not None))
@quantized_op
def linear_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 dynamic: per-token symmetric int8 x, int8 w [N, K] with per-channel scales,
    acc * x_scale[m] * w_scale[n] (+ bias) in float32, cast to x.dtype."""


@linear_dynamic.fake
def _(x, w, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@linear_dynamic.inliner("cpu")
def _(a, impl):
    from qcompile.lowering.cpu import inline_route

    route = inline_route(impl, a["w"])
    if route is None:
        return None
    consts = {"qmax": torch.tensor(127.0), "eps": torch.tensor(specs.SCALE_EPS)}
    return Inline(_linear_dynamic_inline, consts, {"route": route}, rereads_input=True)


def _linear_dynamic_inline(x, w, w_scale, bias, *, qmax, eps, route):
    from qcompile.lowering.cpu import acc_to_f32, cpu_acc, dequant_body

    xq, x_scale = _per_token_body(_rows(x), qmax, eps)  # int8 [M, K], float32 [M]
    acc = cpu_acc(_operand(xq, route), w, route)
    bias = bias.float() if bias is not None else None
    y = dequant_body(acc_to_f32(acc, None), None, x_scale, w_scale.float(), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------- weight-only int4


# float activations: float32 accumulation in the fast paths, float64 in the reference
@quantized_op(exact=False, tolerance={"atol": 1e-4, "rtol": 1e-5})
def linear_w4a16(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None,
                 group_size: int, bias: Tensor | None) -> Tensor:
    """Float x [..., K] times int4 group-wise weights, dequantized inside the kernel."""


@linear_w4a16.fake
def _(x, w, scales, zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _w4a16(fn_name: str, contiguous: bool):
    def run(x, w, scales, zeros, group_size, bias):
        from qcompile.lowering.kernels import w4

        rows = _rows(x)
        y = getattr(w4, fn_name)(rows.contiguous() if contiguous else rows, w, scales,
                                 zeros, group_size, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    return run


linear_w4a16.impl("reference")(_w4a16("w4a16_gemm_ref", False))
linear_w4a16.impl("cpu", runs_on=on_cpu)(_w4a16("w4a16_gemm_cpu", False))
linear_w4a16.impl("triton", runs_on=triton_runs_on)(_w4a16("w4a16_gemm_triton", True))


# ---------------------------------------------------------------- attention


@quantized_op
def quantize_absmax(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-tensor quantization: (int8 round_half_even(x / s), s) with
    s = max|x| / qmax (float32), for attention inputs under the dynamic recipe."""


@quantize_absmax.fake
def _(x, qmax):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((), dtype=torch.float32)


def _absmax_body(x, qmax):
    # an empty tensor has no range: max|x| over nothing is taken as 0 (scale SCALE_EPS);
    # the zero appended to |x| changes no other maximum (qmax a tensor written out: a
    # division by a constant would become a multiplication by its reciprocal)
    absmax = F.pad(x.detach().abs().reshape(-1), (0, 1)).amax().float()
    scale = (absmax / qmax).clamp(min=specs.SCALE_EPS)
    q = torch.round(x.float() / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale


quantize_absmax.impl("reference")(_absmax_body)
quantize_absmax.impl("cpu", runs_on=on_cpu)(_absmax_body)


@quantize_absmax.inliner("cpu")
def _(a, impl):
    """Written out, its reduction fuses with the epilogue of the linear that produces x
    (eagerly, six passes over q, k or v: 2.1 ms each for MiniLM's 32 x 128 tokens)."""
    return Inline(_absmax_inline, {"qmax_t": torch.tensor(a["qmax"], dtype=torch.float32)},
                  rereads_input=True)


def _absmax_inline(x, qmax, *, qmax_t):
    return _absmax_body(x, qmax_t)


# float softmax: implementations differ by float rounding (P in float16 on GPUs)
@quantized_op(exact=False, tolerance={"atol": 2e-2, "rtol": 2e-2})
def attention_int8(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor,
                   v_scale: Tensor, attn_mask: Tensor | None, is_causal: bool,
                   scale: float | None, out_dtype: torch.dtype) -> Tensor:
    """softmax(scale * Q K^T + mask) V on int8 q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D]:
    int32 Q K^T, dequantization and softmax scale folded into one multiplier, float
    softmax, P V (lowering/kernels/attention.py)."""


@attention_int8.fake
def attention_fake(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale,
                   out_dtype):
    """Shapes of every quantized attention op: q [B, Hq, Sq, D], v [B, Hkv, Sk, Dv]."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)


@attention_int8.impl("reference")
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype):
    from qcompile.lowering.kernels.attention import quantized_attention_ref

    return quantized_attention_ref(q, k, v, q_scale, k_scale, v_scale, causal=is_causal,
                                   attn_mask=attn_mask, sm_scale=scale, out_dtype=out_dtype)


@attention_int8.impl("cpu-sdpa", runs_on=on_cpu)
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype):
    """The int8 values dequantized exactly (int8 * scale, float32) into PyTorch's fused CPU
    attention, which computes the same function, softmax(scale * Q K^T + mask) V, on those
    quantized inputs without materialising [B, H, Sq, Sk] temporaries in eager ops."""

    def deq(t, s):
        s = s.float()
        if s.numel() > 1:  # per head
            s = s.reshape(1, -1, 1, 1)
        return t.float() * s

    qf, kf, vf = deq(q, q_scale), deq(k, k_scale), deq(v, v_scale)
    gqa = qf.shape[1] != kf.shape[1]
    mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() \
        else attn_mask
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=gqa)
    # the CPU flash kernel returns a [B, S, H, D] memory layout; the op promises (and
    # Inductor checks) the contiguous [B, H, S, D] its fake implementation describes
    return out.to(out_dtype).contiguous()


def vnni_attention_runs_on(device: str) -> bool:
    """A CPU with AVX512-VNNI, for which Inductor builds its kernels with VNNI."""
    from qcompile.lowering.kernels.attention_cpu import vnni_attention_available

    return device == "cpu" and vnni_attention_available()


def avx2_attention_runs_on(device: str) -> bool:
    """An x86 CPU with AVX2 and FMA (the kernel also runs where AVX512-VNNI's is faster)."""
    from qcompile.lowering.kernels.attention_avx2 import avx2_attention_available

    return device == "cpu" and avx2_attention_available()


@attention_int8.impl("cpu-avx2", runs_on=avx2_attention_runs_on, priority=1)
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype):
    """Q K^T in int16 pairs (`vpmaddwd`), softmax and P V in float32, one C++ kernel
    (lowering/kernels/attention_avx2.py): faster than float SDPA on the same shapes."""
    from qcompile.lowering.kernels.attention_avx2 import quantized_attention_avx2

    return quantized_attention_avx2(q, k, v, q_scale, k_scale, v_scale, causal=is_causal,
                                    attn_mask=attn_mask, sm_scale=scale, out_dtype=out_dtype)


@attention_int8.impl("cpu-vnni", runs_on=vnni_attention_runs_on, priority=2)
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype):
    """Q K^T in int8 VNNI dot products, softmax and P V in float32, one C++ kernel
    (lowering/kernels/attention_cpu.py): faster than float SDPA on the same shapes."""
    from qcompile.lowering.kernels.attention_cpu import quantized_attention_vnni

    return quantized_attention_vnni(q, k, v, q_scale, k_scale, v_scale, causal=is_causal,
                                    attn_mask=attn_mask, sm_scale=scale, out_dtype=out_dtype)


@attention_int8.impl("triton", runs_on=triton_runs_on)
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype):
    from qcompile.lowering.kernels.attention import quantized_attention_triton

    return quantized_attention_triton(q, k, v, q_scale, k_scale, v_scale, causal=is_causal,
                                      attn_mask=attn_mask, sm_scale=scale, out_dtype=out_dtype)


def _quantized_rows(out, out_scale, out_zp, qmin, qmax):
    """An attention's float32 output quantized as quantize does, in the token-major layout
    attention_int8_q promises."""
    from qcompile.lowering.kernels.attention import token_major

    q = _quantize_body(out.float(), torch.tensor(out_scale, dtype=torch.float32), out_zp,
                       qmin, qmax)
    return token_major(q.shape, torch.int8, q.device).copy_(q)


# int8 codes of attention_int8's output: implementations differ by its float rounding, so
# a code may differ by one where the float value sits at a rounding boundary
@quantized_op(exact=False, tolerance={"atol": 1, "rtol": 0})
def attention_int8_q(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor,
                     v_scale: Tensor, attn_mask: Tensor | None, is_causal: bool,
                     scale: float | None, out_scale: float, out_zp: int, qmin: int,
                     qmax: int) -> Tensor:
    """attention_int8 (float32 output) quantized as quantize quantizes it: int8 [B, Hq, Sq,
    Dv] = clamp(round_half_even(out / out_scale) + out_zp, qmin, qmax), in the [B, Sq, Hq,
    Dv] memory layout, so that the output projection's transpose(1, 2).reshape(B, Sq, -1)
    is a view. integer-dataflow writes it where a static quantize is the only reader of an
    attention's output; the fused CPU kernel quantizes its rows as it stores them instead
    of writing float32 that a second kernel reads back."""


@attention_int8_q.fake
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_scale, out_zp,
      qmin, qmax):
    from qcompile.lowering.kernels.attention import token_major

    return token_major((*q.shape[:-1], v.shape[-1]), torch.int8, q.device)


def _attention_then_quantize(impl: str):
    def run(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_scale,
            out_zp, qmin, qmax):
        out = attention_int8.run(impl, (q, k, v, q_scale, k_scale, v_scale, attn_mask,
                                        is_causal, scale, torch.float32))
        return _quantized_rows(out, out_scale, out_zp, qmin, qmax)

    run.__doc__ = f"attention_int8's {impl!r} implementation, then quantize's arithmetic."
    return run


attention_int8_q.impl("reference")(_attention_then_quantize("reference"))
attention_int8_q.impl("cpu-sdpa", runs_on=on_cpu)(_attention_then_quantize("cpu-sdpa"))
attention_int8_q.impl("triton", runs_on=triton_runs_on)(_attention_then_quantize("triton"))


@attention_int8_q.impl("cpu-avx2", runs_on=avx2_attention_runs_on, priority=1)
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_scale, out_zp,
      qmin, qmax):
    """The AVX2 kernel quantizing each row as it stores it (as the VNNI kernel does)."""
    from qcompile.lowering.kernels.attention_avx2 import quantized_attention_avx2

    return quantized_attention_avx2(q, k, v, q_scale, k_scale, v_scale, causal=is_causal,
                                    attn_mask=attn_mask, sm_scale=scale,
                                    out_q=(out_scale, out_zp, qmin, qmax))


@attention_int8_q.impl("cpu-vnni", runs_on=vnni_attention_runs_on, priority=2)
def _(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_scale, out_zp,
      qmin, qmax):
    """The VNNI kernel quantizing each row as it stores it (the same float32 values its
    float output holds, the same division and rounding: equal to quantize of its float
    output, bit for bit)."""
    from qcompile.lowering.kernels.attention_cpu import quantized_attention_vnni

    return quantized_attention_vnni(q, k, v, q_scale, k_scale, v_scale, causal=is_causal,
                                    attn_mask=attn_mask, sm_scale=scale,
                                    out_q=(out_scale, out_zp, qmin, qmax))


# ---------------------------------------------------------------- online Hadamard

_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


# a float rotation: float32 in the fast paths, float64 in the reference
@quantized_op(exact=False, tolerance={"atol": 1e-5, "rtol": 1e-5})
def hadamard_transform(x: Tensor) -> Tensor:
    """y = x @ H_n^T / sqrt(n) over the last dim (n = x.shape[-1], a Hadamard size)."""


@hadamard_transform.fake
def _(x):
    return x.new_empty(x.shape)  # contiguous, as every implementation returns (Inductor checks)


@hadamard_transform.impl("reference")
def _(x):
    from qcompile.lowering.kernels.hadamard import hadamard_transform_ref

    return hadamard_transform_ref(x)


@functools.lru_cache(maxsize=16)
def _dense_t(n: int, device: str) -> Tensor:
    """(H_n / sqrt(n))^T in float32 on `device`, built once per size."""
    from qcompile.hadamard import hadamard_matrix

    return (hadamard_matrix(n, torch.float64) / math.sqrt(n)).T.contiguous().to(
        device=device, dtype=torch.float32)


def _hadamard_backward(ctx, grad: Tensor) -> Tensor:
    """y = x (H_n / sqrt(n))^T, so dL/dx = dL/dy (H_n / sqrt(n)): learn-transforms fits
    parameters through the online rotations."""
    return (grad.float() @ _dense_t(grad.shape[-1], str(grad.device)).T).to(grad.dtype)


torch.library.register_autograd("qcompile::hadamard_transform", _hadamard_backward)


# From this order on the CPU applies H_n = H_a (x) H_b as two GEMMs of n * (a + b)
# multiply-adds a row instead of one of n * n: with X = the row as [a, b], Y = H_a X H_b^T
# is one GEMM over all rows (X H_b^T, contiguous) and one batched GEMM (H_a times each
# row's [a, b]), with no transposing copy. Measured (4096 rows, 2-core Xeon, AVX512,
# median of 10): n = 256 dense 1.6 ms, two factors 3.0 ms; 384: 3.6 / 0.9-1.2 ms; 1536:
# 56 / 4.8 ms (with the two transposing copies this replaced: 11.3 ms); 4096: 418 / 52 ms.
KRON_MIN_ORDER = 384
# b = the smallest m * 2^j >= this (H_n = H_pow2 (x) H_m): the batched GEMM's rows grow with
# a, its cost per multiply-add is about twice the first GEMM's, and GEMMs with K < 32 run
# far from peak. Measured best split for 384 / 640 / 768 / 1024 / 1536 / 2048 / 5632:
# b = 48 / 40 / 48 / 32 / 48 / 32 / 44, the rule's choice each time (4096: b = 32, 64 and 128
# within 1%).
KRON_INNER_MIN = 32
# From this order on, and 2 * KRON_BLOCK_ROWS rows, KRON_BLOCK_ROWS rows at a time: both
# GEMMs of a block run on an intermediate that stays in cache instead of a whole [M, n]
# one in memory. Measured (4096 rows, 2-core AMD EPYC, AVX512, fastest of 15): n = 1536
# 9.8 -> 7.6 ms, 2048 30.8 -> 22.2, 3072 48.2 -> 32.9; 384 no gain (1.40 -> 1.46).
KRON_BLOCK_MIN_ORDER = 1024
KRON_BLOCK_ROWS = 256


def kron_split(n: int) -> tuple[int, int]:
    """(a, b) with n = a * b, a a power of two and H_n = H_a (x) H_b: Sylvester's H_pow2 is a
    Kronecker power of H_2 and qcompile.hadamard builds H_n as H_pow2 (x) H_m, so every
    such split gives H_n itself."""
    from qcompile.hadamard import hadamard_factor

    b = hadamard_factor(n)[1]  # m
    while b < KRON_INNER_MIN and n // b > 1:
        b *= 2
    return n // b, b


@functools.lru_cache(maxsize=16)
def _kron(n: int, device: str) -> tuple[Tensor, Tensor]:
    """H_a / sqrt(n) and H_b^T in float32 (kron_split(n))."""
    from qcompile.hadamard import hadamard_matrix

    a, b = kron_split(n)
    ha = hadamard_matrix(a, torch.float64) / math.sqrt(n)
    bt = hadamard_matrix(b, torch.float64).T.contiguous()
    return (ha.to(device=device, dtype=torch.float32),
            bt.to(device=device, dtype=torch.float32))


@hadamard_transform.impl("cpu", runs_on=on_cpu)
def _(x):
    """The C++ butterfly kernel (kernels/hadamard_cpu.py) for the sizes it runs faster
    (fwht_suits), else hadamard_blas."""
    from qcompile.lowering.kernels import hadamard_cpu

    if x.dtype not in _LOW_PRECISION:
        return hadamard_transform.run("reference", (x,))
    if hadamard_cpu.fwht_suits(x.shape[-1]) and hadamard_cpu.fwht_cpu_available():
        return hadamard_cpu.hadamard_transform_fwht(x)
    return hadamard_blas(x)


def hadamard_blas(x: Tensor) -> Tensor:
    """hadamard_transform as BLAS matmuls with cached float32 factors (they beat an FWHT of
    ~2 log2(n) + m small torch ops by far: those were 84% of a w4a8 LLaMA forward): below
    KRON_MIN_ORDER (or with no power-of-two factor) one GEMM with H / sqrt(n); from it the
    two factors."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).to(torch.float32)
    if n < KRON_MIN_ORDER or kron_split(n)[0] == 1:
        y = rows @ _dense_t(n, str(x.device))
        return y.reshape(x.shape).to(x.dtype)
    ha, bt = _kron(n, str(x.device))
    a, b, t = ha.shape[0], bt.shape[0], rows.shape[0]
    blocked = t >= 2 * KRON_BLOCK_ROWS and n >= KRON_BLOCK_MIN_ORDER
    step = KRON_BLOCK_ROWS if blocked else max(t, 1)  # blocked: the intermediate stays in cache
    y = torch.empty(t, a, b, dtype=torch.float32, device=x.device)
    for i in range(0, t, step):
        block = rows[i:i + step]
        r = block.shape[0]
        torch.matmul(ha, (block.reshape(r * a, b) @ bt).reshape(r, a, b), out=y[i:i + r])
    return y.reshape(x.shape).to(x.dtype)


@hadamard_transform.impl("triton", runs_on=triton_runs_on)
def _(x):
    """The fast Walsh-Hadamard transform kernel (lowering/kernels/hadamard.py)."""
    if x.dtype not in _LOW_PRECISION:
        return hadamard_transform.run("reference", (x,))
    from qcompile.lowering.kernels.hadamard import hadamard_transform_triton

    return hadamard_transform_triton(x).contiguous()


# Graph targets: the OpOverloads (what Inductor and fake-tensor propagation expect).
QUANTIZE = quantize.overload
DEQUANTIZE = dequantize.overload
LINEAR_INT8 = linear_int8.overload
LINEAR_W4A8 = linear_w4a8.overload
LINEAR_W4A8_GROUPED = linear_w4a8_grouped.overload
LINEAR_INT8_DQ = linear_int8_dq.overload
LINEAR_DYNAMIC = linear_dynamic.overload
LINEAR_W4A16 = linear_w4a16.overload
ADD_INT8 = add_int8.overload
REQUANT_INT8 = requant_int8.overload
QUANTIZE_ABSMAX = quantize_absmax.overload
ATTENTION_INT8 = attention_int8.overload
ATTENTION_INT8_Q = attention_int8_q.overload
HADAMARD = hadamard_transform.overload
# every op that requantizes an accumulator per channel (compute-dyadic fills its q, shift);
# lowering/a16_ops.py adds linear_a16w8 when it is declared
from qcompile.lowering.conv_ops import CONV2D_INT8  # noqa: E402

REQUANT_OPS = (LINEAR_INT8, LINEAR_W4A8, LINEAR_W4A8_GROUPED, CONV2D_INT8)

# The int16- and int4-activation ops (lowering/a16_ops.py, lowering/a4_ops.py, which build
# on this module) are declared whenever these are, and reachable here like every other op:
# ops.LINEAR_A16W8, ops.LINEAR_A4W4_DYNAMIC, ... (a module __getattr__, since either may be
# the module imported first, this one inside it).
import qcompile.lowering.a4_ops  # noqa: E402, F401
import qcompile.lowering.a16_ops  # noqa: E402, F401

_MODULE_OF = {
    **dict.fromkeys(("quantize_int16", "linear_a16w8", "linear_a16w8_dq", "QUANTIZE_INT16",
                     "LINEAR_A16W8", "LINEAR_A16W8_DQ"), "a16_ops"),
    **dict.fromkeys(("quantize_per_token_int4", "quantize_int4_groups", "linear_a4w4_dynamic",
                     "linear_a4w4_grouped_dynamic", "QUANTIZE_PER_TOKEN_INT4",
                     "QUANTIZE_INT4_GROUPS", "LINEAR_A4W4_DYNAMIC",
                     "LINEAR_A4W4_GROUPED_DYNAMIC"), "a4_ops"),
}


def __getattr__(name: str):
    if name in _MODULE_OF:
        import importlib

        return getattr(importlib.import_module(f"qcompile.lowering.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
