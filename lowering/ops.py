"""Quantized ops as `torch.library` custom ops (namespace `qcompile`), with fake impls.

The rewrite passes put these ops in the graph; each takes an `impl` string chosen by the
`lower` pass: "triton" (generated Triton kernels: compiled on CUDA, the interpreter on
CPU tensors), "cpu" (torch._int_mm and integer epilogues in torch), or "reference" (the
exact int64 reference: the simulated path the others are checked against). All three
give identical integers for the same quantization parameters. Because they are custom
ops with fake implementations, a lowered graph still propagates shapes symbolically and
can be handed to Inductor, which treats them as opaque calls.

Integer-only ops (no float anywhere between int8 input and int8 output):
  linear_int8      int8 x int8 -> int32 -> bias, input zero point, dyadic requant -> int8
  linear_w4a8      int8 x packed int4 -> the same epilogue -> int8
  requant_int8     int8 -> int8 at another scale (replaces dequantize -> quantize)
  add_int8         two int8 tensors, each side rescaled dyadically, one rounding -> int8
Boundary ops (float islands start and end here):
  linear_int8_dq   int8 x int8 -> int32 -> dequantized to float (output enters a float
                   island: no requantization to int8 needed)
  quantize         float -> int8 (static per-tensor scale, round half to even)
  dequantize       int8 -> float
Float-output ops:
  attention_int8   int8 q, k, v -> fused attention with a float softmax -> float
  linear_dynamic   per-token dynamic int8 activations, int8 weights, float epilogue
  linear_w4a16     int4 group-wise weights dequantized in the kernel, float activations
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qcompile.lowering.device import inside_compiler
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize
from qcompile.numerics.dyadic import rounding_shift

IMPLS = ("triton", "cpu", "reference")
_LIB = "qcompile"
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


def _quantize_body(x, scale, zero_point, qmin, qmax):
    # numerics.specs.quantize's arithmetic: float32 true division, round half to even
    y = torch.round(x.float() / scale.float()) + zero_point
    return y.clamp(qmin, qmax).to(torch.int8)


def _requant_body(x, in_zp, q, shift, out_zp, qmin, qmax):
    y = rounding_shift((x.to(torch.int64) - in_zp) * q, shift) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


def _per_token_body(x, qmax, eps):
    # numerics.specs.dynamic_per_token_qparams + quantize: scale = max(-min, max) / qmax
    # over the row (the range stretched to include 0), at least eps; round half to even
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = (torch.maximum(-lo, hi) / qmax).clamp(min=eps)
    q = torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale.squeeze(-1)


def _add_body(a, b, a_zp, b_zp, qa, qb, s, out_zp, qmin, qmax):
    pa = (a.to(torch.int64) - a_zp) * qa
    pb = (b.to(torch.int64) - b_zp) * qb
    y = rounding_shift(pa + pb, s) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; known: {list(IMPLS)}")


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]


def _gemm(impl: str, a: Tensor, w: Tensor, epilogue: Epilogue, origin: str, **values):
    """One int8 GEMM [M, K] x [N, K]^T with an epilogue, by the chosen implementation."""
    if impl == "triton":
        from qcompile.lowering.gemm import gemm_int8

        return gemm_int8(a.contiguous(), w, epilogue, origin=origin, **values)
    if impl == "cpu":
        from qcompile.lowering.cpu import cpu_gemm_int8

        return cpu_gemm_int8(a, w, epilogue, **values)
    from qcompile.lowering.reference import gemm_int8_ref

    return gemm_int8_ref(a, w, epilogue, **values)


# ---------------------------------------------------------------- boundary: float <-> int8


@torch.library.custom_op(f"{_LIB}::quantize", mutates_args=())
def quantize(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int, impl: str) -> Tensor:
    """int8 = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), in float32."""
    _check_impl(impl)
    if impl == "triton":
        from qcompile.lowering.kernels.quantize import quantize_per_tensor_triton

        bits = 4 if qmax <= 7 else 8
        return quantize_per_tensor_triton(x.contiguous(), scale, zero_point, bits=bits)
    if impl == "reference":
        from qcompile.numerics.specs import QuantSpec
        from qcompile.numerics.specs import quantize as quantize_spec

        spec = QuantSpec(bits=4 if qmax <= 7 else 8, symmetric=zero_point == 0)
        return quantize_spec(x, torch.tensor(scale), torch.tensor(zero_point), spec)
    return _elementwise(_quantize_body, x.numel() >= _FUSE_MIN_ELEMENTS, x,
                        torch.tensor(scale, dtype=torch.float32), zero_point, qmin, qmax)


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax, impl):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op(f"{_LIB}::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> Tensor:
    """(q - zero_point) * scale in float32, cast to dtype."""
    return ((q.float() - zero_point) * torch.tensor(scale, dtype=torch.float32)).to(dtype)


@dequantize.register_fake
def _(q, scale, zero_point, dtype):
    return torch.empty_like(q, dtype=dtype)


# ---------------------------------------------------------------- integer-only ops


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


def dynamic_epilogue(has_bias: bool) -> Epilogue:
    """The epilogue of linear_dynamic: per-token x per-channel scales, float32 out."""
    return Epilogue((Dequantize(out_dtype="float32", has_bias=has_bias),))


def _requant_values(bias, zp_term, q, shift, out_zp, qmin, qmax) -> dict:
    per_channel = q.numel() > 1
    values = dict(q=q if per_channel else int(q), shift=shift if per_channel else int(shift),
                  out_zero_point=out_zp, qmin=qmin, qmax=qmax)
    if bias is not None:
        values["bias"] = bias
    if zp_term is not None:
        values["zp_term"] = zp_term
    return values


@torch.library.custom_op(f"{_LIB}::linear_int8", mutates_args=())
def linear_int8(x: Tensor, w: Tensor, bias: Tensor | None, zp_term: Tensor | None, q: Tensor,
                shift: Tensor, out_zp: int, qmin: int, qmax: int, impl: str,
                origin: str) -> Tensor:
    """y int8 [..., N] = requant(x int8 [..., K] @ w int8 [N, K]^T - zp_term + bias)."""
    _check_impl(impl)
    epilogue = requant_epilogue(bias is not None, zp_term is not None, q.numel() > 1)
    values = _requant_values(bias, zp_term, q, shift, out_zp, qmin, qmax)
    y = _gemm(impl, _rows(x), w, epilogue, origin, **values)
    return y.reshape(*x.shape[:-1], w.shape[0])


@linear_int8.register_fake
def _(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, impl, origin):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int8)


@torch.library.custom_op(f"{_LIB}::linear_w4a8", mutates_args=())
def linear_w4a8(x: Tensor, w_packed: Tensor, bias: Tensor | None, zp_term: Tensor | None,
                q: Tensor, shift: Tensor, out_zp: int, qmin: int, qmax: int, impl: str,
                origin: str) -> Tensor:
    """linear_int8 with int4 weights packed two per byte along K (uint8 [N, K // 2])."""
    _check_impl(impl)
    rows = _rows(x)
    if impl == "triton" or zp_term is not None:
        # the Triton W4A8 kernel has no input zero-point step: unpack and use the int8 GEMM
        from qcompile.numerics.specs import unpack_int4

        w = unpack_int4(w_packed)
        return linear_int8(x, w, bias, zp_term, q, shift, out_zp, qmin, qmax, impl, origin)
    from qcompile.lowering.kernels import w4

    qv = q if q.numel() > 1 else int(q)
    sv = shift if shift.numel() > 1 else int(shift)
    fn = w4.w4a8_gemm_requant_cpu if impl == "cpu" else w4.w4a8_gemm_requant_ref
    y = fn(rows, w_packed, qv, sv, out_zp, bias, qmin, qmax)
    return y.reshape(*x.shape[:-1], w_packed.shape[0])


@linear_w4a8.register_fake
def _(x, w_packed, bias, zp_term, q, shift, out_zp, qmin, qmax, impl, origin):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]), dtype=torch.int8)


