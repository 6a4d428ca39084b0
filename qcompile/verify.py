"""Stage contracts as data: each rule holds from the pass that establishes it onwards.

`verify_graph(gm, ctx, after=name)` checks every rule whose `since` pass has run (the
current one included). The pass manager calls it after every pass when
`options.verify` is on; the test suite turns that on for every compile.
Passes append their own rules with `register_rule` next to the pass that establishes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import get_constant, is_call


class GraphVerificationError(AssertionError):
    pass


@dataclass(frozen=True)
class Rule:
    since: str  # the pass after which the rule must hold
    what: str  # what must hold, as the error message states it
    check: Callable[[GraphModule, Node], bool]  # per node: True when the node is fine


RULES: list[Rule] = []


def register_rule(since: str, what: str) -> Callable:
    def wrap(check: Callable[[GraphModule, Node], bool]):
        RULES.append(Rule(since, what, check))
        return check

    return wrap


@register_rule("freeze-params", "every node has shape/dtype metadata (meta['val'])")
def _has_val(gm: GraphModule, node: Node) -> bool:
    return node.op == "output" or "val" in node.meta


@register_rule("freeze-params", "no placeholder is a model parameter or buffer")
def _no_param_placeholders(gm: GraphModule, node: Node) -> bool:
    return node.op != "placeholder" or not node.meta.get("qc_is_param", False)


@register_rule("freeze-params", "every node records the pass that made it (meta['qc_pass'])")
def _provenance(gm: GraphModule, node: Node) -> bool:
    return node.op == "output" or "qc_pass" in node.meta


@register_rule("freeze-params", "no argument is a symbolic size literal (a SymInt prints as an "
               "expression over size names the graph may have freed: use a sym_size node)")
def _no_symint_literals(gm: GraphModule, node: Node) -> bool:
    found = []
    torch.fx.node.map_aggregate((node.args, node.kwargs),
                                lambda a: found.append(a) if isinstance(a, torch.SymInt) else a)
    return not found


@register_rule("canonicalize-linear", "linear weights are 2-D constants (get_attr)")
def _linear_weight_const(gm: GraphModule, node: Node) -> bool:
    if not is_call(node, F.linear):
        return True
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    w = get_constant(gm, w) if isinstance(w, Node) else None
    return w is not None and w.dim() == 2


@register_rule("canonicalize-linear", "no spelling of linear against a constant weight "
               "(addmm / matmul / mm / keyword linear) is left")
def _no_linear_spellings(gm: GraphModule, node: Node) -> bool:
    from qcompile.passes.canonicalize_linear import match_linear

    return match_linear(gm, node) is None


@register_rule("canonicalize-attention", "attention is sdpa with q, k, v positional and "
               "attn_mask, dropout_p, is_causal, scale, enable_gqa as keywords")
def _sdpa_normal(gm: GraphModule, node: Node) -> bool:
    if not is_call(node, F.scaled_dot_product_attention):
        return True
    keys = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
    return len(node.args) == 3 and set(node.kwargs) == keys


@register_rule("canonicalize-norm", "norms are F.layer_norm(x, shape, w, b, eps) or "
               "F.rms_norm(x, shape, w, eps), all positional")
def _norm_normal(gm: GraphModule, node: Node) -> bool:
    if is_call(node, F.layer_norm):
        return len(node.args) == 5 and not node.kwargs
    if is_call(node, F.rms_norm):
        return len(node.args) == 4 and not node.kwargs
    return True


def verify_graph(gm: GraphModule, ctx, *, after: str) -> None:
    active = set(ctx.passes_run) | {after}
    rules = [r for r in RULES if r.since in active]
    problems = []
    for node in gm.graph.nodes:
        for rule in rules:
            if not rule.check(gm, node):
                problems.append(f"  {node.format_node()}\n    violates: {rule.what} "
                                f"(holds since {rule.since!r})")
    if problems:
        raise GraphVerificationError(
            f"graph {ctx.name!r} after pass {after!r} breaks {len(problems)} stage rule(s):\n"
            + "\n".join(problems[:20])
        )
