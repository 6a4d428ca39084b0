"""Weight quantization for linear weights [N, K]: round-to-nearest and GPTQ.

Both return a QuantizedWeight: int8 values (int4 values in [-8, 7] for 4 bits; pack them
with .packed()), float32 scales and int32 zero points in the shapes QuantSpec documents
(per_channel: [N]; per_group: [N, K // group_size], group j = columns j*g .. j*g+g-1 of
the ORIGINAL column order; per_tensor: []). Every integer comes from specs.quantize.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes one column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ||X W^T - X Q^T||^2 (H = 2/n X^T X, from HessianObserver).
With U the upper Cholesky factor of H^-1, column i's error e = (w_i - q_i) / U[i, i]
updates the remaining columns j > i by -e * U[i, j]. Updates are applied lazily: inside a
block of columns at once, to the columns after the block once per block (one matmul).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qcompile.numerics import _checks
from qcompile.numerics.specs import (
    SCALE_EPS,
    QuantSpec,
    _dequantize,
    _expand,
    _quantize,
    compute_qparams,
    dequantize,
    pack_int4,
    reduce_min_max,
    weight_spec,
)

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized linear weight: dequantize() ~= the float weight it came from."""

    qweight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32, shape per spec.granularity (see module docstring)
    zero_point: torch.Tensor  # int32, same shape as scale
    spec: QuantSpec
    # float32 [N] where spec.group_levels is set: scale[n, j] = row_scale[n] * an integer
    # in 1..group_levels (group_mult), rounded to float32
    row_scale: torch.Tensor | None = None

    def __post_init__(self):
        fn = "QuantizedWeight"
        spec = _checks.quant_spec(fn, self.spec)
        q = _checks.tensor(fn, "qweight", self.qweight)
        if q.dtype != torch.int8 or q.dim() != 2:
            raise TypeError(f"{fn}: qweight must be an int8 tensor [N, K], got {q.dtype} "
                            f"{tuple(q.shape)}")
        _checks.floating(fn, "scale", self.scale, data=False)
        _checks.integer(fn, "zero_point", self.zero_point, data=False)
        _expand(fn, "scale", self.scale, q.shape, spec)
        _expand(fn, "zero_point", self.zero_point, q.shape, spec)
        if (self.row_scale is None) != (spec.group_levels is None):
            raise ValueError(f"{fn}: row_scale goes with a spec of group_levels, and only "
                             f"with one (group_levels={spec.group_levels})")
        if self.row_scale is not None:
            _checks.floating(fn, "row_scale", self.row_scale, data=False)
            if tuple(self.row_scale.shape) != (q.shape[0],):
                raise ValueError(f"{fn}: row_scale must be [N] = [{q.shape[0]}], got "
                                 f"{tuple(self.row_scale.shape)}")

    @property
    def group_mult(self) -> torch.Tensor | None:
        """int8 [N, K // group_size]: each group's scale over its row's (spec.group_levels),
        in 1..group_levels; None for other weights."""
        if self.row_scale is None:
            return None
        return torch.round(self.scale / self.row_scale[:, None]).to(torch.int8)

    def int_values(self) -> torch.Tensor:
        """int8 [N, K]: the integers the GEMM multiplies at one scale per row (int_scale):
        qweight, times its group's multiplier where spec.group_levels is set (less its
        group's zero point first, for an asymmetric weight)."""
        mult = self.group_mult
        if mult is None:
            return self.qweight
        g = self.spec.group_size
        q = self.qweight.to(torch.int16)
        if not self.spec.symmetric:
            q = q - self.zero_point.to(torch.int16).repeat_interleave(g, dim=1)
        return (q * mult.repeat_interleave(g, dim=1)).to(torch.int8)

    def int_scale(self) -> torch.Tensor:
        """float32 [N] per-row (or [] per-tensor) scale of int_values(); for a per-group
        weight without group_levels there is none (its GEMM needs one accumulator per
        group), a ValueError."""
        if self.row_scale is not None:
            return self.row_scale
        if self.spec.granularity == "per_group":
            raise ValueError("a per-group weight without group_levels has no single scale per "
                             "row: its integer GEMM needs one accumulator per group")
        return self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero_point, self.spec, dtype)

    def packed(self) -> torch.Tensor:
        """uint8 [N, K // 2]: two int4 values per byte along K (specs.pack_int4 layout)."""
        if self.spec.bits > 4:
            raise ValueError(f"only weights of <= 4 bits pack two per byte, not {self.spec.bits}")
        return pack_int4(self.qweight)


