"""select-layers: decide which linears the recipe quantizes, and say why not for the rest.

What: annotates every canonical linear with a `Layer` (annotations.py): its name and
whether it is quantized; records in the report why it stays in float when not: the layer
matches an option `skip` pattern; its K is too large for exact int32 accumulation
(K > 131071, DESIGN's range rule); int4 weights need an even K.
On CPU graphs it also plans how the layer runs (lowering/cpu_routes.py): the weights are
7-bit where this CPU's fast exact int8 kernel needs them (oneDNN's u8 x s8 without VNNI;
option narrow_weights), the route is the fastest exact one for the layer's shape, and
with kernels="auto" a layer no exact int8 route runs faster than float32 stays float
(DESIGN: never slower than float), with the reason; kernels="cpu" quantizes it anyway.
An online Hadamard (online-hadamard) in front of quantized linears counts as part of their
cost: under "auto" they stay quantized only where the rotation and their quantized calls,
timed at their shapes (lowering/latency.py, cached per machine), take less than their float
calls. A Hadamard whose linears all stay float, for any reason, is taken out with its
inverse (the only graph change this pass makes).
The row count M is the example input's (tokens per call). Weight-only int4 stays float on
CPU under "auto": its CPU path dequantizes the whole weight at every call. A model given a
saved quantization (qcompile.load) quantizes exactly the layers saved quantized, on the
route this CPU has for their saved weights, so that it runs the saved integers.
Why a pass of its own: observers, weight quantization and the rewrites all ask the same
question and must agree.
Convolutions (canonicalize-conv) are layers too, planned on CPU by lowering/cpu_conv.py:
oneDNN's int8 convolution where it is exact and faster than float32 for the layer's shape
(dense convolutions with enough channels; not depthwise / grouped ones without VNNI, not a
3-channel stem), else float under kernels="auto"; weight-only recipes leave them float.
Pre: canonicalize-linear. Post: every F.linear and canonical conv has a Layer annotation;
every online Hadamard left feeds a quantized linear.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.lowering import cpu_routes
from qcompile.lowering.reference import MAX_SAFE_K
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._structure import WeightEditor, linear_params, set_linear
from qcompile.passes.calibrate_qparams import loaded_quantization
from qcompile.passes.online_hadamard import is_hadamard, normalized_hadamard
from qcompile.passes.quantize_weights import weight_spec_for
from qcompile.sites import is_conv, is_linear, layer_kind, layer_name


def layer_reason(name: str, k: int, ctx: PassContext, packed_int4: bool = True) -> str | None:
    opts = ctx.options
    recipe = opts.recipe_obj
    if not recipe.quantizes:
        return f"recipe {recipe.name!r} quantizes nothing"
    for pattern in opts.skip:
        if fnmatch.fnmatch(name, pattern):
            return f"skipped by option skip={pattern!r}"
    if k > MAX_SAFE_K:
        return f"K={k} > {MAX_SAFE_K}: int32 accumulation could overflow"
    if recipe.weight.bits == 4 and k % 2 and packed_int4:
        return f"K={k} is odd: int4 weights pack two per byte along K"
    return None


def input_rows(node: Node) -> int:
    """M: the linear input's rows (all dims but the last), symbolic sizes at their hint."""
    shape = node.args[0].meta["val"].shape[:-1]
    return math.prod(int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)
                     for d in shape)


def _narrow_range(ctx: PassContext, narrow) -> tuple[int, int] | None:
    """The integer weight range the layers keep to: `narrow` (what this CPU's fast exact
    kernel needs, or None), as option narrow_weights overrides it."""
    if ctx.options.narrow_weights is True and narrow is None:
        return cpu_routes.SEVEN_BIT
    return None if ctx.options.narrow_weights is False else narrow


def _narrow_weights(ctx: PassContext, layer: ann.Layer, rec, narrow, kernel: str) -> None:
    """8-bit weights in `narrow` ([-64, 63]: 7 bits) where this CPU's fast exact `kernel`
    needs them, or as option narrow_weights says; the report says so."""
    opts = ctx.options
    narrow = _narrow_range(ctx, narrow)
    if narrow is not None and opts.recipe_obj.weight.bits == 8:
        layer.weight_bits = narrow[1].bit_length() + 1
        rec.detail["weights"] = (f"{layer.weight_bits}-bit, the exact range of this CPU's "
                                 f"{kernel} ({cpu_routes.cpu_capabilities().describe()})")


