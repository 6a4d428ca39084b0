"""Channel-wise shift and scale between an activation and the linears that read it, chosen
by those linears' output error on calibration rows (Outlier Suppression+, Wei et al. 2023).

For an input x [..., K] read by linears y_i = x W_i^T + b_i, a per-channel shift z and
scale s > 0 give the same outputs in real arithmetic:
    x~ = (x - z) / s,     W~_i = W_i diag(s),     b~_i = b_i + W_i z
    y_i = x~ W~_i^T + b~_i
Quantization sees x~ and W~_i instead of x and W_i. Which (z, s) is best depends on the
activation quantizer (a static per-tensor range, per-token scales, none), the weight
quantizer (bits, per channel or group) and the data, so it is chosen by measuring, per
group of linears sharing x, the summed output error
    sum_i || Q_a(x~) Q_w(W~_i)^T + W_i z - x W_i^T ||^2       (mean over sampled rows)
over these candidates:
    no change                         z = 0, s = 1 (so the search never makes it worse)
    shift only                        z = (max_j + min_j) / 2, s = 1
    OS+ scales, with or without shift s_j = max(1, r_j / t), r_j the channel's half-range
                                      (after the shift) or max |x_j|, t on a geometric grid
                                      from max r down to the median r
    SmoothQuant, with or without shift s_j = r_j^alpha / max_i |W_i[:, j]|^(1 - alpha)
The channel ranges come from calibration (all the data); the rows are a uniform sample.
Why per group and by measurement: a fixed SmoothQuant alpha made all-MiniLM-L6-v2 worse
under w8a8-static (0.9931 -> 0.9909 mean cosine), since what helps one layer hurts another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.numerics.specs import QuantSpec, compute_qparams
from qcompile.passes._fake_quant import fake_token, fake_weight

ALPHAS = (0.25, 0.5, 0.75)  # SmoothQuant's migration strengths among the candidates
STEPS = 12  # OS+ thresholds t between max r and median r
MIN_GAIN = 0.01  # a candidate must cut "no change"'s output error by this fraction to win

# x~ [n, K] float32 and its per-channel range (lo, hi) [K] -> Q(x~) dequantized [n, K]
ActQuantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# W~ [N, K] float32 -> Q(W~) dequantized [N, K]
WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Migration:
    """x~ = (x - shift) / scale; scale float64 [K] > 0, shift float64 [K] or None."""

    label: str
    scale: torch.Tensor
    shift: torch.Tensor | None = None

    @property
    def identity(self) -> bool:
        return self.shift is None and bool((self.scale == 1).all())


@dataclass(frozen=True)
class Choice:
    best: Migration
    error: float  # its summed output MSE
    baseline: float  # the "no change" candidate's
    tried: int


def weight_quantizer(spec: QuantSpec) -> WeightQuantizer:
    """Round to nearest with min-max scales (and zero points, for an asymmetric spec) per
    output row or per group (on the row's grid where spec.group_levels is set), as
    quantize_weight_rtn computes them,
    without its checks (called once per candidate)."""
    def quantize(w: torch.Tensor) -> torch.Tensor:
        return fake_weight(w, torch.ones(w.shape[0], dtype=w.dtype, device=w.device), spec)
    return quantize


def static_quantizer(spec: QuantSpec) -> ActQuantizer:
    """One (scale, zero point) for the tensor from its per-channel range, as smooth-qparams
    computes the new site's."""
    def quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zp = compute_qparams(lo.min(), hi.max(), spec)
        q = ((x / scale).round() + zp).clamp(spec.qmin, spec.qmax)
        return (q - zp) * scale
    return quantize


def token_quantizer(bits: int, clip: float = 1.0, symmetric: bool = True,
                    group: int = 0) -> ActQuantizer:
    """Per-row scales (and zero points where not symmetric, or groups), the dynamic
    activation ops'."""
    def quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return fake_token(x, bits, clip, symmetric, group)
    return quantize


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.abs().amax(0) for w in weights]).amax(0)


