"""smooth: SmoothQuant per-channel scales between activations and weights.

What: for the linears reading one input x [..., K] (q/k/v share theirs), with calibrated
per-channel activation maxima a_j = max|X_j| and weight maxima w_j = max over those
linears' column j of |W|,
    s_j = a_j^alpha / w_j^(1 - alpha)           (alpha = options.smooth_alpha)
the activation is divided by s and every consumer's columns multiplied by it:
X W^T = (X diag(1/s)) (W diag(s))^T. The division is folded into the producer of x
when every reader of the producer's output is one of these linears:
    a norm            gamma <- gamma / s, beta <- beta / s (gamma = 1/s if it had none)
    a linear          its output rows and bias / s
    a gated product   u * v with u (or v) a linear read only here: that linear's rows / s
Otherwise an explicit `x * (1/s)` is inserted in front of the linears (before the
quantizer), and the report records it.
Statistics (per consumer site, float [K]): ctx.analysis["smooth_stats"][site] (tests),
ctx.state.stats[site], for site = the weight's parameter name, the layer name or
"in:<layer>"; or calibrate-qparams' ctx.analysis["calib"]["in:<layer>"].channel_range;
or insert-observers' per-channel observer of "in:<layer>" in ctx.state.observers.
A tensor, {"absmax": t} or {"min": t, "max": t}, or an observer (PerChannelAbsMaxObserver)
are accepted. A linear group with no statistics is skipped, with the reason recorded.
Why: activation outliers sit in a few channels; moving part of their range into the
weights makes both quantize well (SmoothQuant, Xiao et al. 2023). Exact in real arithmetic.
Runs in the finalize phase, after calibration. Note: per-tensor activation scales
computed from the un-smoothed ranges are stale afterwards (the per-channel ranges / s
give the new ones).
Pre: analyze-structure. Post: same function; smoothed linears record "smooth(...)"; every
node whose values were divided by s carries a `Smoothed(s)` annotation, and the explicit
multiply inherits x's quantization sites (smooth-qparams rescales those sites). A group
whose input already carries Smoothed is not smoothed again.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, is_call, tensor_val
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._shapes import (
    is_linear_input,
    last_dim_consumers,
    last_dim_producer,
    last_size,
)
from qcompile.passes._structure import (
    NORMS,
    Skips,
    WeightEditor,
    layer_name,
    linear_params,
    param_name,
    set_linear,
)


def _absmax(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().abs()
    if isinstance(value, dict):
        if value.get("absmax") is not None:
            return value["absmax"].detach().abs()
        if value.get("min") is not None and value.get("max") is not None:
            return torch.maximum(value["min"].abs(), value["max"].abs())
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return torch.maximum(value[0].abs(), value[1].abs())
    for lo, hi in (("absmax", None), ("min_val", "max_val")):
        a = getattr(value, lo, None)
        if a is not None:
            return a.detach().abs() if hi is None else torch.maximum(
                a.abs(), getattr(value, hi).abs())
    return None


def activation_absmax(ctx: PassContext, linear: Node) -> torch.Tensor | None:
    """max |x_j| of the linear's input over the calibration data, or None."""
    layer = layer_name(linear)
    keys = (param_name(linear.args[1]), layer, f"in:{layer}")
    state = ctx.state
    for source in (ctx.analysis.get("smooth_stats") or {}, getattr(state, "stats", None) or {}):
        for key in keys:
            if key in source and _absmax(source[key]) is not None:
                return _absmax(source[key])
    calib = (ctx.analysis.get("calib") or {}).get(f"in:{layer}")
    if getattr(calib, "channel_range", None) is not None:
        return _absmax(tuple(calib.channel_range))
    # insert-observers' per-channel observer, keyed "<options>|in:<layer>|channels"
    for key, obs in (getattr(state, "observers", None) or {}).items():
        if key.endswith(f"in:{layer}|channels") and getattr(obs, "count", 1):
            return _absmax(obs)
    return None


def smoothing_scales(ax: torch.Tensor, weights: list[torch.Tensor], alpha: float):
    """s [K] float64 from activation maxima [K] and the consumers' weights [N_i, K]."""
    aw = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    ax = ax.to(torch.float64)
    s = ax.clamp(min=1e-5) ** alpha / aw.clamp(min=1e-5) ** (1.0 - alpha)
    s = s.clamp(min=1e-5)
    return torch.where((ax > 0) & (aw > 0), s, torch.ones_like(s))


def _exclusive(node: Node, linears: list[Node]) -> bool:
    """Every reader of node's values (through ops that keep the last dim) is one of linears'
    inputs."""
    uses = last_dim_consumers(node)
    return bool(uses) and all(is_linear_input(u, r) and u in linears for u, r in uses)


def _normalizes_last_dim_only(norm: Node) -> bool:
    """normalized_shape is one size (the last dim's): [k], or under dynamic shapes a node
    such as x.shape[-1:] whose value is a one-element size."""
    shape = norm.args[1]
    if isinstance(shape, Node):
        shape = shape.meta.get("val")
    return isinstance(shape, (list, tuple)) and len(shape) == 1


