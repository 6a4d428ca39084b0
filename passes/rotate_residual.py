"""rotate-residual: rotate each residual stream by an orthogonal Q, folded into weights.

What: with Q [d, d] orthogonal (a randomized Hadamard H_d diag(s) / sqrt(d), where a
Hadamard matrix of order d exists -- 2^k or 2^k times 12, 20, ...; else a random
orthogonal matrix), the stream carries x Q instead of x:
    writers (output side)   linear W <- Q^T W, b <- Q^T b;  embedding / constant E <- E Q;
                            patch convolution W <- Q^T W over output channels
    readers (input side)    a linear reading the stream, or reading the output of an
                            RMSNorm without affine that reads it: W <- W Q (lm_head too)
    other readers           (the graph output, a non-linear op): an explicit un-rotation
                            x = had(x Q * s) inserted in front of them
RMSNorm without affine commutes with Q (it only divides by the norm, which Q keeps). An
RMSNorm that kept its gamma (fold-norm-affine could not fold it) becomes RMSNorm without
affine, un-rotation, then * gamma. Tied embeddings stay numerically equal but become
separate constants (the note says so).
Why: rotation spreads outlier channels of the stream over all channels, so the linears'
inputs quantize well (QuaRot / SpinQuant); offline it costs nothing at run time.
When it does not apply (recorded): post-norm streams (BERT); streams read by a
LayerNorm that layernorm-to-rmsnorm could not convert; writers that are not linear ops
of the weights (a graph input, a non-linear op); un-rotations needed where d has no
Hadamard matrix.
Pre: layernorm-to-rmsnorm (so norm affines are folded and LayerNorms are RMSNorms).
Post: same function, exactly in real arithmetic.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import add_constant
from qcompile.hadamard import is_hadamard_size, orthogonal_matrix, random_hadamard
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._shapes import is_linear_input, last_dim_consumers
from qcompile.passes._structure import (
    Reader,
    ResidualStream,
    Skips,
    WeightEditor,
    layer_name,
    linear_params,
    set_linear,
)
from qcompile.passes.analyze_structure import current
from qcompile.passes.layernorm_to_rmsnorm import edit_writer, stream_skip_reason
from qcompile.passes.online_hadamard import insert_hadamard, normalized_hadamard


def rotation(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Q [d, d] float64, signs s with Q = H_d diag(s) / sqrt(d), or None if no H_d)."""
    if not is_hadamard_size(d):
        return orthogonal_matrix(d, seed), None
    q = random_hadamard(d, seed)
    signs = (q * normalized_hadamard(d)).sum(0)  # column j of Q is s_j times column j of H
    return q, signs.round()


def _reader_ok(r: Reader) -> bool:
    return r.kind != "norm" or r.node.target is F.rms_norm


def _exits(stream: ResidualStream) -> list[tuple[Node, Node]]:
    """(consumer, node it reads) that must see the un-rotated value."""
    out = [(r.node, r.reads) for r in stream.readers if r.kind in ("output", "other")]
    for r in stream.readers:
        if r.kind == "norm" and r.node.args[2] is None:
            out += [(u, n) for u, n in last_dim_consumers(r.node) if not is_linear_input(u, n)]
        elif r.kind == "norm":
            out.append((r.node, r.node))  # an RMSNorm with gamma is split, see _split_norm
    return out


def _linear_readers(stream: ResidualStream) -> list[Node]:
    """Linears reading the stream, directly or through an RMSNorm without affine."""
    linears = [r.node for r in stream.readers if r.kind == "linear"]
    for r in stream.readers:
        if r.kind == "norm" and r.node.target is F.rms_norm and r.node.args[2] is None:
            linears += [u for u, n in last_dim_consumers(r.node) if is_linear_input(u, n)]
    return list(dict.fromkeys(linears))