def smoothquant_scales(a: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1 - alpha), 1 where either statistic is 0; float64 [K]."""
    a, w = a.double(), w_absmax.double()
    s = (a.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1.0 - alpha)).clamp(min=1e-5)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def candidates(lo: torch.Tensor, hi: torch.Tensor,
               weights: list[torch.Tensor]) -> list[Migration]:
    """Every candidate for an input with per-channel range [lo, hi] (float64 [K]) read by
    linears with these weights [N_i, K]; "no change" first."""
    lo, hi = lo.double(), hi.double()
    k = lo.shape[0]
    one = torch.ones(k, dtype=torch.float64)
    mid = (hi + lo) / 2
    out = [Migration("none", one), Migration("shift", one, mid)]
    w_absmax = weight_absmax([w.double() for w in weights])
    for shift, r in ((None, torch.maximum(lo.abs(), hi.abs())), (mid, (hi - lo) / 2)):
        tag = "shift, " if shift is not None else ""
        top, median = float(r.max()), float(r.median())
        if median > 0 and top > median * (1 + 1e-6):
            for i in range(1, STEPS + 1):
                t = top * (median / top) ** (i / STEPS)
                out.append(Migration(f"os+({tag}t={t:.3g})", (r / t).clamp(min=1.0), shift))
        for alpha in ALPHAS:
            out.append(Migration(f"smoothquant({tag}alpha={alpha:g})",
                                 smoothquant_scales(r, w_absmax, alpha), shift))
    return out


def output_error(m: Migration, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 weights: list[torch.Tensor], refs: list[torch.Tensor],
                 quantize_act: ActQuantizer, quantize_weight: WeightQuantizer) -> float:
    """The linears' output error under migration m, each row's squared error relative to
    that row's float output energy, averaged over rows and summed over the linears; refs[i]
    is rows @ W_i^T in float32.

    Relative per row and per linear, not absolute: a few tokens with outputs 10-100x the
    others' (an attention sink, Gemma's massive activations) would otherwise decide the
    migration for every token, and of q / k / v the output with the largest values would
    decide it for all three, although norms (q / k norms, post-norms, the next LayerNorm)
    take each row's scale away downstream. On Gemma 3 270M w8a8-static with rotations the
    absolute error's choices took perplexity from 1.043x float (no migration) to 1.068x;
    the relative error's to 1.009x."""
    s = m.scale.float()
    z = m.shift.float() if m.shift is not None else None
    z64 = z.double() if z is not None else torch.zeros_like(m.scale)
    x = rows if z is None else rows - z
    xq = quantize_act(x / s, (lo - z64) / m.scale, (hi - z64) / m.scale)
    total = 0.0
    for w, ref in zip(weights, refs, strict=True):
        y = xq @ quantize_weight(w * s).T
        if z is not None:
            y = y + w @ z
        energy = ref.pow(2).sum(-1)  # [n]
        # floor: a row whose float output is 0 (padding) weighs like a typical row's 1e-6
        energy = energy + 1e-6 * energy.mean() + torch.finfo(torch.float32).tiny
        total += float(((y - ref).pow(2).sum(-1) / energy).mean())
    return total


def choose(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
           weights: list[torch.Tensor], quantize_act: ActQuantizer,
           quantize_weight: WeightQuantizer) -> Choice:
    """The candidate with the least output error on half the rows ("no change" unless it
    beats that by MIN_GAIN there and on the other half) for
    sampled input rows [n, K], the input's calibrated per-channel range [lo, hi] [K], and
    the readers' float weights [N_i, K]."""
    rows = rows.float()
    weights = [w.float() for w in weights]
    lo, hi = lo.double(), hi.double()
    # chosen on half the rows, confirmed on the other half: a choice that only suits the
    # rows it was fitted on (few calibration rows) does not pass
    fit, held = rows[0::2], rows[1::2]

    def errors(part, ms):
        refs = [part @ w.T for w in weights]
        return [output_error(m, part, lo, hi, weights, refs, quantize_act, quantize_weight)
                for m in ms]

    found = list(zip(errors(fit, cands := candidates(lo, hi, weights)), cands, strict=True))
    error, best = min(found, key=lambda e: e[0])
    baseline = found[0][0]
    if not best.identity:
        held_best, held_base = errors(held, [best, cands[0]])
        if error > baseline * (1 - MIN_GAIN) or held_best > held_base * (1 - MIN_GAIN):
            error, best = found[0]  # not worth a transform, or it does not generalize
    return Choice(best, error, baseline, len(found))
