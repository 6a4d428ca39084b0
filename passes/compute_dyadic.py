"""compute-dyadic: every requantization gets its integer multiplier and shift.

What: the float64 multipliers M = s_x * s_w[c] / s_y that rewrite-linear attached to
linear_int8 / linear_w4a8 become int64 constants (q, shift) with M ~= q / 2**shift,
2**30 <= q < 2**31 (numerics.dyadic.quantize_multiplier: one rounding, the contract);
add_int8 gets (qa, sa, qb, sb) for both sides. Computed once, here, at compile time.
A channel whose multiplier underflows (a weight row of zeros: s_w is tiny) gets q = 0.
Pre: rewrite-linear (integer-dataflow if present). Post: every requantizing op has int64
q and shift constants (rule in verify.py): nothing float is left in the integer path.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcompile.fx_utils import get_constant, replace_constant
from qcompile.lowering import ops
from qcompile.numerics.dyadic import quantize_multiplier
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.verify import register_rule


@graph_pass("compute-dyadic", requires=("rewrite-linear",))
def compute_dyadic(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"linear": 0, "add": 0}
    for node in gm.graph.nodes:
        if node.target in ops.REQUANT_OPS:
            m_node, s_node = node.args[4], node.args[5]
            mult = get_constant(gm, m_node)
            if mult.dtype != torch.float64:
                continue  # already integer
            q, shift = quantize_multiplier(mult, underflow="zero")
            replace_constant(gm, m_node, q)
            replace_constant(gm, s_node, shift)
            counters["linear"] += 1
        elif node.target is ops.REQUANT_INT8 and "qc_requant_multiplier" in node.meta:
            q, shift = quantize_multiplier(node.meta.pop("qc_requant_multiplier"))
            args = list(node.args)
            args[2:4] = [q, shift]
            node.args = tuple(args)
            counters["requant"] = counters.get("requant", 0) + 1
        elif node.target is ops.ADD_INT8 and "qc_add_multipliers" in node.meta:
            qa, sa, qb, sb = ops.add_multipliers(*node.meta.pop("qc_add_multipliers"))
            args = list(node.args)
            args[4:8] = [qa, sa, qb, sb]
            node.args = tuple(args)
            counters["add"] += 1
    return PassResult(gm, modified=any(counters.values()), counters=counters)


@register_rule("compute-dyadic", "requantizing ops carry int64 multiplier and shift constants")
def _integer_multipliers(gm, node) -> bool:
    if node.target not in ops.REQUANT_OPS:
        return True
    q, s = get_constant(gm, node.args[4]), get_constant(gm, node.args[5])
    return q is not None and s is not None and q.dtype == s.dtype == torch.int64
