"""compute-dyadic: every requantization gets its integer multiplier and shift.

What: the real multipliers the rewrites left in `PendingRequant` annotations become the
op's integer arguments, set by name: M = s_x * s_w[c] / s_y of linear_int8 / linear_w4a8
(float64 [N]) becomes int64 constants (q, shift) with M ~= q / 2**shift,
2**30 <= q < 2**31 (numerics.dyadic.quantize_multiplier: one rounding, the contract);
requant_int8 gets (q, shift) and add_int8 (qa, sa, qb, sb) for both sides. Computed
once, here, at compile time. A channel whose multiplier underflows (a weight row of
zeros: s_w is tiny) gets q = 0.
Pre: rewrite-linear (integer-dataflow if present). Post: no PendingRequant is left, and
every requantizing op has int64 q and shift constants (stage rules below): nothing float
is left in the integer path.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant, replace_constant
from qcompile.lowering import conv_ops, ops
from qcompile.lowering.registry import arg, set_arg
from qcompile.numerics.dyadic import quantize_multiplier
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.verify import register_rule


@graph_pass("compute-dyadic", requires=("rewrite-linear",))
def compute_dyadic(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"linear": 0, "requant": 0, "add": 0}
    for node in gm.graph.nodes:
        pending = ann.take(node, ann.PendingRequant)
        if pending is None:
            continue
        if node.target in ops.REQUANT_OPS:
            (mult,) = pending.multipliers
            q, shift = quantize_multiplier(mult, underflow="zero")
            replace_constant(gm, arg(node, "q"), q)
            replace_constant(gm, arg(node, "shift"), shift)
            counters["linear"] += 1
        elif node.target in (ops.REQUANT_INT8, conv_ops.AVG_POOL2D_INT8):
            (mult,) = pending.multipliers
            q, shift = quantize_multiplier(mult)
            set_arg(node, "q", q)
            set_arg(node, "shift", shift)
            counters["requant"] += 1
        elif node.target is ops.ADD_INT8:
            qa, sa, qb, sb = ops.add_multipliers(*pending.multipliers)
            for name, value in zip(("qa", "sa", "qb", "sb"), (qa, sa, qb, sb)):
                set_arg(node, name, value)
            counters["add"] += 1
        else:
            raise TypeError(f"no requantization to compute for {node.format_node()}")
    return PassResult(gm, modified=any(counters.values()),
                      counters={k: v for k, v in counters.items() if v})


@register_rule("compute-dyadic", "requantizing ops carry int64 multiplier and shift constants")
def _integer_multipliers(gm, node) -> bool:
    if node.target not in ops.REQUANT_OPS:
        return True
    q, s = get_constant(gm, arg(node, "q")), get_constant(gm, arg(node, "shift"))
    return q is not None and s is not None and q.dtype == s.dtype == torch.int64


@register_rule("compute-dyadic", "no requantization is left pending (PendingRequant)")
def _nothing_pending(gm, node) -> bool:
    return ann.get(node, ann.PendingRequant) is None
