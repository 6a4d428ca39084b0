"""Integer-only GELU, LayerNorm and attention softmax as quantized ops (I-BERT).

What: the float islands between integer ops, in integer arithmetic (the arithmetic itself
is written once, in qcompile/numerics/ibert.py; this file declares the ops and binds
their implementations, lowering/registry.py):

  gelu_int8                 int8 -> i-GELU (second-order erf polynomial) -> dyadic -> int8
  layernorm_int8            int8 -> integer mean / variance, i-sqrt, integer gamma and beta,
                            one rounding shift -> int8
  linear_residual_layernorm_int8
                            LayerNorm(linear(x) + residual) with the GEMM's int32
                            accumulator and the residual added at a fine scale, as I-BERT
                            (an int8 residual stream costs BERT-style models dearly)
  attention_int8_isoftmax   int8 q, k, v -> int32 Q K^T -> dyadic rescale to fixed-unit
                            logits -> i-exp softmax (16-bit probabilities) -> integer P V
                            -> dequantized like attention_int8 (same signature)

The one float operation left is attention's final dequantization (as in attention_int8)
and the conversion of a float additive mask to integer logit units. Additive mask values
at or below ibert.MASKED = -2**40 (in logit units) hide a key, as -inf does.

Implementations: "reference" (ibert.py's torch integer code; attention in int64),
"cpu" (the same code: element-wise ops fused by Inductor on large inputs; attention's
integer matmuls exact in float64, every value an integer below 2**53; the fused op's GEMM
on the CPU integer path), "triton" (lowering/kernels/int_nonlinear.py; the fused op runs
the generated int8 GEMM with an int32 epilogue, the residual rescale in torch integer
ops, then the LayerNorm kernel). All give identical integers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from qcompile.lowering.device import triton_runs_on
from qcompile.lowering.ops import _elementwise, _rows, accumulate_epilogue, attention_fake, gemm_op
from qcompile.lowering.registry import on_cpu, quantized_op
from qcompile.numerics import ibert
from qcompile.numerics.dyadic import rounding_shift_unchecked
from qcompile.numerics.ibert import (
    LOGIT_BITS,
    MASKED,
    SOFTMAX_BITS,
    GeluParams,
    LayerNormParams,
    fit_multiplier,
    integer_mask,
)

_FUSE_MIN_ELEMENTS = 1 << 18


# ---------------------------------------------------------------- i-GELU


@quantized_op
def gelu_int8(x: Tensor, in_zp: int, up: int, q_b: int, q_c: int, q_one: int, q: int,
              shift: int, out_zp: int, qmin: int, qmax: int) -> Tensor:
    """int8 -> int8 GELU, integer only: i-GELU of (x - in_zp) << up, then
    clamp(round_half_away(g * q / 2**shift) + out_zp). Constants from ibert.gelu_params."""


@gelu_int8.fake
def _(x, *params):
    return torch.empty_like(x, dtype=torch.int8)


@gelu_int8.impl("reference")
def _(x, *params):
    return ibert.gelu(x, GeluParams(*params))


def _gelu_body(x, *params):
    return ibert.gelu(x, GeluParams(*params))


@gelu_int8.impl("cpu", runs_on=on_cpu)
def _(x, *params):
    return _elementwise(_gelu_body, x.numel() >= _FUSE_MIN_ELEMENTS, x, *params)


@gelu_int8.impl("triton", runs_on=triton_runs_on)
def _(x, *params):
    from qcompile.lowering.kernels.int_nonlinear import gelu_int8_triton

    return gelu_int8_triton(x, GeluParams(*params))


# ---------------------------------------------------------------- LayerNorm with i-sqrt


@quantized_op
def layernorm_int8(x: Tensor, gamma: Tensor, beta: Tensor, in_zp: int, eps: int, f: int,
                   frac: int, shift: int, out_zp: int, qmin: int, qmax: int) -> Tensor:
    """int8 [..., C] -> int8 LayerNorm over C, integer only (constants:
    ibert.layernorm_params)."""


@layernorm_int8.fake
def _(x, *params):
    return torch.empty_like(x, dtype=torch.int8)


@layernorm_int8.impl("reference")
def _(x, *params):
    return ibert.layernorm(x, LayerNormParams(*params))


@layernorm_int8.impl("triton", runs_on=triton_runs_on)
def _(x, *params):
    from qcompile.lowering.kernels.int_nonlinear import layernorm_int8_triton

    return layernorm_int8_triton(x, LayerNormParams(*params))


def _residual_layernorm(backend, x, w, bias, zp_term, acc_q, acc_shift, r, r_zp, r_q, r_shift,
                        bound, gamma, beta, eps, f, frac, shift, out_zp, qmin, qmax,
                        origin=""):
    values = {k: v for k, v in (("bias", bias), ("zp_term", zp_term)) if v is not None}
    epilogue = accumulate_epilogue(bias is not None, zp_term is not None)
    acc = backend.gemm(_rows(x), w, epilogue, origin, **values)  # int32 [M, N]
    h = ibert.residual_sum(acc, acc_q, acc_shift, _rows(r), r_zp, r_q, r_shift, bound)
    p = LayerNormParams(gamma, beta, 0, eps, f, frac, shift, out_zp, qmin, qmax)
    if backend.name == "triton":
        from qcompile.lowering.kernels.int_nonlinear import layernorm_int8_triton

        y = layernorm_int8_triton(h, p)
    else:
        y = ibert.layernorm(h, p)
    return y.reshape(*x.shape[:-1], w.shape[0])


@gemm_op(_residual_layernorm, epilogue=lambda a: accumulate_epilogue(a["bias"] is not None,
                                                                    a["zp_term"] is not None))
@quantized_op
def linear_residual_layernorm_int8(
    x: Tensor, w: Tensor, bias: Tensor | None, zp_term: Tensor | None, acc_q: Tensor,
    acc_shift: Tensor, r: Tensor, r_zp: int, r_q: int, r_shift: int, bound: int,
    gamma: Tensor, beta: Tensor, eps: int, f: int, frac: int, shift: int, out_zp: int,
    qmin: int, qmax: int,
) -> Tensor:  # fmt: skip
    """LayerNorm(x @ w^T + b + r) for int8 x [..., K], w [N, K], residual r int8 [..., N]
    -> int8, I-BERT's post-norm block end: the GEMM's int32 accumulator is never rounded
    to int8; it and r meet at a fine scale (ibert.residual_sum), then integer LayerNorm
    (layernorm_int8's algorithm, wide input). Constants: passes/integer_nonlinear.py."""


@linear_residual_layernorm_int8.fake
def _(x, w, *rest):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int8)


