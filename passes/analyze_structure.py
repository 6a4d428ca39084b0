"""analyze-structure: find what the equivalence transforms need, from the graph alone.

What (stored as a `Structure`, passes/_structure.py, in ctx.analysis["structure"]):
- norms: every F.layer_norm / F.rms_norm with the consumers of its output, looking
  through ops that keep the last dim (views, transposes, token slices: `keeps_last_dim`
  in passes/_shapes.py), and whether it reads a residual stream ("pre") or writes one
  ("post");
- residual streams: the values connected by residual adds (and token concats, scalar
  scales, ops that keep the last dim), every writer into them (linears, embeddings incl.
  position embeddings, patch convolutions, constants such as biases, class tokens and
  position tables; norms in post-norm graphs; anything else) and every reader (norms,
  linears, graph outputs, anything else);
- attention: per sdpa, the q/k/v projections (linear and channel region, so fused QKV
  works), head count, KV head count (grouped KV), head size, whether q/k are rotated by
  RoPE (x * cos + cat(-x2, x1) * sin) after the projection, and where its output goes
  (the o projection);
- MLP down projections: linears that write a stream, directly or through a norm of
  their own output (the sandwich norms of Gemma), and whose input is computed from other
  linears (activation, gating) rather than attention;
- style: "pre-norm" (LLaMA, GPT-2, OPT, ViT), "post-norm" (BERT, and Gemma's sandwich
  norms: a norm writes the stream) or "none"; tied embeddings (lm_head reads the
  embedding's tensor).

Why: the transforms must be valid for any traced graph; they decide from this, not from
module names. The analysis is structural: no weights are read, nothing is run.
Pre: canonicalize-linear, canonicalize-attention, canonicalize-norm (one spelling each).
Post: the graph is unchanged. Transform passes re-run `analyze` on the graph they get,
so a result is never stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import get_constant, is_call, is_method, tensor_val
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._channel_flow import channel_flows, rope_map
from qcompile.passes._shapes import (
    concrete,
    is_linear_input,
    keeps_last_dim,
    last_dim_consumers,
    last_dim_producer,
    last_size,
    size_at,
    value_users,
)
from qcompile.passes._structure import (
    NORMS,
    Attention,
    NormSite,
    Reader,
    ResidualStream,
    Structure,
    Writer,
    combine_operands,
)


def norm_hidden(norm: Node) -> int | None:
    """d when the norm normalizes exactly the last dim, of size d."""
    shape = norm.args[1] if len(norm.args) > 1 else None
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return None
    d = last_size(norm.args[0])
    return d if d is not None and concrete(shape[0]) == d else None


# --------------------------------------------------------------------------- streams


def conv_writer(gm: GraphModule, node: Node) -> Node | None:
    """The convolution whose output channels are node's last dim (a ViT patch embedding:
    conv2d -> flatten(2) -> transpose(1, 2)), else None."""
    val = tensor_val(node)
    if val is None:
        return None
    axis, chain = val.dim() - 1, []
    while not is_call(node, F.conv1d, F.conv2d, F.conv3d):
        src = node.args[0] if node.args else None
        if not isinstance(src, Node) or tensor_val(src) is None or (
                chain and len(node.users) != 1):
            return None
        nd = tensor_val(src).dim()
        if is_method(node, "transpose") or is_call(node, torch.transpose):
            a, b = (d % nd for d in node.args[1:3])
            axis = b if axis == a else a if axis == b else axis
        elif is_method(node, "permute") or is_call(node, torch.permute):
            perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            axis = perm[axis] % nd
        elif is_method(node, "flatten") or is_call(node, torch.flatten):
            start = (node.args[1] if len(node.args) > 1 else 0) % nd
            end = (node.args[2] if len(node.args) > 2 else -1) % nd
            if axis == start and start != end:
                return None
            axis = axis if axis < start else axis + (end - start)
        elif is_method(node, "contiguous"):
            pass
        else:
            return None
        chain.append(node)
        node = src
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if axis != 1 or groups != 1 or get_constant(gm, node.args[1]) is None:
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None and get_constant(gm, bias) is None:
        return None
    return node


def _writer(gm: GraphModule, node: Node, d: int) -> Writer:
    if is_call(node, F.linear) and last_size(node) == d:
        return Writer(node, "linear", source=node)
    if is_call(node, F.embedding) and get_constant(gm, node.args[1]) is not None:
        max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
        return Writer(node, "embedding" if max_norm is None else "other", source=node)
    if node.op == "get_attr" and get_constant(gm, node) is not None:
        return Writer(node, "constant", source=node)
    if is_call(node, *NORMS):
        return Writer(node, "norm", source=node)
    conv = conv_writer(gm, node)
    if conv is not None:
        return Writer(node, "conv", source=conv)
    return Writer(node, "other", source=node)


def _reader_kind(user: Node, reads: Node, d: int) -> str:
    if user.op == "output":
        return "output"
    if is_call(user, *NORMS) and user.args[0] is reads and norm_hidden(user) == d:
        return "norm"
    if is_linear_input(user, reads):
        return "linear"
    return "other"


def _joins(user: Node, node: Node, d: int) -> bool:
    """user carries stream values on: a residual add/concat/scale of node, or an op that
    keeps its last dim."""
    ops = combine_operands(user, d)
    return (ops is not None and node in ops) or keeps_last_dim(user) is node


def stream_from(gm: GraphModule, seed: Node, d: int) -> ResidualStream:
    """The connected residual stream around seed (a norm's input), both directions."""
    stream: dict[Node, None] = {}
    writers: dict[Node, Writer] = {}
    work: list[Node] = []

    def visit(node) -> None:
        if not isinstance(node, Node) or node in stream or node in writers:
            return
        if combine_operands(node, d) is not None or keeps_last_dim(node) is not None:
            stream[node] = None
        else:
            writers[node] = _writer(gm, node, d)
        work.append(node)

    visit(seed)
    while work:
        node = work.pop()
        if node in stream:
            for operand in combine_operands(node, d) or [keeps_last_dim(node)]:
                visit(operand)
        for user in value_users(node):
            if user not in stream and _joins(user, node, d):
                visit(user)
    readers = [Reader(u, n, _reader_kind(u, n, d))
               for n in (*stream, *writers) for u in value_users(n) if u not in stream]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return ResidualStream(d, sorted(stream, key=order.__getitem__),
                          sorted(writers.values(), key=lambda w: order[w.node]), readers)


def find_streams(gm: GraphModule, norms: list[Node]) -> list[ResidualStream]:
    streams, claimed = [], set()
    for norm in norms:
        d = norm_hidden(norm)
        seed = norm.args[0]
        if d is None or seed in claimed:
            continue
        s = stream_from(gm, seed, d)
        claimed.update(s.nodes, (w.node for w in s.writers))
        if s.adds:  # a norm after a plain linear is no residual stream
            streams.append(s)
    return streams


# --------------------------------------------------------------------------- attention


def find_attention(gm: GraphModule) -> list[Attention]:
    ropes = rope_map(gm)
    found: dict[Node, Attention] = {}
    for node in gm.graph.nodes:
        if not is_call(node, F.scaled_dot_product_attention):
            continue
        q, k = node.args[0], node.args[1]
        nd = tensor_val(q).dim() if tensor_val(q) is not None else 0
        att = Attention(node, size_at(q, -3) if nd >= 3 else None,
                        size_at(k, -3) if nd >= 3 else None, last_size(q))
        width = (att.num_heads or 0) * (last_size(node) or 0)
        if width:
            att.o_flows = channel_flows(node, width, head_dim=last_size(node), ropes=ropes)
        found[node] = att
    if not found:
        return []
    for lin in gm.graph.nodes:
        if not is_call(lin, F.linear) or last_size(lin) is None:
            continue
        for flow in channel_flows(lin, last_size(lin), ropes=ropes):
            att = found.get(flow.user)
            if att is None or flow.arg not in (0, 1, 2):
                continue
            part = "qkv"[flow.arg]
            setattr(att, part, flow)
            setattr(att, f"{part}_linear", lin)
    return list(found.values())


def _fed_by_linear(node: Node, depth: int = 8) -> bool:
    """Whether node is computed (within a few elementwise steps) from a linear's output."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if is_call(a, F.linear):
                    return True
                if a.op in ("call_function", "call_method") and not is_call(
                        a, *NORMS, F.embedding, F.scaled_dot_product_attention):
                    nxt.append(a)
        frontier = nxt
    return False


def _normed_linear(writer: Writer) -> Node | None:
    """The linear a norm writer normalizes (a sandwich norm, as Gemma's after attention
    and MLP: stream + norm(o_proj(...))), else None."""
    if writer.kind != "norm":
        return None
    src = last_dim_producer(writer.node.args[0])
    return src if is_call(src, F.linear) else None


def _tied(gm: GraphModule) -> list[tuple[Node, Node]]:
    def ident(node):
        t = get_constant(gm, node)
        return None if t is None else (t.untyped_storage().data_ptr(), t.shape, t.stride())

    embeds = [(n, ident(n.args[1])) for n in gm.graph.nodes if is_call(n, F.embedding)]
    pairs = []
    for lin in gm.graph.nodes:
        if is_call(lin, F.linear):
            key = ident(lin.args[1])
            pairs += [(e, lin) for e, k in embeds if k is not None and k == key]
    return pairs


# --------------------------------------------------------------------------- the pass


def analyze(gm: GraphModule) -> Structure:
    norm_nodes = [n for n in gm.graph.nodes if is_call(n, *NORMS)]
    streams = find_streams(gm, norm_nodes)
    attention = find_attention(gm)
    o_linears = {lin for att in attention for lin in att.o_linears}
    mlp_down = []
    for s in streams:
        for w in s.writers:
            lin = w.node if w.kind == "linear" else _normed_linear(w)
            if lin is None:
                continue
            role = ""
            if lin in o_linears:
                role = "attn_out"
            elif _fed_by_linear(last_dim_producer(lin.args[0])):
                role = "mlp_down"
                if lin not in mlp_down:
                    mlp_down.append(lin)
            if w.kind == "linear":
                w.role = role
    norms = []
    for n in norm_nodes:
        kind = "layer_norm" if n.target is F.layer_norm else "rms_norm"
        site = NormSite(n, kind, norm_hidden(n), last_dim_consumers(n))
        if any(w.node is n for s in streams for w in s.writers):
            site.position = "post"
        elif any(r.node is n and r.kind == "norm" for s in streams for r in s.readers):
            site.position = "pre"
        norms.append(site)
    if any(s.post_norm for s in streams):
        style = "post-norm"
    else:
        style = "pre-norm" if streams else "none"
    return Structure(norms, streams, attention, mlp_down, style, _tied(gm))


def current(gm: GraphModule, ctx: PassContext) -> Structure:
    """The structure of gm as it is now (transform passes call this on entry)."""
    s = analyze(gm)
    ctx.analysis["structure"] = s
    return s


@graph_pass("analyze-structure",
            requires=("canonicalize-linear", "canonicalize-attention", "canonicalize-norm"))
def analyze_structure(gm: GraphModule, ctx: PassContext) -> PassResult:
    s = current(gm, ctx)
    ctx.note(f"structure of {ctx.name}: {s.summary()}")
    counters = {
        "norms": len(s.norms),
        "streams": len(s.streams),
        "writers": sum(len(st.writers) for st in s.streams),
        "attention": len(s.attention),
        "rope": sum(1 for a in s.attention if a.q is not None and a.q.rope),
        "grouped_kv": sum(1 for a in s.attention if a.grouped),
        "mlp_down": len(s.mlp_down),
        "post_norm": int(s.style == "post-norm"),
        "tied": len(s.tied),
    }
    return PassResult(gm, modified=False, counters={k: v for k, v in counters.items() if v})
