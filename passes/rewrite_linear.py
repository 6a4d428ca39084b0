"""rewrite-linear: canonical linear -> quantized linear op, per recipe.

  w8a8 (dynamic)      y = linear_dynamic(x, Wq, w_scale, b)              float in, float out
  w4a4 (dynamic)      y = linear_a4w4_dynamic(x, Wq4, w_scale, b, clip)  float in, float out
                      (per-token int4 x at options' activation clip ratio, the int4 weight
                      packed two a byte along K; with options group_size
                      linear_a4w4_grouped_dynamic(x, Wq4, mult, wzp, row_scale, b, clip))
  w4a16               y = linear_w4a16(x, Wq4, scales, zeros, g, b)      float in, float out
                      (zeros: the groups' zero points, None for symmetric weights)
  static recipes      xq = quantize(x, s_x, zp_x)        (one per activation, shared)
                      yq = linear_int8(xq, Wq, b_i32, zp_x*colsum(Wq), q, shift, zp_y)
                      y  = dequantize(yq, s_y, zp_y)
                      with M[c] = s_x * s_w[c] / s_y kept (float64) in a PendingRequant
                      annotation until compute-dyadic fills q and shift; int4 weights
                      use linear_w4a8 with the weight packed two per byte, group-wise
                      int4 (options group_size) linear_w4a8_grouped with each group's
                      integer multiplier of the row's scale (s_w is the row's) and its
                      zero point (None for symmetric weights).
  recipe "mixed"      where choose-precision widened the input to 16 bits:
                      xq = quantize_int16(x, s_x); yq = linear_a16w8(xq, Wq, b_i64, q, shift,
                      zp_y): two int8 GEMMs on the input's high and low bytes, combined in
                      int64; int4 weights (choose-precision's Layer.weight_bits) as above.
The int32 bias is round(b / (s_x * s_w[c])); where bias-correct ran, b is the float bias
plus Layer.bias_correction (the float-epilogue ops above take that sum as their bias). The
accumulator range check (|acc| + |bias| + |zp term| < 2**31 for every possible int8 input)
runs here, at compile time.
The quantize/dequantize pairs this leaves between integer ops are removed by
integer-dataflow.
Pre: quantize-weights (and calibrate-qparams for static recipes).
Post: no selected F.linear remains; each quantized op node carries the linear's Layer
annotation, int8 outputs their QParams, and the node standing for the layer's output a
LayerOutput.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, erase_unused, get_constant, is_call, tensor_val
from qcompile.lowering import a4_ops, ops
from qcompile.lowering.reference import (
    AccumulatorRangeError,
    check_a16_accumulator_range,
    check_accumulator_range,
)
from qcompile.numerics.specs import pack_int4
from qcompile.pass_manager import PassContext, PassResult, graph_pass

ACT = {8: (-128, 127), 4: (-8, 7), 16: (-32768, 32767)}


def _const(gm, node, base, value):
    return add_constant(gm, f"{base}", value, before=node)


def _tag(new: Node, layer: ann.Layer) -> Node:
    ann.put(new, layer)
    return new


def _float_bias(gm, b: Node | None, layer: ann.Layer) -> torch.Tensor | None:
    """The layer's float bias, float64 [N], with bias-correct's correction added (a layer
    without a bias gets one); None: no bias and no correction."""
    bias = get_constant(gm, b).double() if b is not None else None
    c = layer.bias_correction
    if c is None:
        return bias
    return c.double() if bias is None else bias + c.double()


def _bias_arg(gm, node: Node, b: Node | None, layer: ann.Layer) -> Node | None:
    """The bias of an op with a float epilogue: b, or where bias-correct ran a constant
    holding b plus the correction, in the output's dtype."""
    if layer.bias_correction is None:
        return b
    bias = _float_bias(gm, b, layer).to(tensor_val(node).dtype)
    return _const(gm, node, f"{layer.name.replace('.', '_')}_bias_corrected", bias)


def _rewrite_dynamic(gm, ctx, node, qw, layer):
    """Per-token dynamic activations: int8 (linear_dynamic) or, for 4-bit activations,
    int4 with the int4 weight packed two a byte along K (linear_a4w4_dynamic)."""
    x, _, b = node.args
    name = layer.name.replace(".", "_")
    tail = ()
    head = ()
    if ctx.options.recipe_obj.act.bits == 4:
        w = _const(gm, node, f"{name}_wq4", pack_int4(qw.qweight))
        op, kind = ops.LINEAR_A4W4_DYNAMIC, "linear_a4w4_dynamic"
        if qw.group_mult is not None:  # options group_size: the row's grid
            head = _group_args(gm, node, name, qw)
            op, kind = ops.LINEAR_A4W4_GROUPED_DYNAMIC, "linear_a4w4_grouped_dynamic"
        tail = (ctx.options.act_clip,)
        group = ctx.options.act_group
        k = qw.qweight.shape[-1]
        if group and k % group == 0:  # symmetric groups: no zero points, no w_sum
            tail += (None, group)
        elif group:
            ctx.note(f"rewrite-linear: {layer.name}'s K = {k} is not a multiple of "
                     f"activation_group_size {group}: its int4 activations have one scale "
                     f"per token")
        if not ctx.options.act_symmetric:  # a zero point per token: the weight rows' sums
            w_sum = a4_ops.weight_row_sums(qw.int_values())
            tail += (_const(gm, node, f"{name}_wsum", w_sum),)
    else:
        w = _const(gm, node, f"{name}_wq", qw.qweight.contiguous())
        op, kind = ops.LINEAR_DYNAMIC, "linear_dynamic"
    ws = _const(gm, node, f"{name}_wscale", qw.int_scale().float().reshape(-1))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (x, w, *head, ws, _bias_arg(gm, node, b, layer),
                                          *tail))
    return _tag(new, layer), kind


