"""Fake quantization with straight-through rounding: each function dequantizes what the
recipe's integer path will compute (the same scales, zero points, rounding and clamps:
tests hold fake_weight to numerics.weights.quantize_weight_rtn), and passes gradients
through the rounding, so learn-transforms can fit clip ratios and shifts / scales through
it; sequential GPTQ rounds activations with it (no gradients needed there).
"""

from __future__ import annotations

import torch

from qcompile.numerics.specs import SCALE_EPS, QuantSpec
from qcompile.numerics.weights import on_row_grid


def ste_round(t: torch.Tensor) -> torch.Tensor:
    """round(t), with the gradient of t (round(t) - t is exact in float, so is the sum)."""
    return t + (t.round() - t).detach()


def fake_weight(w: torch.Tensor, clip: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w [N, K] round-to-nearest as numerics.weights.quantize_weight_rtn(w, spec, clip=clip)
    dequantizes it, differentiable in w and clip [N] (straight-through rounding)."""
    n, k = w.shape
    g = w.reshape(n, -1, spec.group_size) if spec.granularity == "per_group" else \
        w.reshape(n, 1, k)  # [N, G, g]
    c = clip.reshape(n, 1, 1)
    lo = (g.amin(-1, keepdim=True) * c).clamp(max=0)  # weight_qparams' full range
    hi = (g.amax(-1, keepdim=True) * c).clamp(min=0)
    if spec.symmetric:
        scale = torch.maximum(-lo / -spec.qmin, hi / spec.qmax)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = scale.clamp(min=SCALE_EPS)
    if spec.group_levels is not None:  # the row's grid (its integers carry no gradient)
        scale = on_row_grid(scale[..., 0], spec.group_levels)[0][..., None]
    if spec.symmetric:
        return (ste_round(g / scale).clamp(spec.qmin, spec.qmax) * scale).reshape(n, k)
    zp = (spec.qmin - (lo / scale).round()).clamp(spec.qmin, spec.qmax).detach()
    q = (ste_round(g / scale) + zp).clamp(spec.qmin, spec.qmax)
    return ((q - zp) * scale).reshape(n, k)


def fake_static(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """x quantized with one (scale, zero point) from its per-channel range [lo_j, hi_j], as
    smooth-qparams will compute the site's."""
    lo, hi = lo.min().clamp(max=0), hi.max().clamp(min=0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=SCALE_EPS)
    zp = (spec.qmin - (lo / scale).round()).clamp(spec.qmin, spec.qmax).detach()
    return ((ste_round(x / scale) + zp).clamp(spec.qmin, spec.qmax) - zp) * scale


def fake_token(x: torch.Tensor, bits: int, clip: float, symmetric: bool = True,
               group: int = 0) -> torch.Tensor:
    """x quantized per row (token) at run time, as the dynamic activation ops quantize it:
    symmetric, max|x| * clip / qmax; else the row's [min, max] * clip (stretched to include
    0) onto [qmin, qmax] with a zero point per row. group (int4, a K it divides): in groups
    along the row as quantize_int4_groups (fake_token_groups)."""
    if group and x.shape[-1] % group == 0:
        return fake_token_groups(x, group, clip)
    qmax = 2 ** (bits - 1) - 1
    if symmetric:
        scale = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=SCALE_EPS)
        return ste_round(x / scale).clamp(-qmax - 1, qmax) * scale
    lo = (x.amin(-1, keepdim=True) * clip).clamp(max=0)
    hi = (x.amax(-1, keepdim=True) * clip).clamp(min=0)
    scale = ((hi - lo) / (2 * qmax + 1)).clamp(min=SCALE_EPS)
    zp = (-qmax - 1 - (lo / scale).round()).clamp(-qmax - 1, qmax).detach()
    return ((ste_round(x / scale) + zp).clamp(-qmax - 1, qmax) - zp) * scale


def fake_token_groups(x: torch.Tensor, group: int, clip: float) -> torch.Tensor:
    """x as lowering/a4_ops.py's quantize_int4_groups rounds it, dequantized: int4 in groups
    of `group` along the row, each group's step the row's scale times an integer m in
    1..15 (m held fixed for the gradient, the rounding straight through)."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    a = g.abs().amax(dim=-1, keepdim=True) * clip
    scale = (a.amax(dim=-2, keepdim=True) / 105.0).clamp(min=SCALE_EPS)  # 105 = 7 * 15
    step = scale * torch.ceil(a / (scale * 7.0)).clamp(1.0, 15.0).detach()
    return (ste_round(g / step).clamp(-8, 7) * step).reshape(shape)


def fake_fixed(x: torch.Tensor, scale: float, zero_point: int, spec: QuantSpec):
    """x quantized with a site's calibrated (scale, zero point)."""
    q = (ste_round(x / scale) + zero_point).clamp(spec.qmin, spec.qmax)
    return (q - zero_point) * scale
