"""online-hadamard: Hadamard transforms computed at run time where no offline fold is valid.

What: inserts `torch.ops.qcompile.hadamard_transform(x)` (lowering/ops.py: y = x @ H_n^T /
sqrt(n) over the last dim, in float) and folds the inverse into the consumer offline:
- before every MLP down projection: x -> had(x), W_down <- W_down H^T / sqrt(n);
- on q and k of every attention, at the sdpa inputs (after RoPE and the KV cache):
  had(q) had(k)^T = q k^T, so the scores are unchanged;
- in post-norm graphs (BERT), where the residual stream cannot be rotated offline
  (rotate-residual skips them), on the inputs of the linears reading a norm's output:
  one had(x) per input, shared by the linears reading it, each W <- W H^T / sqrt(n).
Why: the down projection's input (after the gated activation) and q/k carry outlier
channels that no offline rotation reaches (QuaRot); a Hadamard spreads them over all
channels before they are quantized.
When it does not apply: a size with no Hadamard matrix (qcompile.hadamard), a site that
already has one, q / k of an attention that stays float (rewrite_attention's
float_attention_reason: on CPU under kernels="auto", 5% of a w4a4 all-MiniLM-L6-v2
forward for nothing); each skip is recorded (ctx.note, and per layer). A Hadamard whose
linears all stay float (select-layers decides that next) is taken out again there.
Pre: analyze-structure. Post: the graph computes the same function (exactly in real
arithmetic); inserted nodes carry meta["qc_online_hadamard"] = "down" | "q" | "k" |
"input"; linears record "online-hadamard(...)" in their report entry, attention nodes in
meta["qc_transforms"]. The op has a fake implementation, so shapes propagate (symbolic
ones too).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import is_call
from qcompile.hadamard import hadamard_matrix, is_hadamard_size
from qcompile.lowering.ops import HADAMARD
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._shapes import last_size
from qcompile.passes._structure import Skips, WeightEditor, layer_name, linear_params, set_linear
from qcompile.passes.analyze_structure import current


def normalized_hadamard(n: int) -> torch.Tensor:
    """H_n / sqrt(n) in float64: the matrix `hadamard_transform` multiplies by (x @ it.T)."""
    return hadamard_matrix(n, torch.float64) / math.sqrt(n)


def insert_hadamard(gm: GraphModule, x: Node, *, before: Node, tag: str) -> Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(HADAMARD, (x,))
    node.meta["qc_online_hadamard"] = tag
    return node


def is_hadamard(node) -> bool:
    return is_call(node, HADAMARD)


def _first(gm: GraphModule, nodes: list[Node]) -> Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return min(nodes, key=order.__getitem__)


def rotate_linear_inputs(gm: GraphModule, ctx: PassContext, ed: WeightEditor, reads: Node,
                         linears: list[Node], tag: str) -> str | None:
    """had(reads) feeds `linears` (W <- W H^T / sqrt(n) each); returns a skip reason."""
    n = last_size(reads)
    if n is None or not is_hadamard_size(n):
        return f"input size {n} has no Hadamard matrix"
    if is_hadamard(reads) or any(lin.meta.get("qc_online_hadamard") for lin in linears):
        return "already rotated online"
    h = normalized_hadamard(n)
    had = insert_hadamard(gm, reads, before=_first(gm, linears), tag=tag)
    for lin in linears:
        w, _ = linear_params(ed, lin)
        set_linear(ed, lin, weight=w @ h.T)
        lin.args = (had, *lin.args[1:])
        lin.meta["qc_online_hadamard"] = tag
        ctx.layer(layer_name(lin), "linear").transforms.append(f"online-hadamard({tag})")
    return None


def _rotate_qk(gm: GraphModule, ctx: PassContext, sdpa: Node) -> str | None:
    from qcompile.passes.rewrite_attention import float_attention_reason

    q, k = sdpa.args[0], sdpa.args[1]
    float_reason = float_attention_reason(ctx, q)
    if float_reason is not None:
        return f"the attention stays float ({float_reason}): rotating q and k only costs time"
    d = last_size(q)
    if d is None or d != last_size(k) or not is_hadamard_size(d):
        return f"head size {d} has no Hadamard matrix"
    if is_hadamard(q) or is_hadamard(k):
        return "already rotated online"
    hq = insert_hadamard(gm, q, before=sdpa, tag="q")
    hk = hq if k is q else insert_hadamard(gm, k, before=sdpa, tag="k")
    sdpa.args = (hq, hk, *sdpa.args[2:])
    # attention layer records are named when the report is made (their site names change
    # as rewrites replace the projections), so the transform is kept on the node
    sdpa.meta.setdefault("qc_transforms", []).append("online-hadamard(q,k)")
    return None


@graph_pass("online-hadamard", requires=("analyze-structure",))
def online_hadamard(gm: GraphModule, ctx: PassContext) -> PassResult:
    s = current(gm, ctx)
    ed = WeightEditor(gm)
    counters: Counter[str] = Counter()
    skips = Skips(ctx, "online-hadamard")

    def done(reason, what, key):
        if reason is None:
            counters[key] += 1
        else:
            counters["skipped"] += 1
            skips.add(what, reason)

    for lin in s.mlp_down:
        reason = rotate_linear_inputs(gm, ctx, ed, lin.args[0], [lin], "down")
        done(reason, f"down projection {layer_name(lin)}", "down_proj")
        if reason:
            ctx.layer(layer_name(lin), "linear").detail["online-hadamard"] = reason
    for att in s.attention:
        rope = " (after RoPE)" if att.q is not None and att.q.rope else ""
        done(_rotate_qk(gm, ctx, att.sdpa), f"q/k of {att.sdpa.name}{rope}", "qk")
    if s.style == "post-norm":
        groups: dict[Node, list[Node]] = {}
        for site in s.norms:
            for user, reads in site.consumers:
                if is_call(user, F.linear) and user.args[0] is reads and user not in s.mlp_down:
                    groups.setdefault(reads, []).append(user)
        for reads, linears in groups.items():
            names = ", ".join(layer_name(lin) for lin in linears)
            done(rotate_linear_inputs(gm, ctx, ed, reads, linears, "input"),
                 f"post-norm inputs of {names}", "post_norm_inputs")
    skips.flush()
    if ed.untied:
        ctx.note(f"online-hadamard: gave {sorted(set(ed.untied))} a separate copy per reader")
    counters = Counter({k: v for k, v in counters.items() if v})
    modified = any(k != "skipped" for k in counters)
    return PassResult(gm, modified=modified, counters=dict(counters))