def _cpu_plan(ctx: PassContext, node: Node, layer: ann.Layer, rec, saved) -> str | None:
    """Plan a quantized linear on a CPU graph (weights, route); the reason it stays float
    instead, or None. `saved`: the layer's weights from a loaded quantization, whose range
    the route must take (a loaded layer runs quantized even where that is not faster)."""
    opts, recipe = ctx.options, ctx.options.recipe_obj
    caps = cpu_routes.cpu_capabilities()
    if saved is not None:  # every saved variant of the weight: the route must fit them all
        spans = [(int(v.min()), int(v.max())) for v in (s.int_values() for s in saved)
                 if v.numel()]
        span = (min(lo for lo, _ in spans), max(hi for _, hi in spans)) if spans else (0, 0)
        n, k = node.args[1].meta["val"].shape
        if opts.kernels in ("auto", "cpu") and recipe.act is not None:
            plan = cpu_routes.plan_layer(caps, input_rows(node), k, n, span)
            layer.route = plan.route
            rec.detail["route"] = f"{plan.route}: {plan.reason} (loaded weights)"
        return None
    narrow = cpu_routes.narrow_weight_range(caps)
    _narrow_weights(ctx, layer, rec, narrow, "int8 kernel")
    bits = recipe.weight.bits
    n, k = node.args[1].meta["val"].shape
    top = 1 << ((layer.weight_bits or bits) - 1)
    span = (-top, top - 1)
    spec4 = weight_spec_for(ctx, k, 4)[0]
    if spec4.group_levels is not None:  # int4 layers in groups
        grouped = _group_levels(ctx, layer, rec, narrow, spec4)
        # recipe mixed: a layer may stay 8-bit, whose span covers the groups' one
        span = grouped if bits == 4 else span
    if opts.kernels not in ("auto", "cpu"):
        return None
    if recipe.act is None:  # weight-only: no int8 GEMM
        return ("weight-only int4 on CPU dequantizes the whole weight at every call: slower "
                "than float32" if opts.kernels == "auto" else None)
    plan = cpu_routes.plan_layer(caps, input_rows(node), k, n, span)
    layer.route = plan.route
    rec.detail["route"] = f"{plan.route}: {plan.reason}"
    if plan.measure:  # under auto, _price_routes times it against float after the loop
        return None
    return plan.reason if not plan.fast and opts.kernels == "auto" else None


def _price_routes(ctx: PassContext, gm: GraphModule) -> None:
    """On a CPU whose int8 route has no verified speed table (ARM's NEON kernels: a
    Choice with measure), under kernels="auto", each such quantized linear stays quantized
    only where its quantized call (input quantizer, GEMM, epilogue, compiled as the graph
    runs them) beats its float32 call at its shape, timed on this machine in a fresh process
    and cached per machine (lowering/latency.py); else float, with both times as the reason."""
    from qcompile.lowering import latency

    recipe = ctx.options.recipe_obj
    caps = cpu_routes.cpu_capabilities()
    todo = []
    for node in gm.graph.nodes:
        layer = ann.get(node, ann.Layer) if is_linear(node) else None
        if (layer is None or not layer.quantize or layer.route is None
                or not cpu_routes.ROUTES[layer.route].measured):
            continue
        n, k = node.args[1].meta["val"].shape
        m = input_rows(node)
        specs = (latency.linear_spec(m, k, n, layer.weight_bits or recipe.weight.bits,
                                     recipe.act.bits, recipe.act.dynamic),
                 latency.linear_spec(m, k, n, 8, None))
        todo.append((node, layer, m, k, n, specs))
    latency.prefetch("cpu", [s for *_, specs in todo for s in specs])
    for node, layer, m, k, n, specs in todo:
        q_ms, f_ms = (latency.spec_ms("cpu", s) for s in specs)
        times = (f"{q_ms:.3f} ms quantized ({layer.route}) against {f_ms:.3f} ms float32 at "
                 f"M={m}, K={k}, N={n}, measured on {caps.describe()}")
        rec = ctx.layer(layer_name(node), "linear")
        rec.detail["route"] += f"; {times}"
        if q_ms >= f_ms:
            layer.quantize = False
            rec.reason = f"no exact int8 GEMM faster than float32 here: {times}"


