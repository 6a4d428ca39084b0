"""The quantized 2-D convolution ops, declared once (lowering/registry.py) with their fake
and every implementation.

A convolution is the int8 GEMM of lowering/ops.py over implicit patches: rows are the
output positions (M = B * Ho * Wo, in NHWC order), columns the output channels, and
K = C/groups * kh * kw. So each op runs the GEMM's epilogues unchanged, per output
channel, and every implementation gives the same integers:

  conv2d_int8      int8 x, int8 w -> acc -> + bias, dyadic requant per channel -> int8
  conv2d_int8_dq   the same accumulator dequantized: acc * s_x * s_w[n] + bias -> float
                   (a convolution whose output enters a float island)
  conv2d_dynamic   float x quantized per sample (symmetric int8, dynamic), int8 w,
                   acc * s_x[b] * s_w[n] + bias -> x.dtype (the w8a8 recipe)

The accumulator is acc = sum (x - in_zp) * w over each window, where positions outside
the input hold the zero point (real zero): an input zero point cannot be a precomputed
column-sum term as in the linear ops, because padding changes which taps exist at the
borders. Outputs are logical [B, N, Ho, Wo] tensors in channels-last memory (the rows of
the GEMM), in every implementation and in the fake.

Implementations: "reference" (an exact float64 convolution of the integer values,
kernels/conv.py), "cpu" (oneDNN's int8 convolution where it is exact, else the float64
route: lowering/cpu_conv.py) and "triton" (an implicit-GEMM kernel, kernels/conv.py).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile.lowering.device import triton_runs_on
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, Requantize
from qcompile.lowering.registry import on_cpu, quantized_op
from qcompile.numerics.dyadic import rounding_shift_unchecked


def conv_out_size(size, k: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _out_shape(x, w, stride, padding, dilation):
    b, _, h, wd = x.shape
    n, _, kh, kw = w.shape
    return (b, n, conv_out_size(h, kh, stride[0], padding[0], dilation[0]),
            conv_out_size(wd, kw, stride[1], padding[1], dilation[1]))


def _channels_last(x: Tensor, shape, dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=x.device,
                       memory_format=torch.channels_last)


def requant_epilogue(has_bias: bool, per_channel: bool) -> Epilogue:
    return Epilogue(((Bias(),) if has_bias else ()) + (Requantize(per_channel=per_channel),))


def dequant_epilogue(has_bias: bool) -> Epilogue:
    return Epilogue((Dequantize(out_dtype="float32", has_bias=has_bias),))


# ---------------------------------------------------------------- the shared bodies


def _conv_reference(x, w, in_zp, geom, epilogue, values, origin=""):
    from qcompile.lowering.kernels.conv import conv2d_int8_ref

    return conv2d_int8_ref(x, w, in_zp, *geom, epilogue, **values)


def _conv_cpu(x, w, in_zp, geom, epilogue, values, origin=""):
    from qcompile.lowering import cpu_conv
    from qcompile.lowering.cpu import run_epilogue
    from qcompile.lowering.epilogue import bind_operands

    acc = cpu_conv.conv_acc(x, w, in_zp, cpu_conv.ConvGeometry.of(*geom))  # channels-last
    b, n, ho, wo = acc.shape
    rows = acc.permute(0, 2, 3, 1).reshape(b * ho * wo, n)  # [M, N], a view
    v = bind_operands(epilogue, rows.shape[0], n, "cpu", values)
    y = run_epilogue(rows, epilogue, v)
    return y.view(b, ho, wo, n).permute(0, 3, 1, 2)


def _conv_triton(x, w, in_zp, geom, epilogue, values, origin=""):
    from qcompile.lowering.kernels.conv import conv2d_int8_triton

    return conv2d_int8_triton(x, w, in_zp, *geom, epilogue, origin=origin, **values)


_BODIES = {"reference": _conv_reference, "cpu": _conv_cpu, "triton": _conv_triton}
_RUNS_ON = {"reference": {}, "cpu": {"runs_on": on_cpu}, "triton": {"runs_on": triton_runs_on}}


def conv_op(body):
    """Register `body(conv, *args, origin)` as every implementation of a conv op, with
    `conv` the implementation's accumulator-plus-epilogue function."""

    def register(op):
        for name, conv in _BODIES.items():
            op.impl(name, **_RUNS_ON[name])(functools.partial(body, conv))
        return op

    return register


