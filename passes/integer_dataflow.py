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

from qcompile.fx_utils import add_constant, erase_unused, is_call
from qcompile.lowering import ops
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


def _int8_of(gm: GraphModule, value, before: Node):
    """(an int8 node holding `value`, its (scale, zero point)), or None: the value's own
    quantize node, or the integer output a dequantize (through layout ops) came from."""
    if not isinstance(value, Node):
        return None
    found = _dequant_through_layout(value)
    if found is not None:
        dq, chain = found
        return _replay(gm, chain, dq.args[0], before), (dq.args[1], dq.args[2])
    q = _existing_quantize(value)
    return (q, q.meta["qc_qparams"]) if q is not None else None


def _residual_adds(gm: GraphModule, ctx: PassContext) -> int:
    calib = ctx.analysis.get("calib", {})
    done = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, operator.add, torch.add) or "qc_add_site" not in node.meta:
            continue
        if not _feeds_integers(node):
            continue  # the sum enters a float island (a norm): adding in float loses nothing
        out = calib.get(node.meta["qc_add_site"])
        if out is None or out.scale is None:
            continue
        for i in (0, 1):
            found = _dequant_through_layout(node.args[i])
            other = _int8_of(gm, node.args[1 - i], node)
            if found is None or other is None:
                continue
            dq, chain = found
            aq = _replay(gm, chain, dq.args[0], node)
            bq, (s_b, zp_b) = other
            s_a, zp_a = dq.args[1], dq.args[2]
            qmin, qmax = ACT_RANGE[ctx.options.recipe_obj.act.bits]
            with gm.graph.inserting_before(node):
                yq = gm.graph.call_function(
                    ops.ADD_INT8, (aq, bq, zp_a, zp_b, 0, 1, 0, 1, out.zero_point, qmin, qmax))
                y = gm.graph.call_function(ops.DEQUANTIZE, (yq, out.scale, out.zero_point,
                                                            node.meta["val"].dtype))
            yq.meta["qc_add_multipliers"] = (s_a / out.scale, s_b / out.scale)
            yq.meta["qc_out_qparams"] = (out.scale, out.zero_point)
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
        ints = _replay(gm, chain, dq.args[0], node)
        (s_in, zp_in), (s_out, zp_out) = dq.args[1:3], node.args[1:3]
        if (s_in, zp_in) != (s_out, zp_out):  # another scale: rescale in integers
            with gm.graph.inserting_before(node):
                ints = gm.graph.call_function(
                    ops.REQUANT_INT8, (ints, zp_in, 0, 1, zp_out, node.args[3], node.args[4]))
            ints.meta["qc_requant_multiplier"] = s_in / s_out
            ints.meta["qc_out_qparams"] = (s_out, zp_out)
        node.replace_all_uses_with(ints)
        gm.graph.erase_node(node)
        done += 1
    return done


def _float_outputs(gm: GraphModule) -> int:
    """Linears whose int8 output only feeds float islands: dequantize the accumulator."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.target not in ops.REQUANT_OPS or "qc_float_epilogue" not in node.meta:
            continue
        if not node.users or any(u.target is not ops.DEQUANTIZE for u in node.users):
            continue
        x_scale, w_scale, bias, w_int8 = node.meta["qc_float_epilogue"]
        x, w, _, zp_term = node.args[:4]
        layer = node.meta.get("qc_layer")
        name = (layer or node.name).replace(".", "_")
        if w_int8 is not None:  # int4 weights: the int8 GEMM runs on their unpacked values
            w = add_constant(gm, f"{name}_w_unpacked", w_int8, before=node)
        ws = add_constant(gm, f"{name}_w_scale", w_scale, before=node)
        b = add_constant(gm, f"{name}_bias_f", bias, before=node) if bias is not None else None
        for dq in list(node.users):
            with gm.graph.inserting_before(dq):
                y = gm.graph.call_function(ops.LINEAR_INT8_DQ, (x, w, b, zp_term, x_scale, ws,
                                                                dq.args[3], "cpu", ""))
            y.meta.update({k: v for k, v in dq.meta.items() if k.startswith("qc_layer")})
            y.meta["qc_layer"] = layer
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
