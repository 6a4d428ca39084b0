"""Where the output channels of a linear (or of an attention) go, and rotary embeddings.

What: `channel_flows` follows a region of an origin's last-dim channels through slices,
splits, head views ([..., H*D] -> [..., H, D] and back), transposes, GQA repeats, KV-cache
concatenations with an empty cache and RoPE, to each consumer that is not a value-moving
op; `match_rope` / `rope_map` recognize x * cos + cat(-x2, x1) * sin.
Why: analyze-structure finds the q/k/v projections of an attention and the o projection
after it from these flows (fused QKV included), and rotate-heads decides from the region
and head size whether a per-head rotation folds into both ends.
Pre: shapes in `meta["val"]`. Post: reads the graph only; helper of the transform passes,
not a pass itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import is_call, is_method, tensor_val
from qcompile.passes._shapes import (
    index_on_last,
    is_empty,
    is_scalar,
    keeps_last_dim,
    last_size,
    size_at,
    slice_bounds,
    value_users,
)

# --------------------------------------------------------------------------- RoPE


def _is_last(dim: int, node: Node) -> bool:
    nd = tensor_val(node).dim()
    return dim % nd == nd - 1


def _half(node, x: Node, d: int):
    if not is_call(node, operator.getitem) or node.args[0] is not x:
        return None
    bounds = index_on_last(node.args[1], tensor_val(x).dim(), d)
    if bounds in (None, "untouched"):
        return None
    return slice_bounds(bounds, d)


def match_rope(node) -> tuple[Node, set[Node]] | None:
    """node = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) on the last
    dim (the halves of x). Returns (x, the pattern's inner nodes) or None."""
    if not is_call(node, operator.add, torch.add) or len(node.args) != 2 or node.kwargs:
        return None
    for p, r in (node.args, node.args[::-1]):
        if not (is_call(p, operator.mul, torch.mul) and is_call(r, operator.mul, torch.mul)):
            continue
        for rot in r.args:
            if not is_call(rot, torch.cat) or not isinstance(rot.args[0], (list, tuple)):
                continue
            dim = rot.kwargs.get("dim", rot.args[1] if len(rot.args) > 1 else 0)
            parts = rot.args[0]
            if len(parts) != 2 or not is_call(parts[0], operator.neg, torch.neg):
                continue
            neg, x1 = parts
            x2 = neg.args[0]
            x = x2.args[0] if is_call(x2, operator.getitem) else None
            d = last_size(x)
            if x is None or d is None or d % 2 or not _is_last(dim, x):
                continue
            if _half(x1, x, d) != (0, d // 2) or _half(x2, x, d) != (d // 2, d):
                continue
            if x in p.args:
                return x, {p, r, rot, neg, x1, x2}
    return None


def rope_map(gm: GraphModule) -> dict[Node, tuple[Node, set[Node]]]:
    """x -> (the RoPE output node, inner nodes) for every rotary embedding in gm."""
    found = {}
    for node in gm.graph.nodes:
        m = match_rope(node)
        if m is not None:
            found[m[0]] = (node, m[1])
    return found


# --------------------------------------------------------------------------- channel flow


@dataclass
class Flow:
    """Where a region of an origin's last-dim channels ends up.

    `offset`/`width` are channels of the origin's last dim; once the region was viewed as
    heads ([..., H, D]) `head_dim` is D and the tensor's last dim is one head's D channels
    (any head of the region: transforms that use this apply the same map to every head).
    """

    user: Node  # the first consumer that is not a value-moving op
    source: Node  # the node it reads
    offset: int
    width: int
    head_dim: int | None = None
    rope: bool = False
    scaled: bool = False

    @property
    def arg(self) -> int | None:
        """The positional argument of user that reads source (None if not positional)."""
        for i, a in enumerate(self.user.args):
            if a is self.source:
                return i
        return None

    def overlaps(self, offset: int, width: int) -> bool:
        return self.offset < offset + width and offset < self.offset + self.width


def _split_items(split: Node, width: int):
    """(getitem node, start, size) for each used piece of split/chunk along the last dim."""
    arg = split.args[1] if len(split.args) > 1 else split.kwargs.get(
        "split_size_or_sections", split.kwargs.get("split_size", split.kwargs.get("chunks")))
    if is_method(split, "chunk") or is_call(split, torch.chunk):
        if not isinstance(arg, int) or arg <= 0:
            return None
        size = -(-width // arg)
        sizes = [min(size, width - i) for i in range(0, width, size)]
    elif isinstance(arg, int) and arg > 0:
        sizes = [min(arg, width - i) for i in range(0, width, arg)]
    elif isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg):
        sizes = list(arg)
    else:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    items = []
    for user in split.users:
        if not is_call(user, operator.getitem) or not isinstance(user.args[1], int):
            return None
        i = user.args[1]
        items.append((user, starts[i], sizes[i]))
    return items


def _splits_last_dim(user: Node, src: Node) -> bool:
    """user is split/chunk of src along its last dim."""
    if not (is_method(user, "split", "chunk") or is_call(user, torch.split, torch.chunk)):
        return False
    dim = user.kwargs.get("dim", user.args[2] if len(user.args) > 2 else 0)
    return user.args[0] is src and isinstance(dim, int) and _is_last(dim, src)


def _scalar_scale(node: Node, src: Node) -> bool:
    if is_call(node, operator.mul, torch.mul) and len(node.args) == 2:
        a, b = node.args
        return (a is src and is_scalar(b)) or (b is src and is_scalar(a))
    return is_call(node, operator.truediv, torch.div) and node.args[0] is src and is_scalar(
        node.args[1]) and not node.kwargs


def _head_split(user: Node, src: Node, width: int) -> int | None:
    """D when user views [..., width] as [..., width / D, D]."""
    if not (is_method(user, "view", "reshape", "unflatten")
            or is_call(user, torch.reshape, torch.unflatten)) or user.args[0] is not src:
        return None
    d, h = last_size(user), size_at(user, -2)
    if d is None or h is None or d * h != width:
        return None
    if h == 1 and tensor_val(user).dim() != tensor_val(src).dim() + 1:
        return None  # [..., w] -> [..., 1, w] is a split into one head; others are not
    return d


def _head_merge(user: Node, src: Node, head_dim: int) -> int | None:
    """The merged width when user views [..., H, D] as [..., H * D]."""
    if not (is_method(user, "view", "reshape", "flatten")
            or is_call(user, torch.reshape, torch.flatten)) or user.args[0] is not src:
        return None
    h, w = size_at(src, -2), last_size(user)
    return w if h is not None and w == h * head_dim else None


def _cat_keeps(user: Node, src: Node) -> bool:
    """cat along a dim other than the last, with every other operand empty."""
    if not is_call(user, torch.cat, torch.concat, torch.concatenate):
        return False
    parts = user.args[0] if user.args else user.kwargs.get("tensors")
    dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
    val = tensor_val(user)
    if val is None or not isinstance(dim, int) or dim % val.dim() == val.dim() - 1:
        return False
    return isinstance(parts, (list, tuple)) and all(p is src or is_empty(p) for p in parts)


def channel_flows(origin: Node, width: int, head_dim: int | None = None,
                  ropes: dict | None = None) -> list[Flow]:
    """Follow the last-dim channels of `origin` (a linear's output, or an attention output
    already in heads layout when head_dim is given) to every consumer that is not a
    value-moving op. Slices and splits narrow the region; a head view [..., H*D] ->
    [..., H, D] sets head_dim; in heads layout, transposes, GQA repeats, concatenation
    with an empty cache and RoPE keep it; a merge [..., H, D] -> [..., H*D] of the whole
    region goes back to flat channels."""
    ropes = ropes or {}
    flows: list[Flow] = []
    stack = [(origin, 0, width, head_dim, False, False)]
    seen = set()
    while stack:
        node, off, w, hd, rope, scaled = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        inner: set[Node] = set()
        if hd is not None and node in ropes:
            out, inner = ropes[node]
            stack.append((out, off, w, hd, True, scaled))

        def push(nxt, o=off, ww=w, h=hd, sc=scaled, r=rope):
            stack.append((nxt, o, ww, h, r, sc))

        for user in value_users(node):
            if user in inner:
                continue
            if hd is None and _head_split(user, node, w) is not None:
                push(user, h=_head_split(user, node, w))
            elif keeps_last_dim(user) is node:
                push(user)
            elif _scalar_scale(user, node):
                push(user, sc=True)
            elif hd is None and is_call(user, operator.getitem) and user.args[0] is node:
                bounds = index_on_last(user.args[1], tensor_val(node).dim(), last_size(node))
                if bounds in (None, "untouched"):
                    flows.append(Flow(user, node, off, w, hd, rope, scaled))
                    continue
                a, b = slice_bounds(bounds, w)
                push(user, o=off + a, ww=b - a)
            elif hd is None and _splits_last_dim(user, node):
                items = _split_items(user, w)
                if items is None:
                    flows.append(Flow(user, node, off, w, hd, rope, scaled))
                    continue
                for item, start, size in items:
                    push(item, o=off + start, ww=size)
            elif hd is not None and _cat_keeps(user, node):
                push(user)
            elif hd is not None and _head_merge(user, node, hd) == w:
                push(user, h=None)
            else:
                if hd is None and w == last_size(node) and is_call(
                        user, F.scaled_dot_product_attention):
                    hd = w  # a single head: [..., 1, D] views keep the last dim
                flows.append(Flow(user, node, off, w, hd, rope, scaled))
    return flows
