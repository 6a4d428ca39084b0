"""int4-activation ops (the w4a4 recipe: int4 weights, int4 per-token dynamic activations
after the online Hadamard, as QuaRot runs W4A4), declared once (lowering/registry.py) with
their fake and every implementation:

  quantize_per_token_int4  float x [..., K] -> (int4 values, float32 scale [...], int32
                           zero point [...]): symmetric per token (row), scale[m] =
                           max((max|x[m]| * clip) / 7, SCALE_EPS) in float32, q =
                           clamp(round_half_even(x / scale), -8, 7) (float32 true division):
                           ops._per_token_body's arithmetic at 4 bits, zero points 0; or
                           asymmetric (symmetric=False): the row's [min, max] * clip onto
                           [-8, 7] with a zero point per row (ops._per_token_asym_body),
                           16 levels where a one-sided row (after a GELU) had 8. packed=True:
                           two values a byte along K (specs.pack_int4's layout, uint8
                           [..., K // 2]); else int8 [..., K]
  linear_a4w4_dynamic      float x [..., K] -> per-token int4 x (at clip), int4 w (packed
                           uint8 [N, K // 2]) with per-channel scales, exact int32
                           accumulator, float epilogue acc * x_scale[m] * w_scale[n] (+ bias)
                           -> x.dtype; with w_sum (the weight rows' sums, int32 [N]) the
                           activations are asymmetric and the epilogue first removes the
                           zero points' term x_zp[m] * w_sum[n] (epilogue.RowZeroPoint),
                           exactly, in the integers
  linear_a4w4_grouped_dynamic  the same with group-wise int4 w whose group scales are
                           the row's times integers (mult), zero points (wzp) or none:
                           linear_a4w4_dynamic on (q - wzp) * mult
  quantize_int4_groups     float x [..., K] -> (int8 values q * m [..., K], float32 scale
                           [...]): int4 per token in groups along K, each group's scale the
                           row's times an integer m in [1, 15] (options
                           activation_group_size; the W4A4 linears' act_group)

The clip ratio (options["activation_clip"]; QuaRot's is 0.9, w4a4's default is measured in
qcompile/config.py): int4 has 16 levels, and a row's few largest values, even after the
Hadamard, stretch the step for all the others; with the range at clip * absmax the values
beyond it saturate at -8 / 7 and the rest are rounded on a finer grid. One op order
everywhere (specs.dynamic_per_token_qparams): clip is rounded to float32 once, absmax * clip
is rounded to float32, then divided by 7 (IEEE); clip = 1.0 multiplies exactly, so it is
the unclipped quantizer bit for bit. Graphs carry clip as the ops' last argument.

Why a float epilogue, where the design's recipe table has w4a4 requantize dyadically: a
dyadic multiplier (q, shift) is fixed at compile time from known scales, and a per-token
scale exists only at run time. So, as in linear_dynamic (W8A8) and in QuaRot (its int4
GEMM's int32 output is scaled by the token's and the channel's scale in fp16), the
accumulator of a linear whose input is quantized per token is dequantized in float, once,
and the next quantized linear quantizes its own input again, per token; the design's rule
"a linear whose output enters a float island dequantizes its int32 accumulator directly"
is what every such linear does. The integer-only 4-bit path, static per-tensor activations
with dyadic requantization, is the recipe w4a4-static.

Implementations, the same integers bit for bit, and the same float epilogue:
  reference         kernels/quantize.py's per-token reference (specs' arithmetic) and
                    reference.gemm_int8_ref on the int4 values (exact)
  cpu, cpu-<route>  the CPU per-token quantizer (ops._per_token_body, Inductor-fused when
                    large) and the CPU int8 GEMM of the route (lowering/cpu.py, via
                    ops.gemm_op): the CPU routes have no int4 GEMM, so the int4 values run
                    through the int8 GEMM as int8 integers (the same integers, the same
                    exact int32 accumulator); `prepare` unpacks the weights once, at
                    lowering. Activations are not packed: the int8 GEMM reads bytes.
  triton            the per-token kernel packs x as it quantizes it (kernels/quantize.py)
                    and the generated W4A4 GEMM (kernels/gemm_w4a4.py) reads x and w packed
The epilogue is lowering/epilogue.py's Dequantize step (ops.dynamic_epilogue, as
linear_dynamic's), after a RowZeroPoint step for asymmetric activations: applied by
reference.apply_epilogue_ref, by the CPU GEMM's epilogue, and emitted into the Triton
kernel by lowering/codegen.py, each in the op order ((float32(acc - x_zp[m] * w_sum[n]) *
x_scale[m]) * w_scale[n]) + bias[n], then one cast to x.dtype. The zero points' term is
an integer, |x_zp| <= 8 and |w_sum| <= 128 K, and acc - x_zp * w_sum is the exact
accumulator of (q - x_zp) and w, |.| <= 15 * 128 K < 2**31: every implementation computes
it exactly and rounds it to float32 once.

Range: |int4 x int4| <= 64, so the int32 accumulator is exact for K < 2**25; every
implementation holds K to the int8 GEMM's K <= 131071 (reference.check_k), the bound the
reference and CPU GEMMs it runs on enforce. K must be even (int4 packs two a byte along K;
select-layers keeps odd-K layers float).

The ops and their graph targets are also reachable as lowering.ops attributes
(ops.LINEAR_A4W4_DYNAMIC, ...).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qcompile.lowering.device import triton_runs_on
from qcompile.lowering.epilogue import Epilogue
from qcompile.lowering.ops import (
    _FUSE_MIN_ELEMENTS,
    BACKENDS,
    _elementwise,
    _grouped_weights,
    _int8_weight,
    _operand,
    _per_token_asym_body,
    _per_token_body,
    _rows,
    dynamic_epilogue,
    gemm_op,
    grouped_weight,
)
from qcompile.lowering.registry import Inline, on_cpu, quantized_op
from qcompile.numerics import specs

INT4_MAX = 7  # symmetric: scale = max|x| / 7, values in [-7, 7], clamped to [-8, 7]
_KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------- float -> int4 per token


def _check_float_rows(fn: str, x) -> None:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() < 1:
        raise TypeError(f"{fn}: x must be a floating-point tensor [..., K], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")


def _check_clip(fn: str, clip) -> None:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
        raise ValueError(f"{fn}: clip must be a number in (0, 1] (1.0: no clipping), got "
                         f"{clip!r}")


def _check_quantize(x, packed, clip, symmetric) -> None:
    fn = "quantize_per_token_int4"
    _check_float_rows(fn, x)
    _check_clip(fn, clip)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{fn}: symmetric must be a bool, got {symmetric!r}")
    if packed and x.shape[-1] % 2:
        raise ValueError(f"{fn}: packing needs an even K (two int4 values a byte), got "
                         f"K = {x.shape[-1]}")


def pack_int4_values(q: Tensor) -> Tensor:
    """int8 [..., K] of int4 values -> uint8 [..., K // 2] in specs.pack_int4's layout,
    without reading the values back to check them (an activation, packed every call):
    byte b = (q[2b] & 0xF) | (q[2b + 1] << 4), in int8 arithmetic (16 * [-8, 7] fits)."""
    return torch.bitwise_or(torch.bitwise_and(q[..., 0::2], 0xF), q[..., 1::2] * 16).view(
        torch.uint8)


def _zero_points(scale: Tensor) -> Tensor:
    """The zero points of symmetric rows: int32 zeros shaped and placed as their scales."""
    return torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)


@quantized_op
def quantize_per_token_int4(x: Tensor, packed: bool, clip: float,
                            symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic int4 per token: (q, scale float32 [...], zero point int32 [...]) for float
    x [..., K], as specs.dynamic_per_token_qparams and specs.quantize compute them in
    float32 (clip in (0, 1] rounded to float32). symmetric: scale[m] = max((max|x[m, :]| *
    clip) / 7, SCALE_EPS), zero point 0, q = clamp(round_half_even(x / scale), -8, 7);
    else the row's [min * clip, max * clip] (stretched to include 0) onto [-8, 7]: scale =
    max((hi - lo) / 15, SCALE_EPS), zero point clamp(-8 - round(lo / scale), -8, 7), q =
    clamp(round(x / scale) + zero point, -8, 7). packed: q as uint8 [..., K // 2], two values
    a byte along K (specs.pack_int4's layout; K even); else int8 [..., K]."""


@quantize_per_token_int4.fake
def _(x, packed, clip, symmetric=True):
    _check_quantize(x, packed, clip, symmetric)
    shape = (*x.shape[:-1], x.shape[-1] // 2) if packed else x.shape
    q = x.new_empty(shape, dtype=torch.uint8 if packed else torch.int8)
    return (q, x.new_empty(x.shape[:-1], dtype=torch.float32),
            x.new_empty(x.shape[:-1], dtype=torch.int32))


@quantize_per_token_int4.impl("reference")
def _(x, packed, clip, symmetric=True):
    from qcompile.lowering.kernels.quantize import (
        quantize_per_token_asym_ref,
        quantize_per_token_ref,
    )

    _check_quantize(x, packed, clip, symmetric)
    if symmetric:
        q, scale = quantize_per_token_ref(x, bits=4, clip=clip)
        zp = _zero_points(scale)
    else:
        q, scale, zp = quantize_per_token_asym_ref(x, bits=4, clip=clip)
    return (specs.pack_int4(q) if packed else q), scale, zp


@quantize_per_token_int4.impl("cpu", runs_on=on_cpu)
def _(x, packed, clip, symmetric=True):
    _check_quantize(x, packed, clip, symmetric)
    rows = _rows(x)  # [M, K]
    big = rows.numel() >= _FUSE_MIN_ELEMENTS
    # _elementwise makes the Python float clip a float32 0-d tensor: rounded as the spec
    if symmetric:
        q, scale = _elementwise(_per_token_body, big, rows, float(INT4_MAX), specs.SCALE_EPS,
                                float(clip))
        zp = _zero_points(scale)
    else:
        q, scale, zp = _elementwise(_per_token_asym_body, big, rows, -8.0, float(INT4_MAX),
                                    specs.SCALE_EPS, float(clip))
    q = q.reshape(x.shape)
    return ((pack_int4_values(q) if packed else q), scale.reshape(x.shape[:-1]),
            zp.reshape(x.shape[:-1]))


@quantize_per_token_int4.impl("triton", runs_on=triton_runs_on)
def _(x, packed, clip, symmetric=True):
    from qcompile.lowering.kernels import quantize as kernels

    _check_quantize(x, packed, clip, symmetric)
    if x.dtype not in _KERNEL_FLOATS:  # float64: the reference's x.float(), then the kernel
        x = x.float()
    if packed:
        out = kernels.quantize_per_token_int4_packed_triton(x, clip=clip, symmetric=symmetric)
        if symmetric:
            out = (*out, _zero_points(out[1]))
        return out
    if symmetric:
        q, scale = kernels.quantize_per_token_triton(x, bits=4, clip=clip)
        return q, scale, _zero_points(scale)
    return kernels.quantize_per_token_asym_triton(x, bits=4, clip=clip)


# ------------------------------------------- float -> int4 per token, in scaled groups

# A group's multiplier m is at most 15 so that its integer values q * m (|q| <= 8) fit int8
GROUP_MULT_MAX = 15


def _check_groups(x, group, clip) -> None:
    fn = "quantize_int4_groups"
    _check_float_rows(fn, x)
    _check_clip(fn, clip)
    if isinstance(group, bool) or not isinstance(group, int) or group < 2:
        raise ValueError(f"{fn}: group must be an int >= 2 (elements along K sharing a "
                         f"multiplier), got {group!r}")
    k = x.shape[-1]
    if k == 0 or k % group:
        raise ValueError(f"{fn}: K = {k} is not a positive multiple of the group size "
                         f"{group}")


def _int4_groups_core(g, qmax, mmax, eps, clip):
    # quantize_int4_groups' arithmetic on rows in groups g [..., G, group], in float32, one
    # rounding an operation: the groups' clipped absmax a[g] = max|x[g]| * clip; the row's
    # scale s = max(max_g a[g] / (qmax * mmax), eps); m[g] = clamp(ceil(a[g] / (s * qmax)),
    # 1, mmax); q = clamp(round_half_even(x / (s * m[g])), -qmax - 1, qmax); the value
    # q * m[g]. The group size is g's last dim, never an int argument: compiled with
    # dynamic shapes (ops._elementwise), an int argument became a symbol, and the size
    # K // group an unbacked one that Dynamo failed on (Gemma 3, batches of 1,024 rows)
    gf = g.float()
    a = gf.abs().amax(dim=-1, keepdim=True) * clip  # [..., G, 1]
    scale = (a.amax(dim=-2, keepdim=True) / (qmax * mmax)).clamp(min=eps)  # [..., 1, 1]
    m = torch.minimum(torch.ceil(a / (scale * qmax)).clamp(min=1.0), mmax)
    q = torch.round(gf / (scale * m)).clamp(-qmax - 1, qmax)
    return (q * m).to(torch.int8), scale.reshape(gf.shape[:-2])


def _in_groups(x: Tensor, group: int) -> Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def _int4_groups_body(x, qmax, mmax, eps, clip, *, group):
    """_int4_groups_core on x [..., K] in groups of `group`: (v [..., K], s [...])."""
    v, scale = _int4_groups_core(_in_groups(x, group), qmax, mmax, eps, clip)
    return v.reshape(x.shape), scale


def _int4_groups(x, group, clip, big):
    v, scale = _elementwise(_int4_groups_core, big, _in_groups(_rows(x), group),
                            float(INT4_MAX), float(GROUP_MULT_MAX), specs.SCALE_EPS,
                            float(clip))
    return v.reshape(x.shape), scale.reshape(x.shape[:-1])


@quantized_op
def quantize_int4_groups(x: Tensor, group: int, clip: float) -> tuple[Tensor, Tensor]:
    """Dynamic int4 per token in groups of `group` along K, each group's scale its row's
    times an integer (NVFP4's two-level scaling, in integers): (v int8 [..., K], s float32
    [...]) for float x [..., K], K a multiple of group. In float32, one rounding an
    operation: a[g] = max|x[g]| * clip (clip in (0, 1] rounded to float32), s = max(max_g
    a[g] / 105, SCALE_EPS), m[g] = clamp(ceil(a[g] / (s * 7)), 1, 15), q =
    clamp(round_half_even(x / (s * m[g])), -8, 7); v = q * m[g], so x ~ s * v. Each value
    is an int4 q and a group's multiplier (4 bits a group), and v, |v| <= 120, is the int8
    an int8 GEMM reads: the groups cost the GEMM nothing."""


@quantize_int4_groups.fake
def _(x, group, clip):
    _check_groups(x, group, clip)
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@quantize_int4_groups.impl("reference")
def _(x, group, clip):
    _check_groups(x, group, clip)
    return _int4_groups(x, group, clip, big=False)


@quantize_int4_groups.impl("cpu", runs_on=on_cpu)
def _(x, group, clip):
    _check_groups(x, group, clip)
    return _int4_groups(x, group, clip, big=x.numel() >= _FUSE_MIN_ELEMENTS)


@quantize_int4_groups.impl("triton", runs_on=triton_runs_on)
def _(x, group, clip):
    from qcompile.lowering.kernels.quantize import quantize_int4_groups_triton

    _check_groups(x, group, clip)
    if x.dtype not in _KERNEL_FLOATS:  # float64: the reference's x.float(), then the kernel
        x = x.float()
    return quantize_int4_groups_triton(x, group=group, clip=clip)


# ---------------------------------------------------------------- int4 x int4 -> float


def _check_linear(x, w, w_scale, bias, clip, w_sum=None, act_group=0) -> None:
    """Shapes, dtypes and the clip (no data is read: the fake runs it too)."""
    fn = "linear_a4w4_dynamic"
    _check_clip(fn, clip)
    if isinstance(act_group, bool) or not isinstance(act_group, int) or act_group < 0:
        raise ValueError(f"{fn}: act_group must be 0 (a scale per token) or the activations' "
                         f"group size, got {act_group!r}")
    _check_float_rows(fn, x)
    if not isinstance(w, Tensor) or w.dtype not in (torch.uint8, torch.int8) or w.dim() != 2:
        raise TypeError(f"{fn}: w must be packed int4, uint8 [N, K // 2] (or its int4 values "
                        f"as int8 [N, K] after a CPU implementation's prepare), got "
                        f"{getattr(w, 'dtype', type(w).__name__)} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    k = w.shape[1] * (2 if w.dtype == torch.uint8 else 1)
    if x.shape[-1] != k or k % 2:
        raise ValueError(f"{fn}: x has K = {x.shape[-1]} but w {tuple(w.shape)} ({w.dtype}) "
                         f"has K = {k} (K must be even)")
    if act_group and k % act_group:
        raise ValueError(f"{fn}: K = {k} is not a multiple of the activations' group size "
                         f"{act_group}")
    n = w.shape[0]
    for name, t in (("w_scale", w_scale), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a float tensor [N], got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.numel() != n:
            raise ValueError(f"{fn}: {name} must have N = {n} elements, got {tuple(t.shape)}")
    if w_sum is not None and (not isinstance(w_sum, Tensor) or w_sum.dtype != torch.int32
                              or w_sum.numel() != n):
        raise TypeError(f"{fn}: w_sum (asymmetric activations) must be the weight rows' sums, "
                        f"int32 [N = {n}], got {getattr(w_sum, 'dtype', type(w_sum).__name__)} "
                        f"{tuple(getattr(w_sum, 'shape', ()))}")
    if act_group and w_sum is not None:
        raise ValueError(f"{fn}: activations in groups (act_group = {act_group}) are "
                         f"symmetric: pass w_sum=None")


def weight_row_sums(w: Tensor) -> Tensor:
    """sum_k w[n, k] as int32 [N] for an int4 weight (packed or as int8 values): the w_sum
    of linear_a4w4_dynamic with asymmetric activations (|sum| <= 128 K fits int32)."""
    return _int8_weight(w).to(torch.int64).sum(dim=1).to(torch.int32)


def _epilogue(args: dict) -> Epilogue:
    return dynamic_epilogue(args["bias"] is not None, args["w_sum"] is not None)


def _epilogue_values(x_scale: Tensor, w_scale: Tensor, bias: Tensor | None,
                     x_zp: Tensor, w_sum: Tensor | None) -> dict:
    values = dict(row_scale=x_scale.float(), col_scale=w_scale.float().reshape(-1))
    if bias is not None:
        values["float_bias"] = bias.float().reshape(-1)
    if w_sum is not None:
        values.update(row_zero_point=x_zp.reshape(-1), col_sum=w_sum.reshape(-1))
    return values


def _quantize_rows(family: str, rows: Tensor, clip: float, w_sum, act_group: int):
    """(int8 values [M, K], scale [M], zero points [M]) of the linear's input rows: per
    token (asymmetric where w_sum is given), or in groups (quantize_int4_groups' values
    q * m, zero points 0)."""
    if act_group:
        v, scale = quantize_int4_groups.run(family, (rows, act_group, clip))
        return v, scale, _zero_points(scale)
    return quantize_per_token_int4.run(family, (rows, False, clip, w_sum is None))


def _linear_a4w4(backend, x, w, w_scale, bias, clip, w_sum=None, act_group=0, origin=""):
    """Reference and CPU: the family's int4 quantizer (int8 storage), then the backend's
    int8 GEMM on the int4 values (or the groups' q * m) with the Dequantize epilogue
    (after the row zero points' term, for asymmetric activations)."""
    _check_linear(x, w, w_scale, bias, clip, w_sum, act_group)
    family = backend.name.split("-", 1)[0]
    wq = _int8_weight(w)
    if family == "reference" and w_sum is not None and \
            not torch.equal(w_sum.to(wq.device), weight_row_sums(wq)):
        raise ValueError("linear_a4w4_dynamic: w_sum is not the weight rows' sums "
                         "(a4_ops.weight_row_sums)")
    xq, x_scale, x_zp = _quantize_rows(family, _rows(x), clip, w_sum, act_group)
    epilogue = dynamic_epilogue(bias is not None, w_sum is not None)
    y = backend.gemm(xq, wq, epilogue, origin,
                     **_epilogue_values(x_scale, w_scale, bias, x_zp, w_sum))
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _source(args: dict, origin: str) -> str:
    """The generated W4A4 kernel a call runs on CUDA (its epilogue: bias or not)."""
    from qcompile.lowering.kernels.gemm_w4a4 import generated_source

    return generated_source(_epilogue(args), origin)


@gemm_op(_linear_a4w4, epilogue=_epilogue, triton=False)
@quantized_op
def linear_a4w4_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                        clip: float, w_sum: Tensor | None = None, act_group: int = 0) -> Tensor:
    """W4A4 dynamic: x [..., K] quantized per token to int4 at clip (quantize_per_token_int4;
    clip in (0, 1], 1.0: the row's range), int4 w [N, K] packed two a byte along K (uint8
    [N, K // 2]) with per-channel scales; the exact int32 accumulator dequantized,
    ((float32(acc) * x_scale[m]) * w_scale[n]) + bias[n] in float32, cast to x.dtype.
    w_sum None: symmetric activations; else asymmetric ones (a zero point per token), and
    w_sum the weight rows' sums (int32 [N], weight_row_sums): acc - x_zp[m] * w_sum[n] is
    what is dequantized, computed exactly (int64) before the one rounding to float32.
    act_group > 0: x quantized in groups of that many along K instead
    (quantize_int4_groups at clip: int4 values times a multiplier per group, symmetric, so
    w_sum None), the GEMM on their int8 values q * m, dequantized by the row's scale.
    Implementations may hold w unpacked (int8 [N, K]) after `prepare`."""


@linear_a4w4_dynamic.fake
def _(x, w, w_scale, bias, clip, w_sum=None, act_group=0):
    _check_linear(x, w, w_scale, bias, clip, w_sum, act_group)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


linear_a4w4_dynamic.kernel_source = _source


@linear_a4w4_dynamic.impl("triton", runs_on=triton_runs_on)
def _(x, w, w_scale, bias, clip, w_sum=None, act_group=0, origin=""):
    """x packed as it is quantized, then the packed W4A4 GEMM; a weight given as int8
    values runs the int8 GEMM on the unpacked x instead (the same integers), and so do
    activations in groups (their values q * m are int8s, not int4s)."""
    from qcompile.lowering.kernels.gemm_w4a4 import gemm_w4a4_triton

    _check_linear(x, w, w_scale, bias, clip, w_sum, act_group)
    rows = _rows(x)  # [M, K]
    epilogue = dynamic_epilogue(bias is not None, w_sum is not None)
    if act_group:
        v, x_scale, x_zp = _quantize_rows("triton", rows, clip, None, act_group)
        y = BACKENDS["triton"].gemm(v, _int8_weight(w), epilogue, origin,
                                    **_epilogue_values(x_scale, w_scale, bias, x_zp, None))
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    packed = w.dtype == torch.uint8
    xq, x_scale, x_zp = quantize_per_token_int4.run("triton",
                                                    (rows, packed, clip, w_sum is None))
    values = _epilogue_values(x_scale, w_scale, bias, x_zp, w_sum)
    if packed:
        y = gemm_w4a4_triton(xq, w, epilogue, origin=origin, **values)
    else:
        y = BACKENDS["triton"].gemm(xq, w, epilogue, origin, **values)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


@quantized_op
def linear_a4w4_grouped_dynamic(x: Tensor, w: Tensor, mult: Tensor, wzp: Tensor | None,
                                w_scale: Tensor, bias: Tensor | None, clip: float,
                                w_sum: Tensor | None = None, act_group: int = 0) -> Tensor:
    """linear_a4w4_dynamic with group-wise int4 weights whose group scales are the row's
    times small integers (options group_size): w packed uint8 [N, K // 2], mult int8
    [N, K // g], wzp the groups' zero points (int8 [N, K // g]) or None, w_scale the row
    scales [N]; the integer weight (q - wzp) * mult is an int8 value
    (ops.grouped_int4_values), and the call is linear_a4w4_dynamic's on it, the same
    implementation by name (w_sum, for asymmetric activations, the sums of those int8
    values' rows). Implementations may hold w as those int8 values after `prepare`."""


@linear_a4w4_grouped_dynamic.fake
def _(x, w, mult, wzp, w_scale, bias, clip, w_sum=None, act_group=0):
    _check_linear(x, w, w_scale, bias, clip, w_sum, act_group)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _linear_a4w4_grouped(name, x, w, mult, wzp, w_scale, bias, clip, w_sum=None,
                         act_group=0, origin=""):
    return linear_a4w4_dynamic.run(
        name, (x, grouped_weight(w, mult, wzp), w_scale, bias, clip, w_sum, act_group), origin)


for _name, _impl in linear_a4w4_dynamic.impls.items():
    # the reference expands the int4 values at every call (the definition); every other
    # implementation once, at lowering
    linear_a4w4_grouped_dynamic.impl(
        _name, runs_on=_impl.runs_on,
        prepare=None if _name == "reference" else _grouped_weights)(
        functools.partial(_linear_a4w4_grouped, _name))


# ---------------------------------------------------------------- written out for Inductor

# |x_zp| <= 8 (zero points in [-8, 7]): x_zp[m] * w_sum[n] is an exact float32 integer
# while 8 * max |w_sum| <= 2**24
_ZP_MAX = 8


def _inline_plan(a: dict, impl: str):
    """W4A4 written out for Inductor (lowering/inline.py): the per-token int4 quantizer and
    the dequantizing epilogue as plain torch, so Inductor fuses the quantizer into the op
    that produces x and the epilogue into the one that reads y; the GEMM stays cpu_acc on
    the layer's route. None (the op runs as it is) where the weight is not the int8 values
    a CPU implementation prepared, the route is chosen per call, or the zero points' term
    could leave float32's exact integers."""
    from qcompile.lowering import cpu_routes
    from qcompile.lowering.cpu import F32_EXACT, inline_route

    route = inline_route(impl, a["w"])
    if route is None:
        return None
    w_sum = a["w_sum"]
    if w_sum is not None and cpu_routes.ROUTES[route].native_f32 and w_sum.numel() and \
            _ZP_MAX * int(w_sum.abs().max()) > F32_EXACT:
        return None
    # the quantizer's scalars as float32 0-d tensors, as its CPU implementation passes them
    consts = {name: torch.tensor(v) for name, v in (
        ("qmin", -8.0), ("qmax", float(INT4_MAX)), ("mmax", float(GROUP_MULT_MAX)),
        ("eps", specs.SCALE_EPS), ("clip_f32", float(a["clip"])))}
    return Inline(_a4w4_inline, consts, {"route": route}, rereads_input=True)


def _a4w4_inline(x, w, w_scale, bias, clip, w_sum, act_group, *, qmin, qmax, mmax, eps,
                 clip_f32, route):
    from qcompile.lowering.cpu import cpu_acc, dequant_body
    from qcompile.lowering.reference import apply_bound_epilogue

    rows = _rows(x)
    x_zp = None
    if act_group:
        xq, x_scale = _int4_groups_body(rows, qmax, mmax, eps, clip_f32, group=act_group)
    elif w_sum is None:
        xq, x_scale = _per_token_body(rows, qmax, eps, clip_f32)
    else:
        xq, x_scale, x_zp = _per_token_asym_body(rows, qmin, qmax, eps, clip_f32)
    acc = cpu_acc(_operand(xq, route), w, route)  # [M, N]
    if acc.dtype == torch.float32:  # exact integers; x_zp * w_sum too (_inline_plan)
        row_zp = (x_zp.float(), w_sum.float()) if x_zp is not None else (None, None)
        bias = bias.float() if bias is not None else None
        y = dequant_body(acc, None, x_scale, w_scale.float(), bias, *row_zp)
    else:  # int32: the epilogue's own integer arithmetic (x_zp * w_sum in int64)
        y = apply_bound_epilogue(acc, dynamic_epilogue(bias is not None, w_sum is not None),
                                 _epilogue_values(x_scale, w_scale, bias, x_zp, w_sum))
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _a4w4_grouped_inline(x, w, mult, wzp, w_scale, bias, clip, w_sum, act_group, **kw):
    # w: the int8 values (q - wzp) * mult, as the CPU implementations' prepare left them
    return _a4w4_inline(x, w, w_scale, bias, clip, w_sum, act_group, **kw)


linear_a4w4_dynamic.inliner("cpu")(_inline_plan)


@linear_a4w4_grouped_dynamic.inliner("cpu")
def _(a, impl):
    plan = _inline_plan(a, impl)
    return None if plan is None else Inline(_a4w4_grouped_inline, plan.constants, plan.options,
                                            rereads_input=True)


# Graph targets: the OpOverloads.
QUANTIZE_PER_TOKEN_INT4 = quantize_per_token_int4.overload
QUANTIZE_INT4_GROUPS = quantize_int4_groups.overload
LINEAR_A4W4_DYNAMIC = linear_a4w4_dynamic.overload
LINEAR_A4W4_GROUPED_DYNAMIC = linear_a4w4_grouped_dynamic.overload
