"""rotate-heads: a Hadamard rotation per attention head on v and on the o projection.

What: with R = H_D / sqrt(D) (D the head size), every head of v becomes v_h R, folded
into the v projection's output rows (per head block: W_h <- R^T W_h, b_h <- R^T b_h).
Attention mixes tokens, not channels, so each head of the attention output is a_h R;
the o projection absorbs it in its input columns (W[:, h] <- W[:, h] R). Grouped KV
heads need nothing special: every head uses the same R, so a KV head shared by several
query heads (sdpa enable_gqa, or an explicit repeat) is rotated once.
Where a rotated value also leaves the attention (v returned as the KV cache, an
attention output returned as a tensor in heads layout), an online un-rotation
had(x) = x R^T is inserted for that use only, so the graph's outputs do not change.
Why: v and the attention output feed the quantized attention and o_proj; rotating each
head spreads its outlier channels (QuaRot), at no run-time cost.
How it is proven valid for the graph at hand (analysis channel flows, fused QKV
included): every use of the v projection's rows for this attention ends at sdpa's v or
at an un-rotatable exit in heads layout; every use of the attention output ends at a
linear's input whose columns are whole heads, or at such an exit. Otherwise the
attention is skipped with the reason recorded; so are head sizes with no Hadamard matrix.
Pre: analyze-structure. Post: same function, exactly in real arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.hadamard import is_hadamard_size
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._channel_flow import Flow, channel_flows, rope_map
from qcompile.passes._shapes import is_linear_input, last_size
from qcompile.passes._structure import (
    Attention,
    Skips,
    WeightEditor,
    layer_name,
    linear_params,
    set_linear,
)
from qcompile.passes.analyze_structure import current
from qcompile.passes.online_hadamard import insert_hadamard, normalized_hadamard


def _v_plan(att: Attention, ropes) -> tuple[list[Node], list[Flow]] | str:
    """(the attentions reading this v region, exits to un-rotate) or a skip reason."""
    v, lin, d = att.v, att.v_linear, att.head_dim
    sdpas, exits = [], []
    for f in channel_flows(lin, last_size(lin), ropes=ropes):
        if not f.overlaps(v.offset, v.width):
            continue
        inside = v.offset <= f.offset and f.offset + f.width <= v.offset + v.width
        if f.head_dim is None and f.width == d == last_size(f.source):
            f.head_dim = d  # one head: flat and heads layout are the same
        if f.head_dim != d or not inside or (f.offset - v.offset) % d:
            return f"v rows reach {f.user.name} not as whole heads of size {d}"
        if f.user.target is F.scaled_dot_product_attention:
            if f.arg != 2 or f.rope:
                return f"v rows reach {f.user.name} as q/k or through RoPE"
            sdpas.append(f.user)
        else:
            exits.append(f)
    return sdpas, exits


def _o_plan(sdpa: Node, d: int, ropes) -> tuple[list[Node], list[Flow]] | str:
    """(linears reading the attention output, exits to un-rotate) or a skip reason."""
    heads = sdpa.meta["val"].shape[-3]
    linears, exits = [], []
    for f in channel_flows(sdpa, int(heads) * d, head_dim=d, ropes=ropes):
        if is_linear_input(f.user, f.source) and f.offset % d == 0 and f.width == last_size(
                f.source) and f.width % d == 0:
            linears.append(f.user)  # its input is whole heads (one head when width == d)
        elif f.head_dim == d and not f.rope:
            exits.append(f)
        else:
            return f"attention output reaches {f.user.name} not as whole heads"
    return linears, exits


def _rotate_rows(w: torch.Tensor, offset: int, width: int, r: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    block = w[offset:offset + width].reshape(width // r.shape[0], r.shape[0], -1)  # [H, D, K]
    w[offset:offset + width] = torch.einsum("ed,hdk->hek", r.T, block).reshape(width, -1)
    return w


def _rotate_cols(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    d = r.shape[0]
    blocks = w.reshape(w.shape[0], -1, d)  # [N, H, D]
    return (blocks @ r).reshape(w.shape)


@graph_pass("rotate-heads", requires=("analyze-structure",))
def rotate_heads(gm: GraphModule, ctx: PassContext) -> PassResult:
    s = current(gm, ctx)
    ed = WeightEditor(gm)
    ropes = rope_map(gm)
    counters = {"heads_rotated": 0, "v_proj": 0, "o_proj": 0, "exits": 0, "skipped": 0}
    done: set[tuple[Node, int]] = set()
    skips = Skips(ctx, "rotate-heads")

    def skip(att: Attention, reason: str) -> None:
        counters["skipped"] += 1
        skips.add(att.sdpa.name, reason)

    for att in s.attention:
        d = att.head_dim
        if att.v is None or att.v.head_dim != d:
            skip(att, "v is not the output of a linear projection in heads layout")
            continue
        if (att.v_linear, att.v.offset) in done:
            continue
        if d is None or not is_hadamard_size(d):
            skip(att, f"head size {d} has no Hadamard matrix")
            continue
        plan = _v_plan(att, ropes)
        if isinstance(plan, str):
            skip(att, plan)
            continue
        sdpas, exits = plan
        o_plans = [_o_plan(sdpa, d, ropes) for sdpa in sdpas]
        reason = next((p for p in o_plans if isinstance(p, str)), None)
        if reason is not None:
            skip(att, reason)
            continue
        o_linears = [lin for p in o_plans for lin in p[0]]
        exits += [f for p in o_plans for f in p[1]]
        r = normalized_hadamard(d)
        v_lin = att.v_linear
        w, b = linear_params(ed, v_lin)
        set_linear(ed, v_lin, weight=_rotate_rows(w, att.v.offset, att.v.width, r),
                   bias=None if b is None else _rotate_rows(b[:, None], att.v.offset,
                                                            att.v.width, r)[:, 0])
        ctx.layer(layer_name(v_lin), "linear").transforms.append("rotate-heads(v)")
        for lin in dict.fromkeys(o_linears):
            w, _ = linear_params(ed, lin)
            set_linear(ed, lin, weight=_rotate_cols(w, r))
            ctx.layer(layer_name(lin), "linear").transforms.append("rotate-heads(o)")
            counters["o_proj"] += 1
        made: dict[Node, Node] = {}
        for f in exits:  # had(x R) = x R R^T = x
            if f.source not in made:
                made[f.source] = insert_hadamard(gm, f.source, before=f.source.next,
                                                 tag="unrotate")
            f.user.replace_input_with(f.source, made[f.source])
            counters["exits"] += 1
        for sdpa in sdpas:
            sdpa.meta.setdefault("qc_transforms", []).append("rotate-heads(v,o)")
        done.add((v_lin, att.v.offset))
        counters["v_proj"] += 1
        counters["heads_rotated"] += len(sdpas)
    skips.flush()
    if ed.untied:
        ctx.note(f"rotate-heads: gave {sorted(set(ed.untied))} a separate copy per reader")
    modified = counters["v_proj"] > 0
    return PassResult(gm, modified=modified, counters={k: v for k, v in counters.items() if v})
