"""integer-dataflow: int8 values flow from integer op to integer op without float trips.

What, for integer-only recipes after rewrite-linear:
1. residual adds: add(dequantize(yq) [layout ops], b) where b is also held as int8 (it is
   quantized for a linear, or it is another integer op's dequantized output) and
   calibration observed the sum ("add:<layer>") becomes dequantize(add_int8(yq, b_int8)):
   each side rescaled dyadically to the sum's scale, one rounding.
2. round trips: quantize(dequantize(yq) [layout ops]) becomes the layout ops applied to
   yq itself (same scale and zero point: the identity on integers), followed by
   requant_int8 (another scale: a dyadic rescale, integer-only) otherwise.
3. float outputs: a linear whose int8 output now only feeds dequantize (a float island:
   residual add, GELU, norm) becomes linear_int8_dq: its int32 accumulator is dequantized
   directly, so no requantization error is paid for an integer consumer that does not
   exist. (Outlier channels of BERT-style residual writers made this worth 0.05-0.1 of
   embedding cosine on all-MiniLM-L6-v2.)
Residual adds are made integer only when their sum flows on into integer ops; a sum that
enters a float norm is added in float.
Layout ops (view, reshape, transpose, permute, split items, ...) move values without
changing them, so they run on int8 tensors as well as on floats.
Why: every dequantize/quantize pair costs a float round trip (and in general a rounding);
integer-only inference keeps values as integers between integer ops.
Pre: rewrite-linear. Post: no quantize reads a dequantize (through layout ops) with equal
parameters; float islands (norms, softmax, GELU, anything unrecognized) still dequantize
on entry and quantize on exit.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, erase_unused, is_call
from qcompile.lowering import ops
from qcompile.lowering.registry import arg
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes.rewrite_linear import ACT as ACT_RANGE
from qcompile.sites import is_layout


def _dequant_through_layout(node) -> tuple[Node, list[Node]] | None:
    """(dequantize node, layout chain from it down to `node`) or None."""
    chain: list[Node] = []
    while isinstance(node, Node) and is_layout(node):
        chain.append(node)
        node = node.args[0]
    if isinstance(node, Node) and node.target is ops.DEQUANTIZE:
        return node, chain[::-1]
    return None


def _replay(gm: GraphModule, chain: list[Node], source: Node, before: Node) -> Node:
    """Apply the same layout ops to `source` (an int8 tensor)."""
    out = source
    for op in chain:
        with gm.graph.inserting_before(before):
            new = gm.graph.create_node(op.op, op.target, (out, *op.args[1:]), dict(op.kwargs))
        out = new
    return out


def _existing_quantize(node: Node) -> Node | None:
    return next((u for u in node.users if u.target is ops.QUANTIZE), None)


def _feeds_integers(node: Node) -> bool:
    """Whether some consumer (through layout ops) quantizes this value again."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.target is ops.QUANTIZE:
            return True
        if is_layout(user):
            todo += list(user.users)
    return False


def _dequant_qparams(dq: Node) -> ann.QParams:
    return ann.QParams(arg(dq, "scale"), arg(dq, "zero_point"))


def _int8_of(gm: GraphModule, value, before: Node) -> tuple[Node, ann.QParams] | None:
    """(an int8 node holding `value`, its QParams), or None: the value's own quantize
    node, or the integer output a dequantize (through layout ops) came from."""
    if not isinstance(value, Node):
        return None
    found = _dequant_through_layout(value)
    if found is not None:
        dq, chain = found
        return _replay(gm, chain, arg(dq, "q"), before), _dequant_qparams(dq)
    q = _existing_quantize(value)
    return (q, ann.get(q, ann.QParams)) if q is not None else None


