"""smooth: per-channel shift and scale between activations and the weights that read them.

What: for the linears reading one input x [..., K] (q/k/v share theirs), a per-channel
shift z and scale s > 0 with
    x~ = (x - z) / s,     W~ = W diag(s),     b~ = b + W z        (x W^T + b = x~ W~^T + b~)
chosen one of two ways:
  options.smooth_alpha None (the default): per group, by measurement (passes/_migration.py):
      no change, a shift only, Outlier Suppression+'s clipped scales with or without the
      shift, or SmoothQuant's scales, whichever gives the group's outputs the least error on
      the calibration rows (each row's relative to its float output, per linear:
      _migration.output_error) under the recipe's own activation and weight quantizers; a
      group where no change wins is left as it is (the report says so, with the errors);
  a number alpha in [0, 1]: SmoothQuant everywhere, no shift, with the calibrated
      per-channel maxima a_j = max|X_j| and w_j = max over the linears' column j of |W|:
      s_j = a_j^alpha / w_j^(1 - alpha).
The new input x~ is folded into the producer of x when every reader of the producer's
output is one of these linears:
    a LayerNorm       gamma <- gamma / s, beta <- (beta - z) / s
    an RMSNorm        gamma <- gamma / s (no shift: it has no beta)
    a linear          its output rows / s, its bias (b - z) / s
    a gated product   u * v with u (or v) a linear read only here: that linear's rows / s
                      (no shift)
Otherwise an explicit `x * (1/s) + (-z/s)` is inserted in front of the linears (before the
quantizer; Inductor fuses it into the quantization on CPU), and the report records it.
Statistics: the per-channel range [min_j, max_j] and (searching) the row sample of the
linears' input from calibrate-qparams (ctx.analysis["calib"]["in:<layer>"]: channel_range,
rows; a loaded quantization brings the chosen migration instead of rows); else, for the
fixed alpha, per consumer site in ctx.analysis["smooth_stats"][site] (tests) or
ctx.state.stats[site], for site = the weight's parameter name, the layer name or
"in:<layer>", or insert-observers' per-channel observer of "in:<layer>". A tensor (max|X_j|),
{"absmax": t} or {"min": t, "max": t}, or an observer are accepted. A group without the
statistics it needs is skipped, with the reason recorded.
Why: activation outliers sit in a few channels (and, after GELU or in BERT's LayerNorm
outputs, off-centre); moving part of their range into the weights, and their centre into
the bias, makes both quantize well (SmoothQuant, Xiao et al. 2023; Outlier Suppression+,
Wei et al. 2023). Exact in real arithmetic.
Runs in the finalize phase, after calibration. Note: per-tensor activation scales
computed from the untransformed ranges are stale afterwards (smooth-qparams recomputes
them from the per-channel ranges).
Pre: analyze-structure. Post: same function; transformed linears record "smooth(...)";
every node whose values became (x - z) / s carries a `Smoothed(s, shift=z)` annotation, and
the explicit op inherits x's quantization sites (smooth-qparams rescales those sites). A
group whose input already carries Smoothed is not smoothed again.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, is_call, tensor_val
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._migration import (
    Migration,
    choose,
    smoothquant_scales,
    static_quantizer,
    token_quantizer,
    weight_absmax,
    weight_quantizer,
)
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
from qcompile.passes.calibrate_qparams import activation_spec
from qcompile.passes.quantize_weights import weight_spec_for
from qcompile.sites import producer_through_layout

MIN_ROWS = 64  # calibration rows below which a search would fit noise


def _range(value) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(min_j, max_j) float64 from a statistic: a tensor or {"absmax": t} (max|X_j|, so
    (-t, t)), {"min": t, "max": t}, a (min, max) pair, or an observer; None otherwise."""
    def signed(a):
        a = a.detach().abs().double()
        return -a, a

    if isinstance(value, torch.Tensor):
        return signed(value)
    if isinstance(value, dict):
        if value.get("absmax") is not None:
            return signed(value["absmax"])
        if value.get("min") is not None and value.get("max") is not None:
            return value["min"].detach().double(), value["max"].detach().double()
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0].detach().double(), value[1].detach().double()
    if getattr(value, "absmax", None) is not None:
        return signed(value.absmax)
    if getattr(value, "min_val", None) is not None:
        return value.min_val.detach().double(), value.max_val.detach().double()
    return None