def _fold_producer(ed: WeightEditor, x: Node, linears: list[Node], s: torch.Tensor) -> str | None:
    """Divide what produces x by s; returns how, or None when nothing can absorb it."""
    p = last_dim_producer(x)
    k = s.shape[0]
    if not _exclusive(p, linears) or last_size(p) != k:
        return None
    ann.put(x, ann.Smoothed(s))  # x's values are now x / s (smooth-qparams rescales)
    if is_call(p, *NORMS) and _normalizes_last_dim_only(p):
        like = torch.empty(0, dtype=tensor_val(p).dtype, device=tensor_val(p).device)
        gamma = ed.get64(p, 2)
        ed.set(p, 2, (gamma if gamma is not None else torch.ones_like(s)) / s, like=like,
               name=f"smooth_{p.name}_weight")
        if p.target is F.layer_norm and p.args[3] is not None:
            ed.set(p, 3, ed.get64(p, 3) / s, like=like, name=f"smooth_{p.name}_bias")
        return "norm"
    if is_call(p, F.linear):
        w, b = linear_params(ed, p)
        set_linear(ed, p, weight=w / s[:, None], bias=None if b is None else b / s)
        ann.put(p, ann.Smoothed(s))
        return "linear"
    if is_call(p, operator.mul, torch.mul) and all(isinstance(a, Node) for a in p.args):
        for factor in p.args:
            f = last_dim_producer(factor)
            if is_call(f, F.linear) and last_size(f) == k and all(
                    u is p for u, _ in last_dim_consumers(f)) and (
                    tensor_val(factor).shape == tensor_val(p).shape):
                w, b = linear_params(ed, f)
                set_linear(ed, f, weight=w / s[:, None], bias=None if b is None else b / s)
                ann.put(f, ann.Smoothed(s))
                return "gated linear"
    ann.take(x, ann.Smoothed)  # nothing absorbed 1/s: x keeps its values
    return None


def _explicit(gm: GraphModule, x: Node, linears: list[Node], s: torch.Tensor) -> None:
    inv = add_constant(gm, f"smooth_inv_scale_{x.name}", (1.0 / s).to(tensor_val(x).dtype),
                       before=linears[0])
    with gm.graph.inserting_before(linears[0]):
        scaled = gm.graph.call_function(operator.mul, (x, inv))
    ann.put(scaled, ann.Smoothed(s, explicit=True))
    if ann.site(x, "input") is not None:  # the linears now read x / s: same site, rescaled
        ann.put(scaled, ann.Sites(input=ann.site(x, "input")))
    for lin in linears:
        lin.replace_input_with(x, scaled)


@graph_pass("smooth", requires=("analyze-structure",))
def smooth(gm: GraphModule, ctx: PassContext) -> PassResult:
    alpha = ctx.options.smooth_alpha
    ed = WeightEditor(gm)
    skips = Skips(ctx, "smooth")
    explicit = Skips(ctx, "smooth", verb="scaled explicitly")
    counters = {"groups": 0, "linears": 0, "into_norm": 0, "into_linear": 0,
                "into_gated_linear": 0, "explicit": 0, "skipped": 0}
    groups: dict[Node, list[Node]] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if is_call(node, F.linear) and isinstance(node.args[0], Node):
            groups.setdefault(node.args[0], []).append(node)
    for x, linears in groups.items():
        names = "/".join(layer_name(lin) for lin in linears)
        if ann.get(x, ann.Smoothed) is not None:  # smoothed before
            continue
        found = [a for a in (activation_absmax(ctx, lin) for lin in linears) if a is not None]
        k = last_size(x)
        if not found:
            skips.add(names, "no calibration statistics (max|X_j|) for its input")
            counters["skipped"] += 1
            continue
        if any(a.shape != (k,) for a in found):
            skips.add(names, f"statistics do not have the input's {k} channels")
            counters["skipped"] += 1
            continue
        ax = torch.stack([a.to(torch.float64) for a in found]).amax(0)
        weights = [linear_params(ed, lin)[0] for lin in linears]
        s = smoothing_scales(ax, weights, alpha)
        how = _fold_producer(ed, x, linears, s)
        if how is None:
            _explicit(gm, x, sorted(linears, key=order.__getitem__), s)
            how = "explicit"
            explicit.add(names, "no producer can absorb 1/s, so x * (1/s) runs before the "
                         "quantizer")
        for lin, w in zip(linears, weights, strict=True):
            set_linear(ed, lin, weight=w * s[None, :])
            ctx.layer(layer_name(lin), "linear").transforms.append(
                f"smooth(alpha={alpha:g}, into={how})")
            counters["linears"] += 1
        counters["groups"] += 1
        counters["into_" + how.replace(" ", "_") if how != "explicit" else "explicit"] += 1
    skips.flush()
    explicit.flush()
    if ed.untied:
        ctx.note(f"smooth: gave {sorted(set(ed.untied))} a separate copy per reader")
    return PassResult(gm, modified=counters["groups"] > 0,
                      counters={k: v for k, v in counters.items() if v})