# ---------------------------------------------------------------- integer-only


def _requant(conv, x, w, bias, in_zp, q, shift, out_zp, qmin, qmax, stride, padding,
             dilation, groups, origin=""):
    per_channel = q.numel() > 1
    values = dict(q=q if per_channel else int(q), shift=shift if per_channel else int(shift),
                  out_zero_point=out_zp, qmin=qmin, qmax=qmax)
    if bias is not None:
        values["bias"] = bias
    return conv(x, w, in_zp, (stride, padding, dilation, groups),
                requant_epilogue(bias is not None, per_channel), values, origin)


@conv_op(_requant)
@quantized_op
def conv2d_int8(x: Tensor, w: Tensor, bias: Tensor | None, in_zp: int, q: Tensor,
                shift: Tensor, out_zp: int, qmin: int, qmax: int, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """y int8 [B, N, Ho, Wo] = requant(sum (x - in_zp) * w + bias) per output channel;
    x int8 [B, C, H, W], w int8 [N, C/groups, kh, kw], bias int32 [N] at s_x * s_w[n]."""


@conv2d_int8.fake
def _(x, w, bias, in_zp, q, shift, out_zp, qmin, qmax, stride, padding, dilation, groups):
    return _channels_last(x, _out_shape(x, w, stride, padding, dilation), torch.int8)


def _source(op, args: dict, in_zp: int, origin: str) -> str:
    """The generated convolution kernel a call runs (its epilogue, its input zero point)."""
    from qcompile.lowering.kernels.conv import generated_source

    return generated_source(op.epilogue(args), in_zp, origin)


conv2d_int8.kernel_source = lambda a, origin: _source(conv2d_int8, a, a["in_zp"], origin)
conv2d_int8.epilogue = lambda a: requant_epilogue(a["bias"] is not None,
                                                  a["q"] is not None and a["q"].numel() > 1)


# ---------------------------------------------------------------- float output


def _dequant(conv, x, w, bias, in_zp, x_scale, w_scale, out_dtype, stride, padding,
             dilation, groups, origin=""):
    values = dict(row_scale=x_scale, col_scale=w_scale.float())
    if bias is not None:
        values["float_bias"] = bias.float()
    y = conv(x, w, in_zp, (stride, padding, dilation, groups), dequant_epilogue(
        bias is not None), values, origin)
    return y.to(out_dtype)


@conv_op(_dequant)
@quantized_op
def conv2d_int8_dq(x: Tensor, w: Tensor, bias: Tensor | None, in_zp: int, x_scale: float,
                   w_scale: Tensor, out_dtype: torch.dtype, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """A static int8 convolution whose output enters a float island: the accumulator is
    dequantized, acc * s_x * s_w[n] + bias (float32, cast to out_dtype), with no
    requantization to int8 in between."""


@conv2d_int8_dq.fake
def _(x, w, bias, in_zp, x_scale, w_scale, out_dtype, stride, padding, dilation, groups):
    return _channels_last(x, _out_shape(x, w, stride, padding, dilation), out_dtype)


conv2d_int8_dq.epilogue = lambda a: dequant_epilogue(a["bias"] is not None)
conv2d_int8_dq.kernel_source = lambda a, origin: _source(conv2d_int8_dq, a, a["in_zp"], origin)


def _per_sample(family: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 x and its float32 scale per sample [B]: the per-token quantizer on the rows
    x.reshape(B, -1) (symmetric, scale = max|x[b]| / 127, round half to even)."""
    from qcompile.lowering.ops import BACKENDS

    b = x.shape[0]
    xq, scale = BACKENDS[family].per_token(x.reshape(b, math.prod(x.shape[1:])))
    return xq.reshape(x.shape), scale.reshape(b)


def _dynamic(conv, family, x, w, w_scale, bias, stride, padding, dilation, groups, origin=""):
    xq, s = _per_sample(family, x)
    b, _, ho, wo = _out_shape(x, w, stride, padding, dilation)
    values = dict(row_scale=s.float().repeat_interleave(ho * wo), col_scale=w_scale.float())
    if bias is not None:
        values["float_bias"] = bias.float()
    y = conv(xq, w, 0, (stride, padding, dilation, groups), dequant_epilogue(bias is not None),
             values, origin)
    return y.to(x.dtype)


@quantized_op
def conv2d_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                   stride: list[int], padding: list[int], dilation: list[int],
                   groups: int) -> Tensor:
    """W8A8 dynamic: x quantized per sample (symmetric int8), int8 w [N, C/g, kh, kw] with
    per-channel scales, acc * s_x[b] * s_w[n] (+ bias) in float32, cast to x.dtype."""


@conv2d_dynamic.fake
def _(x, w, w_scale, bias, stride, padding, dilation, groups):
    return _channels_last(x, _out_shape(x, w, stride, padding, dilation), x.dtype)


conv2d_dynamic.epilogue = lambda a: dequant_epilogue(a["bias"] is not None)
conv2d_dynamic.kernel_source = lambda a, origin: _source(conv2d_dynamic, a, 0, origin)
for _name, _conv in _BODIES.items():
    conv2d_dynamic.impl(_name, **_RUNS_ON[_name])(functools.partial(_dynamic, _conv, _name))


CONV2D_INT8 = conv2d_int8.overload
CONV2D_INT8_DQ = conv2d_int8_dq.overload
CONV2D_DYNAMIC = conv2d_dynamic.overload
CONV_OPS = (CONV2D_INT8, CONV2D_INT8_DQ, CONV2D_DYNAMIC)


# ---------------------------------------------------------------- pooling on int8 values


@quantized_op
def max_pool2d_int8(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                    dilation: list[int], ceil_mode: bool) -> Tensor:
    """F.max_pool2d on int8 values: each output is one of its inputs, so the scale and zero
    point pass through and max pooling commutes with quantization (monotone)."""


def _max_pool_float(x, kernel_size, stride, padding, dilation, ceil_mode):
    # float32 holds every int8 exactly, and the max of exact values is exact
    return F.max_pool2d(x.float(), kernel_size, stride, padding, dilation,
                        ceil_mode=ceil_mode).to(torch.int8)


@max_pool2d_int8.fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return _max_pool_float(x, kernel_size, stride, padding, dilation, ceil_mode)


max_pool2d_int8.impl("reference")(_max_pool_float)


# No "cpu" implementation: ATen's int8 max pooling checks its input size against the
# dtype's own maximum (torch 2.13: any input above 127 elements fails), so every device
# runs the float32 one above.


MAX_POOL2D_INT8 = max_pool2d_int8.overload


def _avg_pool_body(x, in_zp, q, shift, out_zp, qmin, qmax, kernel_size, stride):
    # window sums, exact: float32 holds every sum of int8 values over < 65793 elements
    count = kernel_size[0] * kernel_size[1]
    sums = F.avg_pool2d(x.float(), kernel_size, stride, divisor_override=1).to(torch.int64)
    y = rounding_shift_unchecked((sums - count * in_zp) * q, shift) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


@quantized_op
def avg_pool2d_int8(x: Tensor, in_zp: int, q: int, shift: int, out_zp: int, qmin: int,
                    qmax: int, kernel_size: list[int], stride: list[int]) -> Tensor:
    """Average pooling on int8 values, requantized once: y = clamp(round_half_away((sum
    over the window of x - count * in_zp) * q / 2**shift) + out_zp), count = kh * kw and
    q / 2**shift = s_in / (s_out * count) (no padding: every window is full). Global
    average pooling is the window of the whole image."""


@avg_pool2d_int8.fake
def _(x, in_zp, q, shift, out_zp, qmin, qmax, kernel_size, stride):
    return F.avg_pool2d(torch.empty_like(x, dtype=torch.float32), kernel_size, stride).to(
        torch.int8)


avg_pool2d_int8.impl("reference")(_avg_pool_body)

AVG_POOL2D_INT8 = avg_pool2d_int8.overload


# ---------------------------------------------------------------- element-wise by table


@quantized_op
def lut_int8(x: Tensor, table: Tensor) -> Tensor:
    """y = table[x + 128]: any element-wise function of an int8 value to an int8 value, as
    its 256 outputs computed at compile time (an activation between two int8 tensors:
    hardswish, SiLU, sigmoid, ...). Integer-only at run time: one lookup per element."""


@lut_int8.fake
def _(x, table):
    return torch.empty_like(x)


@lut_int8.impl("reference")
def _(x, table):
    return table[x.to(torch.int64) + 128]


LUT_INT8 = lut_int8.overload