def _residual_adds(gm: GraphModule, ctx: PassContext) -> int:
    calib = ctx.analysis.get("calib", {})
    done = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, operator.add, torch.add) or ann.site(node, "add") is None:
            continue
        if not _feeds_integers(node):
            continue  # the sum enters a float island (a norm): adding in float loses nothing
        out = calib.get(ann.site(node, "add"))
        if out is None or out.scale is None:
            continue
        for i in (0, 1):
            found = _dequant_through_layout(node.args[i])
            other = _int8_of(gm, node.args[1 - i], node)
            if found is None or other is None:
                continue
            dq, chain = found
            aq = _replay(gm, chain, arg(dq, "q"), node)
            bq, b_qp = other
            a_qp = _dequant_qparams(dq)
            qmin, qmax = ACT_RANGE[ctx.options.recipe_obj.act.bits]
            with gm.graph.inserting_before(node):
                # (qa, sa, qb, sb) = (0, 1, 0, 1) until compute-dyadic
                yq = gm.graph.call_function(
                    ops.ADD_INT8, (aq, bq, a_qp.zero_point, b_qp.zero_point, 0, 1, 0, 1,
                                   out.zero_point, qmin, qmax))
                y = gm.graph.call_function(ops.DEQUANTIZE, (yq, out.scale, out.zero_point,
                                                            node.meta["val"].dtype))
            ann.put(yq, ann.PendingRequant((a_qp.scale / out.scale, b_qp.scale / out.scale)))
            ann.put(yq, ann.QParams(out.scale, out.zero_point))
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            done += 1
            break
    return done


def _round_trips(gm: GraphModule) -> int:
    done = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.QUANTIZE:
            continue
        found = _dequant_through_layout(node.args[0])
        if found is None:
            continue
        dq, chain = found
        ints = _replay(gm, chain, arg(dq, "q"), node)
        qp_in, qp_out = _dequant_qparams(dq), ann.QParams(arg(node, "scale"),
                                                          arg(node, "zero_point"))
        if qp_in != qp_out:  # another scale: rescale in integers
            with gm.graph.inserting_before(node):
                # (q, shift) = (0, 1) until compute-dyadic
                ints = gm.graph.call_function(
                    ops.REQUANT_INT8, (ints, qp_in.zero_point, 0, 1, qp_out.zero_point,
                                       arg(node, "qmin"), arg(node, "qmax")))
            ann.put(ints, ann.PendingRequant((qp_in.scale / qp_out.scale,)))
            ann.put(ints, qp_out)
        node.replace_all_uses_with(ints)
        gm.graph.erase_node(node)
        done += 1
    return done


def _float_outputs(gm: GraphModule) -> int:
    """Linears whose int8 output only feeds float islands: dequantize the accumulator."""
    done = 0
    for node in list(gm.graph.nodes):
        epi = ann.get(node, ann.FloatEpilogue)
        if node.target not in ops.REQUANT_OPS or epi is None:
            continue
        if not node.users or any(u.target is not ops.DEQUANTIZE for u in node.users):
            continue
        x, w, zp_term = arg(node, "x"), arg(node, "w"), arg(node, "zp_term")
        layer = ann.get(node, ann.Layer)
        name = (layer.name if layer else node.name).replace(".", "_")
        if epi.w_int8 is not None:  # int4 weights: the int8 GEMM runs on their int8 values
            w = add_constant(gm, f"{name}_w_unpacked", epi.w_int8, before=node)
        ws = add_constant(gm, f"{name}_w_scale", epi.w_scale, before=node)
        b = (add_constant(gm, f"{name}_bias_f", epi.bias, before=node)
             if epi.bias is not None else None)
        for dq in list(node.users):
            with gm.graph.inserting_before(dq):
                y = gm.graph.call_function(ops.LINEAR_INT8_DQ, (x, w, b, zp_term, epi.x_scale,
                                                                ws, arg(dq, "dtype")))
            ann.copy(node, y, ann.Layer)
            ann.copy(dq, y, ann.LayerOutput)
            dq.replace_all_uses_with(y)
            gm.graph.erase_node(dq)
        gm.graph.erase_node(node)
        done += 1
    return done


@graph_pass("integer-dataflow", requires=("rewrite-linear",))
def integer_dataflow(gm: GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.options.recipe_obj
    if recipe.requant != "dyadic":
        return PassResult(gm, False, {})
    counters = {"residual_adds": _residual_adds(gm, ctx), "round_trips_removed": 0}
    counters["round_trips_removed"] = _round_trips(gm)
    counters["float_outputs"] = _float_outputs(gm)
    erase_unused(gm)
    return PassResult(gm, modified=any(counters.values()), counters=counters)