class _Unrotate:
    """Inserts x * s -> had(.) = x diag(s) H^T / sqrt(d) = x Q^T, once per rotated value."""

    def __init__(self, gm: GraphModule, signs: torch.Tensor, dtype: torch.dtype):
        self.gm, self.made, self.values, self.signs = gm, {}, signs.to(dtype), None

    def __call__(self, x: Node) -> Node:
        if self.signs is None:  # the constant only once a value needs un-rotating
            first = next(n for n in self.gm.graph.nodes if n.op != "placeholder")
            self.signs = add_constant(self.gm, "rotate_residual_signs", self.values,
                                      before=first)
        if x not in self.made:  # right after x, so every reader of x can use it
            with self.gm.graph.inserting_after(x):
                flipped = self.gm.graph.call_function(operator.mul, (x, self.signs))
            self.made[x] = insert_hadamard(self.gm, flipped, before=flipped.next, tag="unrotate")
        return self.made[x]


def _split_norm(gm: GraphModule, norm: Node, unrotate: _Unrotate) -> None:
    """rms_norm(xQ, shape, gamma, eps) -> unrotate(rms_norm(xQ, shape, None, eps)) * gamma."""
    x, shape, gamma, eps = norm.args
    with gm.graph.inserting_after(norm):
        bare = gm.graph.call_function(F.rms_norm, (x, shape, None, eps))
    plain = unrotate(bare)
    with gm.graph.inserting_after(plain):
        out = gm.graph.call_function(operator.mul, (plain, gamma))
    norm.replace_all_uses_with(out)
    gm.graph.erase_node(norm)


def rotate_stream(gm: GraphModule, ctx: PassContext, ed: WeightEditor, stream: ResidualStream,
                  q: torch.Tensor, signs: torch.Tensor | None) -> dict[str, int]:
    counters = {"writers": 0, "readers": 0, "unrotations": 0}
    nodes = set(stream.nodes)
    for w in stream.writers:
        edit_writer(gm, ed, w, lambda t: t @ q, nodes)  # each written vector v -> v Q
        if w.kind == "linear":
            ctx.layer(layer_name(w.node), "linear").transforms.append("rotate-residual(out)")
        counters["writers"] += 1
    like = next(iter(stream.nodes)).meta["val"].dtype
    unrotate = _Unrotate(gm, signs, like) if signs is not None else None
    for lin in _linear_readers(stream):
        w, _ = linear_params(ed, lin)
        set_linear(ed, lin, weight=w @ q)
        ctx.layer(layer_name(lin), "linear").transforms.append("rotate-residual(in)")
        counters["readers"] += 1
    for user, reads in dict.fromkeys(_exits(stream)):
        if user is reads:
            _split_norm(gm, user, unrotate)
        else:
            user.replace_input_with(reads, unrotate(reads))
        counters["unrotations"] += 1
    return counters


@graph_pass("rotate-residual", requires=("layernorm-to-rmsnorm",))
def rotate_residual(gm: GraphModule, ctx: PassContext) -> PassResult:
    s = current(gm, ctx)
    ed = WeightEditor(gm)
    counters = {"streams": 0, "writers": 0, "readers": 0, "unrotations": 0, "skipped": 0}
    skips = Skips(ctx, "rotate-residual")
    for i, stream in enumerate(s.streams):
        reason = "post-norm graph: norms write the residual streams" if (
            s.style == "post-norm") else stream_skip_reason(stream, reader_ok=_reader_ok)
        if reason is None and not _linear_readers(stream):
            reason = "no linear reads the stream, so rotating it gains nothing"
        q, signs = rotation(stream.hidden, ctx.options.seed + i)
        if reason is None and signs is None and _exits(stream):
            reason = (f"values leave the stream un-normed at {[u.name for u, _ in _exits(stream)]}"
                      f" and d={stream.hidden} has no Hadamard matrix to un-rotate them online")
        if reason is not None:
            counters["skipped"] += 1
            skips.add(f"stream {stream.nodes[0].name}..{stream.nodes[-1].name}", reason)
            continue
        for k, v in rotate_stream(gm, ctx, ed, stream, q, signs).items():
            counters[k] += v
        counters["streams"] += 1
        kind = "randomized Hadamard" if signs is not None else "random orthogonal"
        ctx.note(f"rotate-residual: {stream.describe()} rotated by a {kind} Q")
    skips.flush()
    if ed.untied:
        ctx.note(f"rotate-residual: gave {sorted(set(ed.untied))} a separate copy per reader "
                 "(tied weights untied)")
    modified = counters["streams"] > 0
    return PassResult(gm, modified=modified, counters={k: v for k, v in counters.items() if v})