def _check_weight(fn: str, w: torch.Tensor, spec: QuantSpec) -> None:
    """A float weight [N, K] with finite values (a scan of the weight, once, when it is
    quantized) and a spec that weights take."""
    _checks.floating(fn, "w", w)
    if w.dim() != 2:
        raise ValueError(f"{fn}: w must be a float weight [N, K], got shape {tuple(w.shape)}")
    _checks.quant_spec(fn, spec)
    if spec.granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"{fn}: spec granularity must be one of {', '.join(WEIGHT_GRANULARITIES)} for a "
            f"weight, got {spec.granularity} (one scale per output row is per_channel with "
            "axis 0)"
        )
    if spec.granularity == "per_channel" and spec.axis not in (0, -2):
        raise ValueError(f"{fn}: weight per_channel scales are per output row (spec axis 0), "
                         f"not {spec.axis}")
    if spec.granularity == "per_group" and w.shape[1] % spec.group_size != 0:
        raise ValueError(
            f"{fn}: group_size {spec.group_size} does not divide the input dimension "
            f"K={w.shape[1]}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fn}: w holds inf or NaN")


def _row_clip(fn: str, clip: torch.Tensor | None, w: torch.Tensor,
              spec: QuantSpec) -> torch.Tensor | None:
    """clip [N] float32 in (0, 1], checked (per-tensor weights take none)."""
    if clip is None:
        return None
    clip = _checks.floating(fn, "clip", _checks.tensor(fn, "clip", clip)).float()
    if clip.shape != (w.shape[0],) or spec.granularity == "per_tensor":
        raise ValueError(f"{fn}: clip must be one ratio per output row, shape "
                         f"[{w.shape[0]}], of a per-channel or per-group weight; got "
                         f"{tuple(clip.shape)} for {spec.granularity}")
    if not bool(((clip > 0) & (clip <= 1)).all()):
        raise ValueError(f"{fn}: clip ratios must be in (0, 1]")
    return clip


def _clipped_qparams(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None):
    """min-max parameters of w, each row's range scaled by its clip ratio first; with
    group_levels, (scale, zero_point, row_scale) (see leveled_scales), else row_scale None."""
    lo, hi = reduce_min_max(w, spec)  # [N] or [N, K // g]
    if clip is not None:
        c = clip.to(lo.device).reshape(-1, *([1] * (lo.dim() - 1)))
        lo, hi = lo * c, hi * c
    if spec.group_levels is None:
        return (*weight_qparams(lo, hi, spec), None)
    row = on_row_grid(weight_qparams(lo, hi, spec)[0], spec.group_levels)[1]
    return (*grid_qparams(lo, hi, spec, row), row)


def grid_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, row: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) [N, G] of groups with ranges [lo, hi] [N, G] on their rows' grid
    row [N] (spec.group_levels): weight_qparams' scales moved up onto the grid
    (leveled_scales); an asymmetric group's zero point then comes from its leveled scale,
    zero_point = clamp(qmin - round(lo / scale)), so that its range still fits."""
    scale, zero_point = weight_qparams(lo, hi, spec)
    scale = leveled_scales(scale, row, spec.group_levels)
    if not spec.symmetric:
        lo = lo.float().clamp(max=0.0)
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
        zero_point = zero_point.to(torch.int32)
    return scale, zero_point


def weight_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's (scale, zero_point) for its range [lo, hi]: compute_qparams, except that a
    symmetric weight uses both ends of the two's-complement range: scale = max(-lo / -qmin,
    hi / qmax), so a range whose larger end is negative reaches qmin (-8 of int4) instead
    of wasting that level (as llama.cpp's Q4_0 does). all-MiniLM-L6-v2, int4 groups of 32
    on the row's grid: the layers' output error on the calibration rows 4% lower, RTN and
    GPTQ alike. Activations keep scale = absmax / qmax (their kernels compute it so)."""
    if not spec.symmetric:
        return compute_qparams(lo, hi, spec)
    scale, zero_point = compute_qparams(lo, hi, spec)  # checks; zero points 0
    lo = lo.float().clamp(max=0.0)
    hi = hi.float().clamp(min=0.0)
    scale = torch.maximum(-lo / -spec.qmin, hi / spec.qmax).clamp(min=SCALE_EPS)
    return scale, zero_point