# ---------------------------------------------------------------- attention, i-softmax


class IsoftmaxConstants(NamedTuple):
    q: Tensor  # int64 [Hq]: dyadic multiplier from Q K^T to logits in units 2**-13
    shift: Tensor  # int64 [Hq]
    out_scale: Tensor  # float32 [Hq]: v_scale * 2**-16, rounded to float32 once
    group: int


def isoftmax_constants(q, k, q_scale, k_scale, v_scale, sm_scale) -> IsoftmaxConstants:
    """Host side, from the float scales (what a compiler folds): per q head h the logit
    multiplier q_scale k_scale sm_scale 2**13 as (q, shift), bounded for |QK| <= D 2**14."""
    from qcompile.lowering.kernels.attention import _scales

    c, vs, group = _scales(q, k, q_scale, k_scale, v_scale, sm_scale)
    max_acc = q.shape[-1] << 14
    pairs = [fit_multiplier(float(m) * 2.0**LOGIT_BITS, max_acc) for m in c.tolist()]
    return IsoftmaxConstants(torch.tensor([p[0] for p in pairs], dtype=torch.int64),
                             torch.tensor([p[1] for p in pairs], dtype=torch.int64),
                             (vs * 2.0**-SOFTMAX_BITS).to(torch.float32), group)


def _isoftmax_attention(q, k, v, q_scale, k_scale, v_scale, attn_mask, causal, sm_scale,
                        out_dtype, exact: str) -> Tensor:
    """The torch path; `exact` "int64" (reference) or "float64" (cpu: the same integers)."""
    from qcompile.lowering.kernels.attention import _check

    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    cst = isoftmax_constants(q, k, q_scale, k_scale, v_scale, sm_scale)
    kk = k.repeat_interleave(cst.group, dim=1)  # [B, Hq, Sk, D]
    vv = v.repeat_interleave(cst.group, dim=1)
    dt = torch.int64 if exact == "int64" else torch.float64
    dev = q.device if dt == torch.float64 else torch.device("cpu")  # no int64 GEMM on CUDA
    s = (q.to(dev, dt) @ kk.to(dev, dt).transpose(-1, -2)).to(q.device, torch.int64)
    head = (slice(None), None, None)
    z = rounding_shift_unchecked(s * cst.q.to(q.device)[head], cst.shift.to(q.device)[head])
    visible = torch.ones((B, Hq, Sq, Sk), dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
    mask = integer_mask(attn_mask, (B, Hq, Sq, Sk), q.device)
    if mask is not None:
        visible = visible & (mask > MASKED)
        z = z + torch.where(visible, mask, torch.zeros_like(mask))
    # [B, Hq, Sq, Sk], units 2**-16; with no key at all (Sk = 0) there is nothing to
    # normalise (and the row max needs a key): P is empty and P V gives 0, as for rows
    # whose every key is hidden
    p = ibert.softmax_probabilities(z, visible) if Sk else z
    acc = (p.to(dev, dt) @ vv.to(dev, dt)).to(q.device, torch.int64)  # [B, Hq, Sq, D]
    scale = cst.out_scale.to(q.device, torch.float64)[head]
    return (acc.to(torch.float64) * scale).to(torch.float32).to(out_dtype)


@quantized_op
def attention_int8_isoftmax(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor,
                            v_scale: Tensor, attn_mask: Tensor | None, is_causal: bool,
                            scale: float | None, out_dtype: torch.dtype) -> Tensor:
    """attention_int8 (same arguments) with I-BERT's integer softmax: logits rescaled
    dyadically to units of 2**-13, i-exp, probabilities rounded to 16 bits, P V exact in
    integers, then out = acc * v_scale * 2**-16 (float32, cast to out_dtype)."""


attention_int8_isoftmax.fake(attention_fake)


@attention_int8_isoftmax.impl("reference")
def _(*args):
    return _isoftmax_attention(*args, exact="int64")


@attention_int8_isoftmax.impl("cpu", runs_on=on_cpu)
def _(*args):
    return _isoftmax_attention(*args, exact="float64")


@attention_int8_isoftmax.impl("triton", runs_on=triton_runs_on)
def _(*args):
    from qcompile.lowering.kernels.int_nonlinear import isoftmax_attention_triton

    return isoftmax_attention_triton(*args)


GELU_INT8 = gelu_int8.overload
LAYERNORM_INT8 = layernorm_int8.overload
ATTENTION_INT8_ISOFTMAX = attention_int8_isoftmax.overload
LINEAR_RESIDUAL_LAYERNORM_INT8 = linear_residual_layernorm_int8.overload