def activation_range(ctx: PassContext, linear: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (min, max) of the linear's input over the calibration data, or None."""
    layer = layer_name(linear)
    keys = (param_name(linear.args[1]), layer, f"in:{layer}")
    state = ctx.state
    for source in (ctx.analysis.get("smooth_stats") or {}, getattr(state, "stats", None) or {}):
        for key in keys:
            if key in source and _range(source[key]) is not None:
                return _range(source[key])
    calib = (ctx.analysis.get("calib") or {}).get(f"in:{layer}")
    if getattr(calib, "channel_range", None) is not None:
        return _range(tuple(calib.channel_range))
    # insert-observers' per-channel observer, keyed "<options>|in:<layer>|channels"
    for key, obs in (getattr(state, "observers", None) or {}).items():
        if key.endswith(f"in:{layer}|channels") and getattr(obs, "count", 1):
            return _range(obs)
    return None


def activation_absmax(ctx: PassContext, linear: Node) -> torch.Tensor | None:
    """max |x_j| of the linear's input over the calibration data, or None."""
    found = activation_range(ctx, linear)
    return None if found is None else torch.maximum(found[0].abs(), found[1].abs())


def smoothing_scales(ax: torch.Tensor, weights: list[torch.Tensor], alpha: float):
    """s [K] float64 from activation maxima [K] and the consumers' weights [N_i, K]."""
    return smoothquant_scales(ax, weight_absmax(weights), alpha)


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


def absorber(x: Node, linears: list[Node], shifted: bool) -> tuple[str, Node] | None:
    """What can make x's values (x - z) / s for these linears, its readers: ("norm", the
    norm), ("linear", the linear producing x) or ("gated linear", the linear factor of a
    gated product; no shift), else None (only an explicit op could)."""
    p = last_dim_producer(x)
    k = last_size(x)
    if not _exclusive(p, linears) or last_size(p) != k:
        return None
    if is_call(p, *NORMS) and _normalizes_last_dim_only(p) and (
            not shifted or p.target is F.layer_norm):
        return "norm", p
    if is_call(p, F.linear):
        return "linear", p
    if not shifted and is_call(p, operator.mul, torch.mul) and all(
            isinstance(a, Node) for a in p.args):
        for factor in p.args:
            f = last_dim_producer(factor)
            if is_call(f, F.linear) and last_size(f) == k and all(
                    u is p for u, _ in last_dim_consumers(f)) and (
                    tensor_val(factor).shape == tensor_val(p).shape):
                return "gated linear", f
    return None


def fold_producer(ed: WeightEditor, x: Node, linears: list[Node], m: Migration) -> str | None:
    """Make what produces x compute (x - z) / s (absorber); returns how, or None when
    nothing can. x (and a linear that absorbed it) carry Smoothed(s, shift=z) after."""
    found = absorber(x, linears, m.shift is not None)
    if found is None:
        return None
    how, p = found
    s, z = m.scale, m.shift
    shift = torch.zeros_like(s) if z is None else z
    smoothed = ann.Smoothed(s, shift=z)
    ann.put(x, smoothed)  # x's values are now (x - z) / s (smooth-qparams rescales)
    if how == "norm":
        like = torch.empty(0, dtype=tensor_val(p).dtype, device=tensor_val(p).device)
        gamma = ed.get64(p, 2)
        ed.set(p, 2, (gamma if gamma is not None else torch.ones_like(s)) / s, like=like,
               name=f"smooth_{p.name}_weight")
        if p.target is F.layer_norm and (z is not None or p.args[3] is not None):
            beta = ed.get64(p, 3) if p.args[3] is not None else torch.zeros_like(s)
            ed.set(p, 3, (beta - shift) / s, like=like,
                   name=f"smooth_{p.name}_bias")
    else:  # a linear's output rows (its bias too), or a gated product's linear factor's
        w, b = linear_params(ed, p)
        if b is None and z is not None:
            b = torch.zeros_like(s)
        set_linear(ed, p, weight=w / s[:, None], bias=None if b is None else (b - shift) / s)
        ann.put(p, smoothed)
    return how


def linear_groups(gm: GraphModule) -> dict[Node, list[Node]]:
    """The linears of gm by the input node they read (q/k/v share theirs), in graph order."""
    groups: dict[Node, list[Node]] = {}
    for node in gm.graph.nodes:
        if is_call(node, F.linear) and isinstance(node.args[0], Node):
            groups.setdefault(node.args[0], []).append(node)
    return groups


def scale_readers(ed: WeightEditor, linears: list[Node], weights: list[torch.Tensor],
                  m: Migration) -> None:
    """The readers' side of x~ = (x - z) / s: W~ = W diag(s), b~ = b + W z, for their
    weights as read before the producer absorbed 1/s."""
    for lin, w in zip(linears, weights, strict=True):
        b = linear_params(ed, lin)[1]
        if m.shift is not None:
            b = (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)) + w @ m.shift
        set_linear(ed, lin, weight=w * m.scale[None, :], bias=b)