def _group_levels(ctx: PassContext, layer: ann.Layer, rec, narrow, spec) -> tuple[int, int]:
    """The integer group multipliers' bound (Layer.group_levels): the most that keeps the
    int4 values (less their zero points, for an asymmetric `spec`) times the multiplier
    int8 (16 symmetric, 8 asymmetric), or where this CPU's fast exact int8 kernel needs
    narrower weights (or the option narrow_weights says so) the most that keeps them inside
    those. The integer weights' span, for the route plan."""
    opts = ctx.options
    narrow = _narrow_range(ctx, narrow)
    # the integers the multipliers scale: q in [qmin, qmax], or q - z in +-(qmax - qmin)
    lo, hi = (spec.qmin, spec.qmax) if spec.symmetric else \
        (spec.qmin - spec.qmax, spec.qmax - spec.qmin)
    levels = spec.max_group_levels
    if narrow is not None:
        levels = min(levels, narrow[0] // lo, narrow[1] // hi)
        rec.detail["weights"] = (f"int4 groups of {opts.weight_group_size} at 1..{levels} "
                                 f"times the row's scale: the exact range {list(narrow)} of "
                                 f"this CPU's int8 kernel "
                                 f"({cpu_routes.cpu_capabilities().describe()})")
    layer.group_levels = levels
    return lo * levels, hi * levels


def _conv_reason(ctx: PassContext) -> str | None:
    recipe = ctx.options.recipe_obj
    if recipe.act is None:
        return (f"recipe {recipe.name!r} is weight-only: qcompile has no weight-only "
                "convolution kernel (a convolution is compute-bound: use w8a8 or w8a8-static)")
    return None


def _conv_cpu_plan(ctx: PassContext, node: Node, layer: ann.Layer, rec) -> str | None:
    """Plan a quantized convolution on a CPU graph (weights, route), as _cpu_plan does for
    a linear; the reason it stays float, or None."""
    from qcompile.lowering import cpu_conv

    opts, recipe = ctx.options, ctx.options.recipe_obj
    caps = cpu_routes.cpu_capabilities()
    narrow = cpu_conv.onednn_weight_range(caps) if caps.onednn else None
    narrow = None if narrow == cpu_routes.FULL_RANGE else narrow
    _narrow_weights(ctx, layer, rec, narrow, "int8 convolution")
    bits = recipe.weight.bits
    if opts.kernels not in ("auto", "cpu"):
        return None
    qmax = (1 << ((layer.weight_bits or bits) - 1)) - 1
    x, w = node.args[0].meta["val"], node.args[1].meta["val"]
    out = node.meta["val"]
    geom = cpu_conv.ConvGeometry.of(*node.args[3:7])
    shape = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in x.shape]
    hw = tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)
               for d in out.shape[2:])
    plan = cpu_conv.plan_conv(caps, shape, tuple(w.shape), geom, hw, (-qmax - 1, qmax))
    layer.route = plan.route
    rec.detail["route"] = f"{plan.route}: {plan.reason}"
    if not plan.fast and opts.kernels == "auto":
        return (f"no exact int8 convolution faster than float32 on {caps.describe()}: "
                f"{plan.reason}")
    return None


def _device(node: Node) -> str:
    return node.args[1].meta["val"].device.type


def _online_hadamards(gm: GraphModule) -> list[tuple[Node, list[Node]]]:
    """Each online Hadamard online-hadamard put in front of linears, with those linears."""
    out = []
    for node in gm.graph.nodes:
        if is_hadamard(node) and node.meta.get("qc_online_hadamard") in ("down", "input"):
            readers = list(node.users)
            if readers and all(is_linear(u) and ann.get(u, ann.Layer) for u in readers):
                out.append((node, readers))
    return out


def _price_hadamards(ctx: PassContext, groups: list[tuple[Node, list[Node]]]) -> None:
    """On a CPU graph under kernels="auto", an online Hadamard is part of what its
    quantized readers cost: they stay quantized only where the rotation plus their
    quantized calls take less time than their float calls (timed at the layers' shapes in a
    fresh process, cached per machine: lowering/latency.py), else float with the times as
    the reason. _cpu_plan's GEMM rule cannot see this: the 1536-wide rotation in front of
    all-MiniLM-L6-v2's down projections takes about three times their int8 GEMM on an
    AVX512-VNNI EPYC, and on a CPU whose int8 GEMM gains less over float it decides."""
    from qcompile.lowering import latency

    recipe = ctx.options.recipe_obj
    caps = cpu_routes.cpu_capabilities()
    w_bits = 7 if _narrow_range(ctx, cpu_routes.narrow_weight_range(caps)) else 8
    plans = []
    for had, readers in groups:
        quantized = [u for u in readers if ann.get(u, ann.Layer).quantize]
        if not quantized:
            continue
        m, k = input_rows(quantized[0]), _last_dim(had)
        ns = [int(lin.args[1].meta["val"].shape[0]) for lin in quantized]
        specs = [latency.hadamard_spec(m, k)]
        for n in ns:
            specs += [latency.linear_spec(m, k, n, w_bits, recipe.act.bits, recipe.act.dynamic),
                      latency.linear_spec(m, k, n, 8, None)]
        plans.append((quantized, m, k, specs))
    latency.prefetch("cpu", [s for *_, specs in plans for s in specs])
    for quantized, m, k, specs in plans:
        had_ms, *calls = (latency.spec_ms("cpu", s) for s in specs)
        q_ms, f_ms = sum(calls[0::2]), sum(calls[1::2])
        times = (f"the online Hadamard ({had_ms:.2f} ms at M={m}, n={k}) and the quantized "
                 f"call{'s' if len(quantized) > 1 else ''} ({q_ms:.2f} ms) against float32 "
                 f"({f_ms:.2f} ms), measured on {caps.describe()}")
        for lin in quantized:
            rec = ctx.layer(layer_name(lin), "linear")
            if had_ms + q_ms < f_ms:
                rec.detail["online-hadamard cost"] = f"pays: {times}"
            else:
                ann.get(lin, ann.Layer).quantize = False
                rec.reason = f"slower than float with its online Hadamard: {times}"


