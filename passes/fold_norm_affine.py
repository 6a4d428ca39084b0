"""fold-norm-affine: a norm's gamma / beta move into the linears that read its output.

What: for y = norm(x) * gamma + beta read only by linears (through layout ops),
    W' = W diag(gamma),   b' = b + W beta          (float64, cast back)
for every consuming linear, and the norm keeps weight None / bias None. A weight shared
with another reader (tied embeddings) is copied for this linear only.
Why: a norm without affine parameters commutes with an orthogonal rotation of its input
(RMSNorm(x Q) = RMSNorm(x) Q), which rotate-residual needs; and LayerNorm -> RMSNorm
needs the bias out of the way. It is exact in real arithmetic.
When it does not apply (recorded with ctx.note): a post-norm graph (norms write the
streams, so rotate-residual and layernorm-to-rmsnorm leave them alone and a fold would buy
nothing; it costs much: gamma moved into the weights widens the range of their columns by
gamma's (0 to 20 on Gemma 3 270M's sandwich norms, whose int4 per-channel weights then
took its perplexity from 85 to 1e10 in a float simulation); a norm whose output is read
by anything but a linear's input (a residual add, the graph output, attention), one
that normalizes more than the last dim, or one whose gamma / beta is not a constant.
Pre: analyze-structure. Post: every norm it folded has weight (and bias) None; the
graph computes the same function.
"""

from __future__ import annotations

from torch.fx import GraphModule

from qcompile.fx_utils import erase_unused, get_constant
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._shapes import is_linear_input
from qcompile.passes._structure import (
    NormSite,
    Skips,
    WeightEditor,
    layer_name,
    linear_params,
    op_name,
    set_linear,
)
from qcompile.passes.analyze_structure import current


def _skip_reason(gm: GraphModule, site: NormSite) -> str | None:
    node = site.node
    if site.hidden is None:
        return "it normalizes more than the last dim"
    for arg in node.args[2:4] if site.kind == "layer_norm" else node.args[2:3]:
        if arg is not None and get_constant(gm, arg) is None:
            return "its weight or bias is not a constant"
    if not site.all_linear:
        others = sorted({op_name(u) for u, r in site.consumers if not is_linear_input(u, r)})
        return f"the norm's output is also read by {others}, not only by linears"
    return None


@graph_pass("fold-norm-affine", requires=("analyze-structure",))
def fold_norm_affine(gm: GraphModule, ctx: PassContext) -> PassResult:
    s = current(gm, ctx)
    ed = WeightEditor(gm)
    counters = {"folded": 0, "linears": 0, "skipped": 0}
    skips = Skips(ctx, "fold-norm-affine")
    if s.style == "post-norm":
        skips.add("every norm", "post-norm graph: no stream is rotated, and gamma folded into "
                                "the weights would only widen their columns' range")
        skips.flush()
        return PassResult(gm, modified=False, counters={"skipped": len(s.norms)})
    for site in s.norms:
        node = site.node
        is_ln = site.kind == "layer_norm"
        gamma_node = node.args[2]
        beta_node = node.args[3] if is_ln else None
        if gamma_node is None and beta_node is None:
            continue
        reason = _skip_reason(gm, site)
        if reason is not None:
            counters["skipped"] += 1
            skips.add(node.name, reason)
            continue
        gamma = ed.get64(node, 2)
        beta = ed.get64(node, 3) if beta_node is not None else None
        for lin in site.linears:
            w, b = linear_params(ed, lin)
            new_w = w * gamma[None, :] if gamma is not None else None
            new_b = None
            if beta is not None:
                new_b = w @ beta + (b if b is not None else 0.0)
            set_linear(ed, lin, weight=new_w, bias=new_b)
            ctx.layer(layer_name(lin), "linear").transforms.append(f"fold-norm({node.name})")
            counters["linears"] += 1
        node.args = (node.args[0], node.args[1], None, None, node.args[4]) if is_ln else (
            node.args[0], node.args[1], None, node.args[3])
        counters["folded"] += 1
    skips.flush()
    if ed.untied:
        ctx.note(f"fold-norm-affine: gave {sorted(set(ed.untied))} a separate copy per "
                 "reader (tied weights untied)")
    if counters["folded"]:
        erase_unused(gm)
    return PassResult(gm, modified=counters["folded"] > 0,
                      counters={k: v for k, v in counters.items() if v})