def _explicit(gm: GraphModule, x: Node, linears: list[Node], m: Migration) -> None:
    dtype = tensor_val(x).dtype
    inv = add_constant(gm, f"smooth_inv_scale_{x.name}", (1.0 / m.scale).to(dtype),
                       before=linears[0])
    offset = None
    if m.shift is not None:
        offset = add_constant(gm, f"smooth_offset_{x.name}", (-m.shift / m.scale).to(dtype),
                              before=linears[0])
    with gm.graph.inserting_before(linears[0]):
        scaled = gm.graph.call_function(operator.mul, (x, inv))
        if offset is not None:
            scaled = gm.graph.call_function(operator.add, (scaled, offset))
    ann.put(scaled, ann.Smoothed(m.scale, explicit=True, shift=m.shift))
    if ann.site(x, "input") is not None:  # the linears now read x~: same site, rescaled
        ann.put(scaled, ann.Sites(input=ann.site(x, "input")))
    for lin in linears:
        lin.replace_input_with(x, scaled)


def _integer_producer(ctx: PassContext, x: Node) -> bool:
    """x will be the output of an integer op under a static recipe: a layer or attention
    select-layers quantizes, or (integer_nonlinear) anything."""
    act = ctx.options.recipe_obj.act
    if act is None or act.dynamic:
        return False
    if ctx.options.transform_on("integer_nonlinear"):
        return True
    # up through layout ops (attention's [B, H, S, D] -> [B, S, H * D]); select-layers'
    # choice for an attention is not on the sdpa node yet, and a static recipe's int8
    # attention requantizes its output in the kernel
    node = producer_through_layout(x)
    return ann.selected(node) is not None or is_call(node, F.scaled_dot_product_attention)


def _quantizers(ctx: PassContext, k: int, bits: int | None, levels: int | None = None):
    """The recipe's activation quantizer (static per-tensor from the transformed range,
    per-token dynamic, or none) and its RTN weight quantizer, for _migration to measure."""
    act = ctx.options.recipe_obj.act
    if act is None:
        def quantize_act(x, lo, hi):
            return x
    elif act.dynamic:
        quantize_act = token_quantizer(act.bits, ctx.options.act_clip,
                                       ctx.options.act_symmetric, ctx.options.act_group)
    else:
        quantize_act = static_quantizer(activation_spec(ctx))
    return quantize_act, weight_quantizer(weight_spec_for(ctx, k, bits, levels)[0])


def _search(ctx: PassContext, linears: list[Node], weights: list[torch.Tensor],
            k: int, errors: list) -> tuple[Migration | None, str]:
    """The group's migration: saved (a loaded quantization) or measured (its output errors
    before and after join `errors`); (None, why) where there is nothing to measure with."""
    calib = ctx.analysis.get("calib") or {}
    name = next((f"in:{layer_name(lin)}" for lin in linears
                 if f"in:{layer_name(lin)}" in calib), None)
    site = calib.get(name)
    if site is not None and site.migration is not None:
        return site.migration, "as saved"
    cache = getattr(ctx.state, "migrations", None)
    key = f"{ctx.options.fingerprint()}|{name}"
    if site is not None and cache is not None and key in cache and \
            cache[key][0].scale.shape == (k,):
        site.migration = cache[key][0]
        return cache[key][0], f"{cache[key][1]} (measured for an earlier graph)"
    if site is None or site.rows is None or site.channel_range is None:
        return None, ("no calibration rows of its input to measure candidates on (the row "
                      "sample and per-channel ranges of 'in:<layer>')")
    if site.rows.shape[-1] != k:
        return None, f"the calibration rows do not have the input's {k} channels"
    if site.rows.shape[0] < MIN_ROWS:
        return None, (f"{site.rows.shape[0]} calibration rows: too few to tell the candidates "
                      f"apart (at least {MIN_ROWS}; calibrate on more data)")
    first = next((ann.selected(lin) for lin in linears if ann.selected(lin)), None)
    bits, levels = (first.weight_bits, first.group_levels) if first else (None, None)
    choice = choose(site.rows, *site.channel_range, weights,
                    *_quantizers(ctx, k, bits, levels))
    site.migration = choice.best
    errors.append((choice.baseline, choice.error))
    change = choice.error / choice.baseline - 1 if choice.baseline > 0 else 0.0
    why = (f"output error {choice.baseline:.3g} -> {choice.error:.3g} ({change:+.0%}), "
           f"best of {choice.tried}")
    if cache is not None:
        cache[key] = (choice.best, why)
    return choice.best, why