def _take_out_hadamard(gm: GraphModule, ctx: PassContext, ed: WeightEditor, had: Node,
                       readers: list[Node]) -> None:
    """A Hadamard whose readers all stay float only costs time: its inverse leaves their
    weights (W' H = W H^T H = W, in float64) and its input feeds them again."""
    tag = f"online-hadamard({had.meta['qc_online_hadamard']})"
    h = normalized_hadamard(_last_dim(had))
    for lin in readers:
        w, _ = linear_params(ed, lin)
        set_linear(ed, lin, weight=w @ h)
        lin.meta.pop("qc_online_hadamard", None)
        rec = ctx.layer(layer_name(lin), "linear")
        if tag in rec.transforms:
            rec.transforms.remove(tag)
        rec.detail["online-hadamard"] = "taken out: every linear it fed stays float"
    had.replace_all_uses_with(had.args[0])
    gm.graph.erase_node(had)


def _last_dim(node: Node) -> int:
    return int(node.meta["val"].shape[-1])


@graph_pass("select-layers", requires=("canonicalize-linear",))
def select_layers(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"quantize": 0, "float": 0}
    planned = False
    loaded = loaded_quantization(ctx)
    for node in gm.graph.nodes:
        if not (is_linear(node) or is_conv(node)):
            continue
        name = layer_name(node)
        conv = is_conv(node)
        k = math.prod(node.args[1].meta["val"].shape[1:])
        # convolutions hold int4 weights as int8 values: no packing, any K
        reason = layer_reason(name, k, ctx, packed_int4=not conv) or (
            _conv_reason(ctx) if conv else None)
        rec = ctx.layer(name, layer_kind(node))
        variants = loaded.weights.get(name) if loaded is not None else None
        saved = list(variants.values()) if variants else None
        if reason is None and loaded is not None and saved is None:
            reason = "float in the loaded quantization"
        layer = ann.put(node, ann.Layer(name, quantize=reason is None))
        if reason is None and _device(node) == "cpu":
            if conv:
                reason = _conv_cpu_plan(ctx, node, layer, rec) if saved is None else None
            else:
                reason = _cpu_plan(ctx, node, layer, rec, saved)
            layer.quantize = reason is None
            planned = True
        if reason is not None:
            rec.reason = reason
    if planned and ctx.options.kernels == "auto" and loaded is None:
        _price_routes(ctx, gm)
    groups = _online_hadamards(gm)
    if ctx.options.kernels == "auto" and loaded is None:
        _price_hadamards(ctx, [(h, r) for h, r in groups if h.meta["val"].device.type == "cpu"])
    ed, taken = WeightEditor(gm), 0
    for had, readers in groups:
        if not any(ann.get(u, ann.Layer).quantize for u in readers):
            _take_out_hadamard(gm, ctx, ed, had, readers)
            taken += 1
    for node in gm.graph.nodes:
        layer = ann.get(node, ann.Layer) if is_linear(node) or is_conv(node) else None
        if layer is not None:
            counters["quantize" if layer.quantize else "float"] += 1
    if taken:
        counters["hadamards_taken_out"] = taken
        ctx.note(f"select-layers: took out {taken} online Hadamard(s) whose linears all stay "
                 "float")
    if planned:
        caps = cpu_routes.cpu_capabilities()
        narrow = cpu_routes.narrow_weight_range(caps)
        ctx.note(f"select-layers: CPU {caps.describe()}, kernels={ctx.options.kernels!r}; "
                 + (f"its fast exact int8 kernel needs weights in {list(narrow)}"
                    if narrow else "full-range int8 weights are exact on its int8 kernel"))
    return PassResult(gm, modified=taken > 0, counters=counters)