def _group_args(gm, node, name: str, qw) -> tuple:
    """(mult, wzp) nodes of a group-wise int4 weight on its row's grid: the groups'
    multipliers and, for an asymmetric weight, their zero points (else None)."""
    wzp = None if qw.spec.symmetric else \
        _const(gm, node, f"{name}_wzp", qw.zero_point.to(torch.int8))
    return _const(gm, node, f"{name}_wmult", qw.group_mult), wzp


def _rewrite_w4a16(gm, ctx, node, qw, layer):
    x, _, b = node.args
    name = layer.name.replace(".", "_")
    w = _const(gm, node, f"{name}_wq4", pack_int4(qw.qweight))
    scales = _const(gm, node, f"{name}_wscale", qw.scale.float())
    zeros = None if qw.spec.symmetric else \
        _const(gm, node, f"{name}_wzeros", qw.zero_point.to(torch.int32))
    g = qw.spec.group_size
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(ops.LINEAR_W4A16, (x, w, scales, zeros, g,
                                                         _bias_arg(gm, node, b, layer)))
    return _tag(new, layer), "linear_w4a16"


def _quantized_input(gm, ctx, x: Node, cache: dict, before: Node):
    """One quantize node per activation, shared by every linear that reads it."""
    if x in cache:
        return cache[x]
    site = ctx.analysis["calib"].get(ann.site(x, "input"))
    if site is None or site.scale is None:
        cache[x] = None
        return None
    if site.bits == 16:  # choose-precision widened it: symmetric, zero point 0
        with gm.graph.inserting_after(x):
            xq = gm.graph.call_function(ops.QUANTIZE_INT16, (x, site.scale16, *ACT[16]))
        ann.put(xq, ann.QParams(site.scale16, 0))
        cache[x] = xq
        return xq
    qmin, qmax = ACT[ctx.options.recipe_obj.act.bits]
    with gm.graph.inserting_after(x):
        xq = gm.graph.call_function(ops.QUANTIZE, (x, site.scale, site.zero_point, qmin, qmax))
    ann.put(xq, ann.QParams(site.scale, site.zero_point))
    cache[x] = xq
    return xq


def _rewrite_static(gm, ctx, node, qw, layer, cache):
    x, _, b = node.args
    calib = ctx.analysis["calib"]
    out = calib.get(f"out:{layer.name}")
    xq = _quantized_input(gm, ctx, x, cache, node)
    if xq is None or out is None or out.scale is None:
        return None, "no calibration data reached this layer's input or output"
    qp = ann.get(xq, ann.QParams)
    s_x, zp_x = qp.scale, qp.zero_point
    s_w = qw.int_scale().double().reshape(-1)  # [N]
    # int8 [N, K]: int4 values for 4-bit, times their group's multiplier in groups
    wq = qw.int_values()
    if xq.target is ops.QUANTIZE_INT16:
        return _rewrite_a16(gm, ctx, node, qw, layer, xq, out)
    bias_i32 = None
    bias_f = _float_bias(gm, b, layer)
    if bias_f is not None:
        bias_i32 = torch.round(bias_f / (s_x * s_w)).to(torch.int64)
    zp_term = (zp_x * wq.to(torch.int64).sum(dim=1)) if zp_x else None
    check_accumulator_range(wq.shape[1], wq, bias=bias_i32, zp_term=zp_term)
    mult = s_x * s_w / out.scale  # [N] float64: becomes (q, shift) in compute-dyadic
    name = layer.name.replace(".", "_")
    head: tuple = ()
    if qw.group_mult is not None:
        w_node, op = _const(gm, node, f"{name}_wq4", qw.packed()), ops.LINEAR_W4A8_GROUPED
        head = _group_args(gm, node, name, qw)
    elif qw.spec.bits == 4:
        w_node, op = _const(gm, node, f"{name}_wq4", pack_int4(wq)), ops.LINEAR_W4A8
    else:
        w_node, op = _const(gm, node, f"{name}_wq", wq.contiguous()), ops.LINEAR_INT8
    b_node = zp_node = None
    if bias_i32 is not None:
        b_node = _const(gm, node, f"{name}_bias_i32", bias_i32.to(torch.int32))
    if zp_term is not None:
        zp_node = _const(gm, node, f"{name}_zp_term", zp_term.to(torch.int32))
    oqmin, oqmax = ACT[ctx.options.recipe_obj.act.bits]
    epilogue = _float_epilogue(s_x, qw, bias_f, wq if qw.spec.bits == 4 else None)
    y = _requantizing(gm, node, layer, op, (xq, w_node, *head, b_node, zp_node),
                      (out.zero_point, oqmin, oqmax), mult, out, epilogue)
    return y, op._opname  # the LayerOutput; yq carries the Layer


