"""Quantization sites: stable names for the activations a recipe quantizes, and the one
vocabulary of layout ops that every pass looks through.

A site is named after parameter paths, never after graph node names, so the same site
in a graph recompiled for a new shape (or in another graph of the same model) finds the
same calibration statistics:  "in:<layer>" (a linear's input), "out:<layer>" (its
output), "attn:<layer>:q|k|v" (attention inputs, named after the v projection), and
"add:<layer>" (a residual add written by that layer).

Layout ops only move values: every output element is an input element, same dtype, same
value (views, reshapes, broadcasts, transposes, permutes, `contiguous`, the items of a
split or chunk). So int8 data and its scale pass through them unchanged, an observer sees
the same values on either side, and a site is named after the op that computed the values,
not after a view of them. `layout_kind` says how each one moves values; the equivalence
transforms ask the narrower question of which keep the last dim in place
(passes/_shapes.py `keeps_last_dim`), from the same table.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from qcompile.fx_utils import is_call, is_method

# kind -> (method names, torch functions). "reshape": row-major reshapes and broadcasts,
# so an unchanged last size keeps every row intact; "transpose": swaps the two dims in
# args[1:3]; "permute": reorders every dim; "copy": same shape and order.
LAYOUT_OPS: dict[str, tuple[tuple[str, ...], tuple]] = {
    "reshape": (("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
                 "expand_as"),
                (torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze)),
    "transpose": (("transpose", "swapaxes"), (torch.transpose, torch.swapaxes)),
    "permute": (("permute",), (torch.permute,)),
    "copy": (("contiguous",), ()),
}
SPLITS = ("split", "chunk")  # their getitem items are layout ops ("split-item")


def linear_name(node: Node) -> str:
    """The layer name of a canonical linear: its weight's parameter path minus .weight."""
    w = node.args[1]
    return str(w.meta.get("qc_param_name", w.target)).removesuffix(".weight")


def is_linear(node) -> bool:
    return is_call(node, F.linear)


def is_conv(node) -> bool:
    """A canonical convolution (what canonicalize-conv leaves): torch.conv2d(x, W, b,
    stride, padding, dilation, groups), all seven positional, stride / padding / dilation
    pairs of Python ints, W a get_attr constant, b one or None."""
    if not is_call(node, torch.conv2d) or len(node.args) != 7 or node.kwargs:
        return False
    _, w, b, stride, padding, dilation, groups = node.args
    pairs = all(type(p) is tuple and len(p) == 2 and all(type(v) is int for v in p)
                for p in (stride, padding, dilation))
    return (pairs and type(groups) is int and isinstance(w, Node) and w.op == "get_attr"
            and (b is None or (isinstance(b, Node) and b.op == "get_attr")))


def is_layer(node) -> bool:
    """A layer with a constant weight that qcompile quantizes: a canonical linear or conv."""
    return is_linear(node) or is_conv(node)


def layer_name(node: Node) -> str:
    """The layer name of a canonical linear or conv: its weight's parameter path minus
    .weight (stable across recompiles)."""
    return linear_name(node)


def layer_kind(node: Node) -> str:
    return "conv" if is_conv(node) else "linear"


def layout_kind(node) -> str | None:
    """How a layout op moves values: a kind of LAYOUT_OPS or "split-item"; None for any
    other node. The data input is args[0] (the split itself for a split item)."""
    for kind, (methods, functions) in LAYOUT_OPS.items():
        if is_method(node, *methods) or is_call(node, *functions):
            return kind
    if is_call(node, operator.getitem) and _is_split_item(node):
        return "split-item"
    return None


def is_layout(node) -> bool:
    """Ops that only move values (int8 data may flow through them unchanged)."""
    return layout_kind(node) is not None


def _is_split_item(node) -> bool:
    return _is_split(node.args[0])


def _is_split(node) -> bool:
    return isinstance(node, Node) and (is_method(node, *SPLITS)
                                       or getattr(node.target, "__name__", "") in SPLITS)


def producer_through_layout(node) -> Node:
    """Walk up layout ops (single data input) to the node that computed the values."""
    while isinstance(node, Node) and is_layout(node):
        src = node.args[0]
        if not isinstance(src, Node):
            break
        node = src
    return node


def attention_site(sdpa: Node) -> str:
    """Named after the linear producing v, pinned on the node the first time it is asked
    (canonicalize-attention does), so transforms that change the v path later do not
    change the name. Where v is not a linear's output through layout ops (GQA's
    repeat_interleave, a computed v), the nearest linear above v, k or q names it: the
    node's own name is the same in every graph Dynamo compiles for one layer class, and two
    layers' attentions would share calibration statistics and a report entry."""
    if "qc_site" not in sdpa.meta:
        v = producer_through_layout(sdpa.args[2])
        if _is_split(v):  # a part of a fused projection (qkv, or kv)
            v = producer_through_layout(v.args[0])
        if not is_linear(v):
            v = next((found for arg in (sdpa.args[2], sdpa.args[1], sdpa.args[0])
                      if (found := _linear_above(arg)) is not None), v)
        sdpa.meta["qc_site"] = f"attn:{linear_name(v)}" if is_linear(v) else f"attn:{sdpa.name}"
    return sdpa.meta["qc_site"]


def _linear_above(node, depth: int = 8) -> Node | None:
    """The nearest linear among the ops `node` is computed from (breadth first, a few
    levels up), or None."""
    level = [node] if isinstance(node, Node) else []
    seen: set[Node] = set()
    for _ in range(depth):
        nxt = []
        for n in level:
            if n in seen:
                continue
            seen.add(n)
            if is_linear(n):
                return n
            nxt += n.all_input_nodes
        level = nxt
    return None
