"""smooth-qparams: static activation parameters that smoothing invalidated, recomputed.

What: smooth divides some activations by per-channel scales s (the input of smoothed
linears, and the outputs of the producers that absorbed 1/s) and marks those nodes with
a `Smoothed(s)` annotation. Their quantization sites were calibrated before smoothing;
with the per-channel ranges [lo_j, hi_j] that calibration kept, the range of x / s is
exactly [min_j lo_j / s_j, max_j hi_j / s_j] (s > 0). Each such node gets a new site
"<site>@smooth" with parameters from that range; GPTQ's Hessian of a smoothed input
becomes S^-1 H S^-1 (the Hessian of x / s), and its mean (bias correction) E[x] / s.
Exact for min-max observers; for MSE and percentile observers the per-channel min-max
range stands in (the report notes it).
Pre: smooth, calibrate-qparams (per-channel ranges: insert-observers adds them when
smoothing is on). Post: every rescaled node's input / output sites name fresh
parameters; a site without per-channel ranges leaves its layers in float, with a note.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.numerics.specs import compute_qparams
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes.calibrate_qparams import CalibSite, activation_spec


@graph_pass("smooth-qparams", requires=("smooth", "calibrate-qparams"))
def smooth_qparams(gm: GraphModule, ctx: PassContext) -> PassResult:
    calib = ctx.analysis.get("calib", {})
    spec = activation_spec(ctx)
    counters = {"sites": 0, "no_channel_ranges": 0}
    for node in gm.graph.nodes:
        smoothed = ann.get(node, ann.Smoothed)
        if smoothed is None:
            continue
        s = smoothed.divisor.to(torch.float64)
        for role in ("input", "output"):
            site = ann.site(node, role)
            if site is None or site.endswith("@smooth") or site not in calib:
                continue
            old = calib[site]
            new_site = f"{site}@smooth"
            if old.channel_range is None:
                ctx.note(f"smooth-qparams: {site!r} has no per-channel ranges; its layers "
                         "stay in float")
                calib[new_site] = CalibSite(seen=False)
                counters["no_channel_ranges"] += 1
            else:
                lo, hi = (t.to(torch.float64) / s for t in old.channel_range)
                scale, zp = compute_qparams(lo.min(), hi.max(), spec)
                hessian = None
                if old.hessian is not None:
                    inv = (1.0 / s).to(old.hessian.dtype)
                    hessian = old.hessian * inv[:, None] * inv[None, :]
                mean = old.mean / s if old.mean is not None else None
                calib[new_site] = CalibSite(float(scale), int(zp), (lo, hi), hessian, True,
                                            mean=mean)
                counters["sites"] += 1
            setattr(ann.get(node, ann.Sites), role, new_site)
    if ctx.options.observer_name != "minmax" and counters["sites"]:
        ctx.note(f"smooth-qparams: smoothed sites use per-channel min-max ranges, not the "
                 f"{ctx.options.observer_name!r} observer")
    return PassResult(gm, modified=False, counters=counters)
