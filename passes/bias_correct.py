"""bias-correct: each quantized linear's mean output shift, folded into its bias.

What: a linear y = x W^T + b, its weight rounded by quantize-weights to W_q (dequantized:
exactly what the integer kernel multiplies by) and its input to Q(x), is off on average,
over the calibration batches, by (per output channel, float64 [N])
    c = E[x W^T - Q(x) W_q^T] = E[x] (W - W_q)^T  +  E[x - Q(x)] W_q^T
                                 weight part          activation part
E[x] is the per-channel mean of the layer's input (insert-observers' "mean" observer, on
linear inputs when options["bias_correction"] is on); E[x - Q(x)] is the input's mean
rounding (and clipping) error under its final static scale and zero point, which exist
only once calibration ends, so calibrate-qparams measures it on a uniform sample of the
input's rows (insert-observers' "sample", SAMPLE_ROWS rows). c goes on the layer
(Layer.bias_correction); rewrite-linear adds it to the float bias before rounding that into
the int32 bias (int64 for a 16-bit input), so the integer kernel absorbs it and nothing is
added in float at run time (ops with a float epilogue take b + c as their bias). A linear
without a bias gets one. The report says, per layer, max |c| against max |b| (transforms)
and both parts (detail).
The activation part only where activations are static. Measured on all-MiniLM-L6-v2 (mean
embedding cosine; off / weight part / both): w8a8-static 0.9926 / 0.9929 / 0.9931, w4a8
0.9330 / 0.9467 / 0.9469, w4a4-static 0.9165 / 0.9148 / 0.9255 (its MSE-clipped ranges
shift the mean); w4a4 (per-token dynamic) 0.9056 / 0.9075, and 0.9045 with an activation
part (the calibration mean of per-token rounding errors: worse, so not taken).
Why: the rounding errors of one output channel's weights do not cancel when its input has a
non-zero mean (after GELU / ReLU, a norm with a bias), nor do an activation's rounding
errors when a channel sits in a narrow band of a per-tensor grid: the shift is systematic
(Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2, its empirical variant).
Convolutions are not corrected (their mean would be per input channel, summed over the
kernel window, where padding changes it at the borders); a note says so. Inputs smoothed
after calibration (SmoothQuant) get the weight part only, with E[x] / s.
Pre: quantize-weights (and calibrate-qparams: the means and rounding errors). Post: the
graph is unchanged; each corrected linear's Layer holds its correction; a layer whose input
saw no data keeps its bias, and its report says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant, is_call
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.sites import is_conv


def output_shift(w: torch.Tensor, qweight, mean: torch.Tensor,
                 act_error: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight part, activation part) of E[x W^T - Q(x) W_q^T], each float64 [N], for a float
    weight [N, K], its QuantizedWeight, the input's per-channel mean E[x] [K] and its mean
    rounding error E[x - Q(x)] [K] (None: no activation part, zeros)."""
    wq = qweight.dequantize(torch.float64)  # [N, K]: what the kernel multiplies by
    weight = (w.double() - wq) @ mean.double()
    act = wq @ act_error.double() if act_error is not None else torch.zeros_like(weight)
    return weight, act


@graph_pass("bias-correct", requires=("quantize-weights",))
def bias_correct(gm: GraphModule, ctx: PassContext) -> PassResult:
    calib = ctx.analysis.get("calib", {})
    counters = {"corrected": 0, "activation_part": 0, "bias_added": 0, "no_mean": 0,
                "convolutions": 0}
    for node in gm.graph.nodes:
        layer = ann.selected(node)
        if layer is None or layer.qweight is None:
            continue
        if is_conv(node):
            counters["convolutions"] += 1
            continue
        if not is_call(node, F.linear):
            continue
        rec = ctx.layer(layer.name, "linear")
        site = calib.get(ann.site(node.args[0], "input"))
        if site is None or site.mean is None:
            rec.detail["bias_correction"] = "its input saw no calibration data: not corrected"
            counters["no_mean"] += 1
            continue
        # the rounding error was measured at the recipe's width: not for a widened input
        act_error = site.act_error if site.bits != 16 else None
        weight, act = output_shift(get_constant(gm, node.args[1]), layer.qweight, site.mean,
                                   act_error)
        layer.bias_correction = c = weight + act
        b = get_constant(gm, node.args[2])
        short, text = _describe(float(c.abs().max()),
                                None if b is None else float(b.abs().max()))
        rec.transforms.append(f"bias-correct({short})")
        parts = (f"weight part max {float(weight.abs().max()):.3g}, activation part "
                 + (f"max {float(act.abs().max()):.3g}" if act_error is not None else
                    "none (" + _no_act_part(ctx, site) + ")"))
        rec.detail["bias_correction"] = f"{text}; {parts}"
        counters["corrected"] += 1
        counters["activation_part"] += act_error is not None
        counters["bias_added"] += b is None
    if counters["convolutions"]:
        ctx.note(f"bias-correct: {counters['convolutions']} convolution(s) not corrected "
                 "(linears only)")
    return PassResult(gm, modified=False, counters=counters)


def _no_act_part(ctx: PassContext, site) -> str:
    act = ctx.options.recipe_obj.act
    if act is None:
        return "float activations"
    if act.dynamic:
        return "per-token activations: it did not help there"
    if site.bits == 16:
        return "a 16-bit input"
    return "no row sample under these parameters (a smoothed input, or an older file)"


def _describe(top: float, bmax: float | None) -> tuple[str, str]:
    """The correction against the bias: (for the transforms list, for the layer's detail)."""
    if bmax is None:
        return f"max {top:.2g}, bias added", f"max |correction| {top:.3g} (no bias: one added)"
    if bmax == 0:
        return f"max {top:.2g}", f"max |correction| {top:.3g} (the bias was all 0)"
    r = top / bmax
    return (f"max {top:.2g} = {r:.2g} x max|b|",
            f"max |correction| {top:.3g} = {r:.3g} x max |bias| {bmax:.3g}")