@torch.library.custom_op(f"{_LIB}::add_int8", mutates_args=())
def add_int8(a: Tensor, b: Tensor, a_zp: int, b_zp: int, qa: int, sa: int, qb: int, sb: int,
             out_zp: int, qmin: int, qmax: int) -> Tensor:
    """y = clamp(round_half_away((a - a_zp) * qa / 2**sa + (b - b_zp) * qb / 2**sb) + zp).

    Both sides are brought to the larger shift s = max(sa, sb) so the sum is rounded once:
    |a - a_zp| <= 255 and q < 2**31 leave 23 bits of headroom in int64 for the alignment;
    `add_multipliers` (which computes qa, sa, qb, sb) keeps |sa - sb| <= 23.
    """
    s = max(sa, sb)
    big = a.numel() >= _FUSE_MIN_ELEMENTS
    return _elementwise(_add_body, big, a, b, a_zp, b_zp, qa << (s - sa), qb << (s - sb), s,
                        out_zp, qmin, qmax)


@add_int8.register_fake
def _(a, b, a_zp, b_zp, qa, sa, qb, sb, out_zp, qmin, qmax):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.int8,
                       device=a.device)


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


@torch.library.custom_op(f"{_LIB}::requant_int8", mutates_args=())
def requant_int8(x: Tensor, in_zp: int, q: int, shift: int, out_zp: int, qmin: int,
                 qmax: int) -> Tensor:
    """int8 -> int8 at another scale: clamp(round_half_away((x - in_zp) * q / 2**shift)
    + out_zp): the integer-only replacement of dequantize -> quantize."""
    return _elementwise(_requant_body, x.numel() >= _FUSE_MIN_ELEMENTS, x, in_zp, q, shift,
                        out_zp, qmin, qmax)


