"""smooth-qparams: static activation parameters that smoothing invalidated, recomputed.

What: smooth and learn-transforms turn some activations x into (x - z) / s per channel (the
input of smoothed linears, and the outputs of the producers that absorbed it) and mark those
nodes with a `Smoothed(s, shift=z)` annotation. Their quantization sites were calibrated before
smoothing; with the per-channel ranges [lo_j, hi_j] that calibration kept, the range of
x~ is exactly [min_j (lo_j - z_j) / s_j, max_j (hi_j - z_j) / s_j] (s > 0). Each such node
gets a new site "<site>@smooth" with parameters from that range; GPTQ's Hessian becomes
S^-1 (H - 2(z m^T + m z^T - z z^T)) S^-1 (the Hessian of x~, m = E[x]), its mean (bias
correction) (E[x] - z) / s, and, where the row sample is still there, its mean rounding
error is measured again on the transformed rows under the new parameters. The row samples
are dropped here.
Exact for min-max observers; for MSE and percentile observers the per-channel min-max
range stands in (the report notes it).
Pre: calibrate-qparams (per-channel ranges: insert-observers adds them when smoothing or
learning is on), then smooth and / or learn-transforms. Post: every rescaled node's input /
output sites name fresh parameters; a site without per-channel ranges leaves its layers
in float, with a note.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.numerics.specs import compute_qparams
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes.calibrate_qparams import CalibSite, activation_error, activation_spec


@graph_pass("smooth-qparams", requires=("calibrate-qparams",))
def smooth_qparams(gm: GraphModule, ctx: PassContext) -> PassResult:
    calib = ctx.analysis.get("calib", {})
    spec = activation_spec(ctx)
    counters = {"sites": 0, "no_channel_ranges": 0}
    for node in gm.graph.nodes:
        smoothed = ann.get(node, ann.Smoothed)
        if smoothed is None:
            continue
        s = smoothed.divisor.to(torch.float64)
        z = smoothed.shift.to(torch.float64) if smoothed.shift is not None else None
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
                calib[new_site] = _transformed(old, s, z, spec, calib.get(new_site))
                counters["sites"] += 1
            setattr(ann.get(node, ann.Sites), role, new_site)
    for site in calib.values():  # the row samples have served: memory, not statistics
        site.rows = None
    if ctx.options.observer_name != "minmax" and counters["sites"]:
        ctx.note(f"smooth-qparams: smoothed sites use per-channel min-max ranges, not the "
                 f"{ctx.options.observer_name!r} observer")
    return PassResult(gm, modified=False, counters=counters)


def _transformed(old: CalibSite, s: torch.Tensor, z: torch.Tensor | None, spec,
                 loaded: CalibSite | None) -> CalibSite:
    """The statistics of x~ = (x - z) / s from those of x."""
    shift = torch.zeros_like(s) if z is None else z
    lo, hi = ((t.to(torch.float64) - shift) / s for t in old.channel_range)
    scale, zp = compute_qparams(lo.min(), hi.max(), spec)
    hessian = None
    if old.hessian is not None:  # H = 2/n sum x x^T; for x - z it is H - 2(z m^T + m z^T - z z^T)
        h = old.hessian.double()
        if z is not None:
            if old.mean is None:
                raise ValueError("smooth-qparams: a shifted input's Hessian needs its mean "
                                 "(insert-observers keeps it when smoothing searches)")
            m = old.mean.double()
            h = h - 2 * (torch.outer(z, m) + torch.outer(m, z) - torch.outer(z, z))
        inv = 1.0 / s
        hessian = (h * inv[:, None] * inv[None, :]).to(old.hessian.dtype)
    mean = (old.mean - shift) / s if old.mean is not None else None
    act_error = loaded.act_error if loaded is not None else None  # a loaded quantization's
    if old.rows is not None and old.act_error is not None:  # bias correction's activation part
        act_error = activation_error(((old.rows.double() - shift) / s).float(), float(scale),
                                     int(zp), spec)
    # max |x~|: the 16-bit scale choose-precision offers (without it a smoothed input was
    # never a 16-bit candidate)
    absmax = max(abs(float(lo.min())), abs(float(hi.max())))
    # the shrinkage of the Hessian before the transform: how much its rows say is unchanged
    return CalibSite(scale=float(scale), zero_point=int(zp), channel_range=(lo, hi),
                     hessian=hessian, hessian_shrinkage=old.hessian_shrinkage, seen=True,
                     absmax=absmax, mean=mean, act_error=act_error)