def _float_epilogue(s_x, qw, bias_f, w_int8):
    """What integer-dataflow needs if the output only feeds float islands."""
    return ann.FloatEpilogue(s_x, qw.int_scale().float().reshape(-1),
                             bias_f.float() if bias_f is not None else None,
                             w_int8.contiguous() if w_int8 is not None else None)


def _requantizing(gm, node, layer, op, head: tuple, tail: tuple, mult, out, epilogue):
    """op(*head, q, shift, *tail) -> int8 at `out`'s parameters, and its dequantize: the
    float value standing for the layer. q and shift are zeros that compute-dyadic fills
    from the real multipliers `mult` (a PendingRequant)."""
    name = layer.name.replace(".", "_")
    q_node = _const(gm, node, f"{name}_q", torch.zeros_like(mult, dtype=torch.int64))
    shift_node = _const(gm, node, f"{name}_shift", torch.zeros_like(mult, dtype=torch.int64))
    with gm.graph.inserting_before(node):
        yq = gm.graph.call_function(op, (*head, q_node, shift_node, *tail))
        y = gm.graph.call_function(ops.DEQUANTIZE, (yq, out.scale, out.zero_point,
                                                    tensor_val(node).dtype))
    _tag(yq, layer)
    ann.put(yq, ann.QParams(out.scale, out.zero_point))
    ann.put(yq, ann.PendingRequant((mult,)))
    ann.put(yq, epilogue)
    return y


def _rewrite_a16(gm, ctx, node, qw, layer, xq, out):
    """A 16-bit input (recipe "mixed"): linear_a16w8, two int8 GEMMs combined in int64,
    with an int64 bias and the same dyadic requantization; no zero-point term."""
    _, _, b = node.args
    s_x = ann.get(xq, ann.QParams).scale
    s_w = qw.int_scale().double().reshape(-1)  # [N]
    wq = qw.int_values()  # grouped int4: (q - z) * mult, int8 values at the row's scale
    bias_i64 = None
    bias_f = _float_bias(gm, b, layer)
    if bias_f is not None:
        bias_i64 = torch.round(bias_f / (s_x * s_w)).to(torch.int64)
    check_a16_accumulator_range(wq.shape[1], wq, bias=bias_i64)
    mult = s_x * s_w / out.scale
    name = layer.name.replace(".", "_")
    w_node = (_const(gm, node, f"{name}_wq4", pack_int4(wq))
              if qw.spec.bits == 4 and qw.group_mult is None else
              _const(gm, node, f"{name}_wq", wq.contiguous()))
    b_node = _const(gm, node, f"{name}_bias_i64", bias_i64) if bias_i64 is not None else None
    y = _requantizing(gm, node, layer, ops.LINEAR_A16W8, (xq, w_node, b_node),
                      (out.zero_point, *ACT[8]), mult, out, _float_epilogue(s_x, qw, bias_f, None))
    return y, "linear_a16w8"


def replace_layer(gm: GraphModule, node: Node, new: Node | None, kind: str, rec,
                  counters: dict[str, int]) -> None:
    """The quantized op(s) ending in `new` replace the float layer `node` (rewrite-linear,
    rewrite-conv); `new` None: the layer stays float, `kind` says why."""
    if new is None:
        rec.reason = kind
        return
    ann.put(new, ann.LayerOutput(ann.get(node, ann.Layer).name))
    # the same value: a layer reading it directly still finds its input site
    ann.copy(node, new, ann.Sites)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    rec.quantized, rec.kernel = True, kind
    counters[kind] = counters.get(kind, 0) + 1


@graph_pass("rewrite-linear", requires=("quantize-weights",))
def rewrite_linear(gm: GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.options.recipe_obj
    counters: dict[str, int] = {}
    cache: dict = {}
    for node in list(gm.graph.nodes):
        layer = ann.selected(node) if is_call(node, F.linear) else None
        if layer is None:
            continue
        rec = ctx.layer(layer.name, "linear")
        qw = layer.qweight
        try:
            if recipe.act is None:
                new, kind = _rewrite_w4a16(gm, ctx, node, qw, layer)
            elif recipe.act.dynamic:
                new, kind = _rewrite_dynamic(gm, ctx, node, qw, layer)
            else:
                new, kind = _rewrite_static(gm, ctx, node, qw, layer, cache)
        except AccumulatorRangeError as exc:
            new, kind = None, f"accumulator range: {exc}"
        replace_layer(gm, node, new, kind, rec, counters)
    erase_unused(gm)
    return PassResult(gm, modified=bool(counters), counters=counters)