def on_row_grid(scale: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group scales [N, G] on their row's grid, the row scales [N]): each row's scale is
    its largest group scale over `levels` (leveled_scales)."""
    row = scale.amax(dim=1) / levels
    return leveled_scales(scale, row, levels), row


def leveled_scales(scale: torch.Tensor, row: torch.Tensor, levels: int) -> torch.Tensor:
    """Group scales [N, G] moved onto their row's grid: row [N] times the smallest integer
    in 1..levels that covers the group's own scale (rounding up: a group's range never
    shrinks, except where a scale exceeds row * levels, which clips at that)."""
    m = torch.ceil(scale / row[:, None] * (1 - 1e-6)).clamp(1, levels)
    return (row[:, None] * m).float()


def quantize_weight_rtn(w: torch.Tensor, spec: QuantSpec | None = None, *,
                        clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with min-max scales; spec defaults to int8 per output channel.

    Every element is within scale / 2 of its dequantized value, unless clip [N] (ratios in
    (0, 1], one per output row: clip_search) shrinks a row's ranges, and the values beyond
    them saturate.
    """
    fn = "quantize_weight_rtn"
    spec = spec or weight_spec(8)
    _check_weight(fn, w, spec)
    return _rtn(w, spec, _row_clip(fn, clip, w, spec))


def _rtn(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None) -> QuantizedWeight:
    """quantize_weight_rtn's arithmetic on a checked weight and clip."""
    fn = "quantize_weight_rtn"
    scale, zero_point, row = _clipped_qparams(w, spec, clip)
    s = _expand(fn, "scale", scale, w.shape, spec)
    z = _expand(fn, "zero_point", zero_point, w.shape, spec)
    return QuantizedWeight(_quantize(w, s, z, spec), scale, zero_point, spec, row)


CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5