@requant_int8.register_fake
def _(x, in_zp, q, shift, out_zp, qmin, qmax):
    return torch.empty_like(x, dtype=torch.int8)


# ---------------------------------------------------------------- float-output ops


@torch.library.custom_op(f"{_LIB}::linear_dynamic", mutates_args=())
def linear_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, impl: str,
                   origin: str) -> Tensor:
    """W8A8 dynamic: per-token symmetric int8 x, int8 w [N, K] with per-channel scales,
    acc * x_scale[m] * w_scale[n] (+ bias) in float32, cast to x.dtype."""
    _check_impl(impl)
    from qcompile.lowering.kernels.quantize import quantize_per_token_ref, quantize_per_token_triton

    rows = _rows(x)
    if impl == "cpu":
        from qcompile.numerics.specs import SCALE_EPS

        xq, x_scale = _elementwise(_per_token_body, rows.numel() >= _FUSE_MIN_ELEMENTS, rows,
                                   127.0, SCALE_EPS)
    else:
        quant = quantize_per_token_triton if impl == "triton" else quantize_per_token_ref
        xq, x_scale = quant(rows.contiguous() if impl == "triton" else rows)
    epilogue = dynamic_epilogue(bias is not None)
    values = dict(row_scale=x_scale.float(), col_scale=w_scale.float())
    if bias is not None:
        values["float_bias"] = bias.float()
    y = _gemm(impl, xq, w, epilogue, origin, **values)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


@linear_dynamic.register_fake
def _(x, w, w_scale, bias, impl, origin):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op(f"{_LIB}::linear_w4a16", mutates_args=())
def linear_w4a16(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None,
                 group_size: int, bias: Tensor | None, impl: str) -> Tensor:
    """Float x [..., K] times int4 group-wise weights, dequantized inside the kernel."""
    _check_impl(impl)
    from qcompile.lowering.kernels import w4

    fn = {"triton": w4.w4a16_gemm_triton, "cpu": w4.w4a16_gemm_cpu,
          "reference": w4.w4a16_gemm_ref}[impl]
    rows = _rows(x)
    y = fn(rows.contiguous() if impl == "triton" else rows, w_packed, scales, zeros,
           group_size, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_packed.shape[0])


@linear_w4a16.register_fake
def _(x, w_packed, scales, zeros, group_size, bias, impl):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