@graph_pass("smooth", requires=("analyze-structure",))
def smooth(gm: GraphModule, ctx: PassContext) -> PassResult:
    alpha = ctx.options.smooth_alpha
    ed = WeightEditor(gm)
    skips = Skips(ctx, "smooth")
    explicit = Skips(ctx, "smooth", verb="scaled explicitly")
    counters = {"groups": 0, "linears": 0, "into_norm": 0, "into_linear": 0,
                "into_gated_linear": 0, "explicit": 0, "skipped": 0, "unchanged": 0,
                "shifted": 0}
    errors: list[tuple[float, float]] = []  # measured groups' output error: none, chosen
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = linear_groups(gm)
    for x, linears in groups.items():
        names = "/".join(layer_name(lin) for lin in linears)
        if ann.get(x, ann.Smoothed) is not None:  # smoothed before
            continue
        k = last_size(x)
        weights = [linear_params(ed, lin)[0] for lin in linears]
        if alpha is None:
            m, why = _search(ctx, linears, weights, k, errors)
            if m is None:
                skips.add(names, why)
                counters["skipped"] += 1
                continue
            for lin in linears:
                ctx.layer(layer_name(lin), "linear").detail["smooth"] = (
                    f"{m.label}: {why}" if not m.identity else
                    f"unchanged: no shift or scale beat no change ({why})")
            if m.identity:
                counters["unchanged"] += 1
                continue
        else:
            found = [a for a in (activation_absmax(ctx, lin) for lin in linears)
                     if a is not None]
            if not found:
                skips.add(names, "no calibration statistics (max|X_j|) for its input")
                counters["skipped"] += 1
                continue
            if any(a.shape != (k,) for a in found):
                skips.add(names, f"statistics do not have the input's {k} channels")
                counters["skipped"] += 1
                continue
            ax = torch.stack([a.to(torch.float64) for a in found]).amax(0)
            m = Migration(f"alpha={alpha:g}", smoothing_scales(ax, weights, alpha))
        how = fold_producer(ed, x, linears, m)
        if how is None and alpha is None and _integer_producer(ctx, x):
            # an explicit float multiply-add after an op that will produce integers (a
            # quantized attention or layer; integer GELU / LayerNorm) would force a float
            # round trip and a second rounding the search does not see
            why = ("its input comes from an integer op: only a shift and scale that op "
                   "absorbs would keep the integer dataflow, and none does")
            skips.add(names, why)
            for lin in linears:  # not the migration the search measured: none is applied
                ctx.layer(layer_name(lin), "linear").detail["smooth"] = (
                    f"skipped ({m.label} measured best): {why}")
            counters["skipped"] += 1
            continue
        if how is None:
            _explicit(gm, x, sorted(linears, key=order.__getitem__), m)
            how = "explicit"
            explicit.add(names, "no producer can absorb the shift and 1/s, so "
                         "x * (1/s) - z/s runs before the quantizer")
        scale_readers(ed, linears, weights, m)
        for lin in linears:
            ctx.layer(layer_name(lin), "linear").transforms.append(
                f"smooth({m.label}, into={how})")
            counters["linears"] += 1
        counters["groups"] += 1
        counters["shifted"] += m.shift is not None
        counters["into_" + how.replace(" ", "_") if how != "explicit" else "explicit"] += 1
    skips.flush()
    explicit.flush()
    if alpha is None and counters["groups"] + counters["unchanged"]:
        before, after = (sum(e[i] for e in errors) for i in (0, 1))
        ctx.note(f"smooth: {counters['groups']} group(s) of linears shifted or scaled, "
                 f"{counters['unchanged']} unchanged" + (
                     f"; {len(errors)} measured here, summed relative output error on the "
                     f"calibration rows {before:.4g} -> {after:.4g}" if errors else ""))
    if ed.untied:
        ctx.note(f"smooth: gave {sorted(set(ed.untied))} a separate copy per reader")
    return PassResult(gm, modified=counters["groups"] > 0,
                      counters={k: v for k, v in counters.items() if v})
