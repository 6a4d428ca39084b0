"""rewrite-conv: canonical convolution -> quantized convolution op, per recipe.

  w8a8 (dynamic)      y = conv2d_dynamic(x, Wq, w_scale, b, stride, padding, dilation, g)
                      float in, float out: x quantized per sample at run time
  static recipes      xq = quantize(x, s_x, zp_x)        (one per activation, shared)
                      yq = conv2d_int8(xq, Wq, b_i32, zp_x, q, shift, zp_y, qmin, qmax, ...)
                      y  = dequantize(yq, s_y, zp_y)
                      with M[n] = s_x * s_w[n] / s_y kept (float64) in a PendingRequant
                      until compute-dyadic fills q and shift.
A ReLU / ReLU6 / hardtanh / clamp that is the only reader of the convolution becomes the
requantization's [qmin, qmax] (passes/_activations.py; insert-observers observed the
output scale after it), so conv + BN + ReLU is one integer op.
The input zero point enters the op itself (padding holds it: see lowering/conv_ops.py);
the int32 bias is round(b / (s_x * s_w[n])); the accumulator range check
(max|x - zp_x| * sum |w[n]| + |bias[n]| <= 2**31 for every int8 input) runs here, at
compile time. int4 weights (w4a8, w4a4) run as int8 values through the same op.
The quantize / dequantize pairs this leaves between integer ops are removed by
integer-dataflow, as for linears.
Pre: quantize-weights (and calibrate-qparams for static recipes).
Post: no selected canonical conv remains; each quantized op node carries the conv's Layer,
int8 outputs their QParams, and the node standing for the layer's output a LayerOutput.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, erase_unused, get_constant, tensor_val
from qcompile.lowering import conv_ops, ops
from qcompile.lowering.reference import ACC_LIMIT, AccumulatorRangeError, accumulator_bound
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._activations import fused_activation
from qcompile.passes.rewrite_linear import ACT, replace_layer
from qcompile.sites import is_conv


def _geometry(node: Node) -> tuple[list[int], list[int], list[int], int]:
    stride, padding, dilation, groups = node.args[3:7]
    return list(stride), list(padding), list(dilation), int(groups)


def _quantized_input(gm: GraphModule, ctx: PassContext, x: Node) -> Node | None:
    """The activation's quantize node: an existing one with the site's parameters (a
    linear reading the same value made it), else a new one."""
    site = ctx.analysis["calib"].get(ann.site(x, "input"))
    if site is None or site.scale is None:
        return None
    qmin, qmax = ACT[ctx.options.recipe_obj.act.bits]
    args = (x, site.scale, site.zero_point, qmin, qmax)
    for user in x.users:
        if user.target is ops.QUANTIZE and user.args == args:
            return user
    with gm.graph.inserting_after(x):
        xq = gm.graph.call_function(ops.QUANTIZE, args)
    ann.put(xq, ann.QParams(site.scale, site.zero_point))
    return xq


def check_conv_range(wq: torch.Tensor, bias: torch.Tensor | None, zp_x: int, qmin: int,
                     qmax: int) -> None:
    """Compile-time proof that |sum (x - zp_x) * w + bias| <= 2**31 for every input."""
    a_absmax = max(abs(qmin - zp_x), abs(qmax - zp_x))
    bound = accumulator_bound(wq.reshape(wq.shape[0], -1), bias=bias, a_absmax=a_absmax)
    if bound > ACC_LIMIT:
        raise AccumulatorRangeError(
            f"|acc + bias| can reach {bound} > 2**31 for these weights and the input zero "
            f"point {zp_x}")


def _rewrite_static(gm, ctx, node, qw, layer):
    x, w, b = node.args[:3]
    calib = ctx.analysis["calib"]
    out = calib.get(f"out:{layer.name}")
    xq = _quantized_input(gm, ctx, x)
    if xq is None or out is None or out.scale is None:
        return None, "no calibration data reached this layer's input or output"
    qp = ann.get(xq, ann.QParams)
    s_x, zp_x = qp.scale, qp.zero_point
    s_w = qw.scale.double().reshape(-1)  # [N]
    wq = qw.qweight.reshape(get_constant(gm, w).shape).contiguous()  # int8 [N, C/g, kh, kw]
    bias_i32 = None
    if b is not None:
        bias_i32 = torch.round(get_constant(gm, b).double() / (s_x * s_w)).to(torch.int64)
    qmin, qmax = ACT[ctx.options.recipe_obj.act.bits]
    check_conv_range(wq, bias_i32, zp_x, qmin, qmax)
    act = fused_activation(node)
    clamp = None
    if act is not None:
        qmin, qmax = act.bounds(out.scale, out.zero_point, qmin, qmax)
        clamp = (act.lo, act.hi)
    mult = s_x * s_w / out.scale  # [N] float64: becomes (q, shift) in compute-dyadic
    name = layer.name.replace(".", "_")
    w_node = add_constant(gm, f"{name}_wq", wq, before=node)
    b_node = (add_constant(gm, f"{name}_bias_i32", bias_i32.to(torch.int32), before=node)
              if bias_i32 is not None else None)
    q_node = add_constant(gm, f"{name}_q", torch.zeros_like(mult, dtype=torch.int64),
                          before=node)
    shift_node = add_constant(gm, f"{name}_shift", torch.zeros_like(mult, dtype=torch.int64),
                              before=node)
    with gm.graph.inserting_before(node):
        yq = gm.graph.call_function(conv_ops.CONV2D_INT8, (
            xq, w_node, b_node, zp_x, q_node, shift_node, out.zero_point, qmin, qmax,
            *_geometry(node)))
        y = gm.graph.call_function(ops.DEQUANTIZE, (yq, out.scale, out.zero_point,
                                                    tensor_val(node).dtype))
    ann.put(yq, layer)
    ann.put(yq, ann.QParams(out.scale, out.zero_point))
    ann.put(yq, ann.PendingRequant((mult,)))
    bias_f = get_constant(gm, b).float() if b is not None else None
    ann.put(yq, ann.FloatEpilogue(s_x, qw.scale.float().reshape(-1), bias_f, None, clamp))
    if act is not None:  # the activation is the clamp now: its readers read y
        ann.copy(act.node, y, ann.Sites)
        act.node.replace_all_uses_with(y)
        gm.graph.erase_node(act.node)
    return y, "conv2d_int8"


def _rewrite_dynamic(gm, ctx, node, qw, layer):
    x, w, b = node.args[:3]
    name = layer.name.replace(".", "_")
    wq = qw.qweight.reshape(get_constant(gm, w).shape).contiguous()
    w_node = add_constant(gm, f"{name}_wq", wq, before=node)
    ws = add_constant(gm, f"{name}_wscale", qw.scale.float().reshape(-1), before=node)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(conv_ops.CONV2D_DYNAMIC, (x, w_node, ws, b,
                                                               *_geometry(node)))
    ann.put(new, layer)
    return new, "conv2d_dynamic"


@graph_pass("rewrite-conv", requires=("quantize-weights",))
def rewrite_conv(gm: GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.options.recipe_obj
    counters: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        layer = ann.selected(node) if is_conv(node) else None
        if layer is None:
            continue
        rec = ctx.layer(layer.name, "conv")
        try:
            if recipe.act.dynamic:
                new, kind = _rewrite_dynamic(gm, ctx, node, layer.qweight, layer)
            else:
                new, kind = _rewrite_static(gm, ctx, node, layer.qweight, layer)
        except AccumulatorRangeError as exc:
            new, kind = None, f"accumulator range: {exc}"
        replace_layer(gm, node, new, kind, rec, counters)
    erase_unused(gm)
    return PassResult(gm, modified=bool(counters), counters=counters)
