"""layernorm-to-rmsnorm: LayerNorm becomes RMSNorm by keeping the residual stream
zero-mean (QuaRot / SliceGPT).

What: for a residual stream (analyze-structure) read only by LayerNorms, every writer's
output side is centred, so every stream value has zero mean over the hidden dim:
    linear   W' = W - mean_rows(W),  b' = b - mean(b)   (each output vector centred)
    embedding / constant  E' = E - mean over the last dim
    convolution  W' and b' centred over the output channels
and each LayerNorm reading it becomes F.rms_norm(x, shape, gamma, eps) (+ beta as an
explicit add when fold-norm-affine could not fold it): with mean(x) = 0,
LayerNorm(x) = x / sqrt(mean(x^2) + eps) * gamma + beta exactly. Since LayerNorm(x - c 1)
= LayerNorm(x) for any per-token c, centring the writers does not change what any
LayerNorm reader sees.
Why: RMSNorm without affine commutes with an orthogonal Q; LayerNorm does not (it
projects out the all-ones direction), so rotate-residual needs this first.
When it does not apply (recorded): post-norm streams (a norm writes the stream: BERT);
a stream read by anything but LayerNorm (a linear, the graph output, an RMSNorm, which
is not mean-invariant); a writer that cannot absorb the centring (a value computed by
a non-linear op, a graph input).
Pre: fold-norm-affine. Post: the converted streams are read by RMSNorms only.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._structure import (
    ResidualStream,
    Skips,
    WeightEditor,
    Writer,
    layer_name,
    linear_params,
    op_name,
    param_name,
    set_linear,
)
from qcompile.passes.analyze_structure import current


def stream_skip_reason(stream: ResidualStream, *, reader_ok) -> str | None:
    """Why a transform of the whole stream is not valid, or None."""
    if stream.post_norm:
        return "post-norm: a norm writes the stream"
    bad = sorted({f"{w.node.name} ({op_name(w.node)})" for w in stream.writers
                  if not w.foldable})
    if bad:
        return f"writers {bad} cannot absorb the transform"
    bad = sorted({f"{r.node.name} ({op_name(r.node)})" for r in stream.readers
                  if not reader_ok(r)})
    if bad:
        return f"readers {bad} are not invariant to it"
    return None


def edit_writer(gm: GraphModule, ed: WeightEditor, w: Writer, fn, stream_nodes) -> None:
    """Apply fn (a map of the last dim, float64 [..., d] -> [..., d]) to what w writes."""
    node = w.source
    if w.kind == "linear":
        weight, bias = linear_params(ed, node)
        set_linear(ed, node, weight=fn(weight.T).T, bias=fn(bias) if bias is not None else None)
    elif w.kind == "embedding":
        ed.set(node, 1, fn(ed.get64(node, 1)), like=ed.get(node, 1), name=param_name(
            node.args[1]))
    elif w.kind == "conv":
        weight = ed.get64(node, 1)
        flat = weight.reshape(weight.shape[0], -1)  # [C_out, C_in * kernel]
        ed.set(node, 1, fn(flat.T).T.reshape(weight.shape), like=ed.get(node, 1),
               name=param_name(node.args[1]))
        if len(node.args) > 2 and node.args[2] is not None:
            ed.set(node, 2, fn(ed.get64(node, 2)), like=ed.get(node, 2),
                   name=param_name(node.args[2]))
    elif w.kind == "constant":
        users = [u for u in node.users if u in stream_nodes]
        ed.set_node(node, fn(ed.value64(node)), users)
    else:
        raise AssertionError(f"writer kind {w.kind} is not foldable")


def _center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)


@graph_pass("layernorm-to-rmsnorm", requires=("fold-norm-affine",))
def layernorm_to_rmsnorm(gm: GraphModule, ctx: PassContext) -> PassResult:
    s = current(gm, ctx)
    ed = WeightEditor(gm)
    counters = {"streams": 0, "writers": 0, "converted": 0, "skipped": 0}
    skips = Skips(ctx, "layernorm-to-rmsnorm")
    for stream in s.streams:
        if not any(r.kind == "norm" and r.node.target is F.layer_norm for r in stream.readers):
            continue  # no LayerNorm to convert (an RMSNorm model)
        reason = "post-norm graph: norms write the residual streams" if (
            s.style == "post-norm") else stream_skip_reason(
            stream, reader_ok=lambda r: r.kind == "norm" and r.node.target is F.layer_norm)
        if reason is not None:
            counters["skipped"] += 1
            skips.add(f"stream {stream.nodes[0].name}..{stream.nodes[-1].name}", reason)
            continue
        nodes = set(stream.nodes)
        for w in stream.writers:
            edit_writer(gm, ed, w, _center, nodes)
            if w.kind == "linear":
                ctx.layer(layer_name(w.node), "linear").transforms.append("zero-mean(out)")
            counters["writers"] += 1
        for r in {r.node: r for r in stream.readers}.values():
            x, shape, gamma, beta, eps = r.node.args
            with gm.graph.inserting_after(r.node):
                out = gm.graph.call_function(F.rms_norm, (x, shape, gamma, eps))
            if beta is not None:  # not folded: the bias stays an explicit add
                with gm.graph.inserting_after(out):
                    out = gm.graph.call_function(operator.add, (out, beta))
            r.node.replace_all_uses_with(out)
            gm.graph.erase_node(r.node)
            counters["converted"] += 1
        counters["streams"] += 1
    skips.flush()
    if ed.untied:
        ctx.note(f"layernorm-to-rmsnorm: gave {sorted(set(ed.untied))} a separate copy per "
                 "reader (tied weights untied)")
    modified = counters["streams"] > 0
    return PassResult(gm, modified=modified, counters={k: v for k, v in counters.items() if v})