def clip_search(w: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None,
                ratios: tuple[float, ...] = CLIP_RATIOS, damp: float = 0.1) -> torch.Tensor:
    """Per output row, the clip ratio (of `ratios`) whose round-to-nearest weight gives the
    layer the least output error: d H d^T for the row's error d = w - Q(w) and the input's
    Hessian H [K, K] (HessianObserver: the error of x w^T over the calibration rows), damped
    by damp * mean(diag H) * |d|^2 so that a Hessian of few rows (rank below K) cannot pick
    a clip that only suits them; |d|^2 without one. float32 [N]. Rows are independent
    (their scales are), so each keeps its own best; ratio 1.0 (min-max) wins ties. (The
    clipping search of GPTQ's reference quantizer and of OmniQuant's learnable weight
    clipping, as a grid search.)"""
    fn = "clip_search"
    _check_weight(fn, w, spec)
    if spec.granularity == "per_tensor":
        raise ValueError(f"{fn}: a per-tensor weight has no per-row ranges to clip")
    w = w.detach().float()
    h = None if H is None else H.detach().to(w.device, torch.float32)
    if h is not None:
        h = h + torch.eye(h.shape[0], device=w.device) * (damp * float(h.diagonal().mean()))
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    clip = torch.ones(w.shape[0], device=w.device)
    for r in sorted(ratios, reverse=True):
        c = torch.full_like(clip, r)
        d = w - _rtn(w, spec, c).dequantize()  # w checked once, above
        err = (d @ h * d).sum(1) if h is not None else d.pow(2).sum(1)
        better = err < best * (1 - 1e-6)
        best = torch.where(better, err, best)
        clip = torch.where(better, c, clip)
    return clip


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so H^-1 = U^T U."""
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(
            f"GPTQ: the damped Hessian is not positive definite (damp={damp}); "
            "use a larger damp or more calibration data"
        )
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True)


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec | None = None,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip: torch.Tensor | None = None,
    group_search: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize a linear weight w [N, K] given the Hessian H [K, K] of its input.

    clip [N]: each row's ranges scaled by its ratio in (0, 1] before its parameters are
    chosen (clip_search), as quantize_weight_rtn does.
    damp: fraction of mean(diag H) added to the diagonal (numerical stability).
    act_order: quantize columns in order of descending diag(H) (most important first).
      The result is returned in the original column order, and group parameters still
      belong to the original column groups: a group's scale and zero point are chosen
      when the first of its columns is reached, from the current (error-updated) values
      of all its columns. Without act_order this is standard GPTQ's group behaviour.
    group_search: a group's range is its current min-max times the ratio of CLIP_RATIOS
      (and, on the row's grid, the integer multiplier) with the least error
      sum_j H[j, j] (w_j - Q(w_j))^2 over the group's columns j, row by row, instead of
      its min-max (times the row's clip): the range search of GPTQ's reference quantizer
      (its `mse` option), weighted by how much each column's input carries.
    Dead inputs (H[i, i] == 0: the column never sees a nonzero input) get weight 0.
    Per-channel / per-tensor parameters come from the (dead-zeroed) weight before any
    update. Deterministic: float64 throughout, no randomness.
    """
    fn = "gptq_quantize"
    spec = spec or weight_spec(8)
    _check_weight(fn, w, spec)
    n, k = w.shape
    H = _checks.real(fn, "H", _checks.tensor(fn, "H", H))
    if H.shape != (k, k):
        raise ValueError(f"{fn}: H, the Hessian, must be [K, K] = [{k}, {k}] for weight "
                         f"{tuple(w.shape)}, got {tuple(H.shape)}")
    damp = _checks.real_arg(fn, "damp", damp, lo=0.0)
    block_size = _checks.int_arg(fn, "block_size", block_size, lo=1)
    _checks.bool_arg(fn, "act_order", act_order)
    _checks.bool_arg(fn, "group_search", group_search)
    if group_search and (clip is not None or spec.granularity != "per_group"):
        raise ValueError(f"{fn}: group_search chooses each group's range itself: it takes a "
                         f"per_group spec and no clip (got {spec.granularity}, clip "
                         f"{'given' if clip is not None else 'None'})")
    clip = _row_clip(fn, clip, w, spec)
    weight = w.detach().to(torch.float64).clone()  # [N, K]
    h = H.detach().to(device=weight.device, dtype=torch.float64).clone()  # [K, K]
    if not torch.isfinite(h).all():
        raise ValueError(f"{fn}: Hessian H has inf or NaN entries")

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # any positive value: these columns are zero and see no input
    weight[:, dead] = 0.0

    row = None
    if spec.granularity == "per_group":
        g = spec.group_size
        scale = torch.empty(n, k // g, dtype=torch.float32, device=weight.device)
        zero_point = torch.empty(n, k // g, dtype=torch.int32, device=weight.device)
        group_ready = [False] * (k // g)
        if spec.group_levels is not None:  # the rows' grid, from the weight before updates
            row = _clipped_qparams(weight.float(), spec, clip)[2]
    else:
        scale, zero_point, _ = _clipped_qparams(weight.float(), spec, clip)
    # Per column the parameters are a vector over rows (or one scalar).
    col_spec = spec if spec.granularity == "per_tensor" else _row_spec(spec)

    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=weight.device)
    inv_perm = torch.argsort(perm)
    weight = weight[:, perm]
    u = _inverse_hessian_factor(h[perm][:, perm], damp)  # [K, K] upper triangular
    perm_list = perm.tolist()

    qweight = torch.empty(n, k, dtype=torch.int8, device=weight.device)  # permuted order
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = weight[:, b0:b1].clone()  # [N, B], updated in place as columns are done
        err = torch.zeros_like(block)  # [N, B] scaled errors of the block's columns
        for j in range(b1 - b0):
            i = b0 + j
            if spec.granularity == "per_group":
                gi = perm_list[i] // g
                if not group_ready[gi]:
                    cur = _current_columns(
                        weight, block, err, u, inv_perm[gi * g : (gi + 1) * g], b0, b1, j
                    )
                    if group_search:
                        hd = h.diagonal()[gi * g : (gi + 1) * g]
                        scale[:, gi], zero_point[:, gi] = _searched_group(cur, hd, spec, row)
                    else:
                        c = 1.0 if clip is None else clip.to(cur.device)
                        lo, hi = cur.amin(dim=1).float() * c, cur.amax(dim=1).float() * c
                        sg, zg = weight_qparams(lo, hi, spec) if row is None else \
                            grid_qparams(lo[:, None], hi[:, None], spec, row)
                        scale[:, gi], zero_point[:, gi] = sg.reshape(n), zg.reshape(n)
                    group_ready[gi] = True
                s, z = scale[:, gi], zero_point[:, gi]
            else:
                s, z = scale, zero_point
            col = block[:, j : j + 1]  # [N, 1]
            # parameters made above (valid by construction): the arithmetic, unchecked
            se = _expand(fn, "scale", s, col.shape, col_spec)
            ze = _expand(fn, "zero_point", z, col.shape, col_spec)
            q = _quantize(col, se, ze, col_spec)
            qweight[:, i] = q[:, 0]
            deq = _dequantize(q, se, ze, torch.float32).to(torch.float64)
            e = (col - deq)[:, 0] / u[i, i]  # [N]
            block[:, j + 1 :] -= e[:, None] * u[i, i + 1 : b1][None, :]
            err[:, j] = e
        weight[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedWeight(qweight[:, inv_perm], scale, zero_point, spec, row)


def _searched_group(cur: torch.Tensor, hd: torch.Tensor, spec: QuantSpec,
                    row: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N], zero point [N]) of one group whose current values are cur [N, g] and
    whose columns' Hessian diagonal is hd [g]: per row, the candidate range (CLIP_RATIOS of
    its min-max, all at once) with the least sum_j hd[j] (cur_j - Q(cur_j))^2
    (gptq_quantize's group_search); min-max, the first, wins ties."""
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=cur.device)[:, None]
    lo, hi = cur.amin(dim=1).float(), cur.amax(dim=1).float()
    lo, hi = lo * ratios, hi * ratios  # [R, N]
    scale, zero_point = weight_qparams(lo, hi, spec) if row is None else \
        (t.T for t in grid_qparams(lo.T, hi.T, spec, row))
    s, z = scale[:, :, None], zero_point[:, :, None]  # [R, N, 1]
    deq = _dequantize(_quantize(cur[None], s, z, spec), s, z, torch.float64)  # [R, N, g]
    err = ((cur[None] - deq).pow(2) * hd[None, None, :]).sum(2)  # [R, N]
    best = err.argmin(dim=0, keepdim=True)  # the first of equal errors
    return scale.gather(0, best)[0], zero_point.gather(0, best)[0]


def _row_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of one weight column [N, 1] quantized with one parameter pair per row."""
    return dataclasses.replace(spec, granularity="per_channel", group_size=None, axis=0,
                               group_levels=None)


def _current_columns(
    weight: torch.Tensor,
    block: torch.Tensor,
    err: torch.Tensor,
    u: torch.Tensor,
    positions: torch.Tensor,
    b0: int,
    b1: int,
    j: int,
) -> torch.Tensor:
    """Current values [N, len(positions)] of not-yet-quantized columns (permuted positions
    >= b0 + j), including the updates from block columns b0 .. b0+j-1 that columns after
    the block have not received yet (they get them lazily at the block's end)."""
    out = torch.empty(weight.shape[0], positions.numel(), dtype=weight.dtype, device=weight.device)
    for c, pos in enumerate(positions.tolist()):
        if pos < b1:
            out[:, c] = block[:, pos - b0]
        else:
            out[:, c] = weight[:, pos] - err[:, :j] @ u[b0 : b0 + j, pos]
    return out
