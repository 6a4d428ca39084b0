"""select-layers: decide which linears the recipe quantizes, and say why not for the rest.

What: annotates every canonical linear with a `Layer` (annotations.py): its name and
whether it is quantized; records in the report why it stays in float when not: the layer
matches an option `skip` pattern; its K is too large for exact int32 accumulation
(K > 131071, DESIGN's range rule); int4 weights need an even K. Records the layer in the
report either way.
Why a pass of its own: observers, weight quantization and the rewrites all ask the same
question and must agree.
Pre: canonicalize-linear. Post: every F.linear has a Layer annotation.
"""

from __future__ import annotations

import fnmatch

from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.lowering.reference import MAX_SAFE_K
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.sites import is_linear, linear_name


def layer_reason(name: str, k: int, ctx: PassContext) -> str | None:
    opts = ctx.options
    recipe = opts.recipe_obj
    if not recipe.quantizes:
        return f"recipe {recipe.name!r} quantizes nothing"
    for pattern in opts.skip:
        if fnmatch.fnmatch(name, pattern):
            return f"skipped by option skip={pattern!r}"
    if k > MAX_SAFE_K:
        return f"K={k} > {MAX_SAFE_K}: int32 accumulation could overflow"
    if recipe.weight.bits == 4 and k % 2:
        return f"K={k} is odd: int4 weights pack two per byte along K"
    return None


@graph_pass("select-layers", requires=("canonicalize-linear",))
def select_layers(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"quantize": 0, "float": 0}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        name = linear_name(node)
        k = node.args[1].meta["val"].shape[1]
        reason = layer_reason(name, k, ctx)
        rec = ctx.layer(name, "linear")
        ann.put(node, ann.Layer(name, quantize=reason is None))
        if reason is None:
            counters["quantize"] += 1
        else:
            rec.reason = reason
            counters["float"] += 1
    return PassResult(gm, modified=False, counters=counters)