@torch.library.custom_op(f"{_LIB}::linear_int8_dq", mutates_args=())
def linear_int8_dq(x: Tensor, w: Tensor, bias: Tensor | None, zp_term: Tensor | None,
                   x_scale: float, w_scale: Tensor, out_dtype: torch.dtype, impl: str,
                   origin: str) -> Tensor:
    """A static int8 linear whose output enters a float island: the int32 accumulator
    (minus the input zero-point term) is dequantized, acc * s_x * s_w[n] + bias, with no
    requantization to int8 in between (there is no integer consumer to requantize for)."""
    _check_impl(impl)
    values = dict(row_scale=x_scale, col_scale=w_scale.float())
    if bias is not None:
        values["float_bias"] = bias.float()
    if zp_term is not None:
        values["zp_term"] = zp_term
    epilogue = dequant_epilogue(bias is not None, zp_term is not None)
    y = _gemm(impl, _rows(x), w, epilogue, origin, **values)
    return y.to(out_dtype).reshape(*x.shape[:-1], w.shape[0])


@linear_int8_dq.register_fake
def _(x, w, bias, zp_term, x_scale, w_scale, out_dtype, impl, origin):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- attention


@torch.library.custom_op(f"{_LIB}::quantize_absmax", mutates_args=())
def quantize_absmax(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-tensor quantization: (int8 round_half_even(x / s), s) with
    s = max|x| / qmax (float32), for attention inputs under the dynamic recipe."""
    from qcompile.numerics.specs import SCALE_EPS

    scale = (x.detach().abs().amax().float() / qmax).clamp(min=SCALE_EPS)
    q = torch.round(x.float() / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale


@quantize_absmax.register_fake
def _(x, qmax):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::attention_int8", mutates_args=())
def attention_int8(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor,
                   v_scale: Tensor, attn_mask: Tensor | None, is_causal: bool,
                   scale: float | None, out_dtype: torch.dtype, impl: str) -> Tensor:
    """softmax(scale * Q K^T + mask) V on int8 q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D]:
    int32 Q K^T, dequantization and softmax scale folded into one multiplier, float
    softmax, P V with P in float16 (lowering/kernels/attention.py)."""
    _check_impl(impl)
    from qcompile.lowering.kernels import attention as att

    if impl == "cpu":
        return _attention_cpu(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale,
                              out_dtype)
    fn = {"triton": att.quantized_attention_triton,
          "reference": att.quantized_attention_ref}[impl]
    return fn(q, k, v, q_scale, k_scale, v_scale, causal=is_causal, attn_mask=attn_mask,
              sm_scale=scale, out_dtype=out_dtype)


def _attention_cpu(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype):
    """The CPU path: the int8 values dequantized exactly (int8 * scale, float32) into
    PyTorch's fused CPU attention, which computes the same function, softmax(scale * Q K^T
    + mask) V, on those quantized inputs without materialising [B, H, Sq, Sk] temporaries
    in eager ops (the float64 reference does; it is the check, not the fast path)."""
    import torch.nn.functional as F

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


def attention_fake(q, k, v, q_scale, k_scale, v_scale, attn_mask, is_causal, scale, out_dtype,
                   impl):
    """Shapes of every quantized attention op: q [B, Hq, Sq, D], v [B, Hkv, Sk, Dv]."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)


attention_int8.register_fake(attention_fake)


# Graph targets: the OpOverloads (what Inductor and fake-tensor propagation expect).
QUANTIZE = torch.ops.qcompile.quantize.default
DEQUANTIZE = torch.ops.qcompile.dequantize.default
LINEAR_INT8 = torch.ops.qcompile.linear_int8.default
LINEAR_W4A8 = torch.ops.qcompile.linear_w4a8.default
LINEAR_INT8_DQ = torch.ops.qcompile.linear_int8_dq.default
LINEAR_DYNAMIC = torch.ops.qcompile.linear_dynamic.default
LINEAR_W4A16 = torch.ops.qcompile.linear_w4a16.default
ADD_INT8 = torch.ops.qcompile.add_int8.default
REQUANT_INT8 = torch.ops.qcompile.requant_int8.default
QUANTIZE_ABSMAX = torch.ops.qcompile.quantize_absmax.default
ATTENTION_INT8 = torch.ops.qcompile.attention_int8.default
REQUANT_OPS = (LINEAR_INT8, LINEAR_W4A8)
