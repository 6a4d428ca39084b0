"""The graph structure the equivalence transforms need, and how they edit weights.

Three parts:
- Predicates over canonical graphs: which ops only move values along the leading dims
  (`keeps_last_dim`: element [..., j] of the output is element [..., j] of the input, so
  any per-vector map of the last dim -- a rotation, a channel scale, a mean shift --
  commutes with them), and a channel-flow walker that follows the output channels of a
  linear (or of an attention) through slices, splits, head views, transposes, RoPE and
  KV-cache concatenations to where they are consumed.
- The analysis result (`Structure` and its parts), filled in by passes/analyze_structure.py.
- `WeightEditor`: every weight change goes into a new tensor; a constant read by one
  consumer is replaced, a shared one (tied embeddings, one weight read twice) gets a
  fresh constant for the consumer being changed, so no other reader sees the change.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import add_constant, get_constant, is_call, is_method, replace_constant

NORMS = (F.layer_norm, F.rms_norm)

# --------------------------------------------------------------------------- shapes


def tval(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def concrete(size) -> int | None:
    """An int for a concrete size, None for a symbolic one."""
    if isinstance(size, int):
        return size
    try:
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        return int(size) if is_concrete_int(size) else None
    except Exception:  # noqa: BLE001 - anything odd is "not concrete"
        return None


def last_size(node) -> int | None:
    val = tval(node)
    if val is None or val.dim() == 0:
        return None
    return concrete(val.shape[-1])


def size_at(node, dim: int) -> int | None:
    val = tval(node)
    if val is None or not -val.dim() <= dim < val.dim():
        return None
    return concrete(val.shape[dim])


def is_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_empty(node) -> bool:
    """A tensor known to hold no elements (the empty KV cache of a first call)."""
    val = tval(node)
    return val is not None and concrete(val.numel()) == 0


# --------------------------------------------------------------------------- layout ops

_CASTS = ("to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone",
          "detach")
_RESHAPES = ("view", "reshape", "flatten", "unflatten", "expand", "expand_as", "squeeze",
             "unsqueeze")
_RESHAPE_FNS = (torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze)


def _name(node: Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "")


def _dims(node: Node, start: int = 1) -> list:
    dims = list(node.args[start:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    return dims


def index_on_last(index, ndim: int, size: int | None = None):
    """How a getitem index treats the last of `ndim` dims (of `size`): "untouched", a
    slice (start, stop) of it, or None (selects, gathers, steps or adds a trailing dim)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    consuming = [e for e in entries if e is not None and e is not Ellipsis]
    if Ellipsis not in entries and len(consuming) < ndim:
        return "untouched"  # the last dim comes after every entry
    if entries[-1] is None:
        return None  # a new trailing dim
    if entries[-1] is Ellipsis:
        return "untouched"
    last = entries[-1]
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    if not all(v is None or isinstance(v, int) for v in (last.start, last.stop)):
        return None
    if last.start in (None, 0) and (last.stop is None or size is not None and last.stop >= size):
        return "untouched"
    return (last.start, last.stop)


def _slice_bounds(bounds, size: int) -> tuple[int, int]:
    start, stop = bounds
    start, stop, _ = slice(start, stop).indices(size)
    return start, max(start, stop)


def keeps_last_dim(node) -> Node | None:
    """The data input of `node` when node only moves values along the leading dims (the
    last dim's elements stay in place and in order), else None."""
    if not isinstance(node, Node) or node.op not in ("call_method", "call_function"):
        return None
    src = node.args[0] if node.args else None
    out, inp = tval(node), tval(src)
    if out is None or inp is None or out.dim() == 0 or inp.dim() == 0:
        return None
    d = last_size(src)
    if d is None or d != last_size(node):
        return None
    nd, name = inp.dim(), _name(node)
    if node.op == "call_method" and name in _CASTS or is_call(node, torch.clone):
        return src if out.is_floating_point() else None
    if (node.op == "call_method" and name in _RESHAPES) or is_call(node, *_RESHAPE_FNS):
        return src  # row-major reshapes with an equal last dim keep each row intact
    if is_method(node, "transpose", "swapaxes") or is_call(node, torch.transpose):
        dims = {a % nd for a in node.args[1:3] if isinstance(a, int)}
        return src if len(dims) == 2 and nd - 1 not in dims else None
    if is_method(node, "permute") or is_call(node, torch.permute):
        perm = _dims(node)
        return src if perm and isinstance(perm[-1], int) and perm[-1] % nd == nd - 1 else None
    if is_method(node, "select", "narrow", "index_select") or is_call(
            node, torch.select, torch.narrow, torch.index_select):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return src if isinstance(dim, int) and dim % nd != nd - 1 else None
    if is_method(node, "repeat"):
        reps = _dims(node)
        return src if reps and reps[-1] == 1 else None
    if is_call(node, operator.getitem) and len(node.args) == 2:
        return src if index_on_last(node.args[1], nd, d) == "untouched" else None
    return None


_METADATA_METHODS = ("size", "dim", "numel", "stride", "is_contiguous", "get_device",
                     "is_floating_point")


def is_metadata_use(user: Node) -> bool:
    """A use that reads shape, dtype or device only (x.size(-1) for a symbolic reshape)."""
    if is_method(user, *_METADATA_METHODS):
        return True
    if is_call(user, getattr) and len(user.args) > 1:
        return user.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda")
    return is_call(user, torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
                   torch.numel)


def value_users(node: Node) -> list[Node]:
    return [u for u in node.users if not is_metadata_use(u)]


def layout_consumers(node: Node) -> list[tuple[Node, Node]]:
    """(consumer, the node it reads) for every use of node's values, looking through
    layout ops (keeps_last_dim); the graph output counts as a consumer."""
    out, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        for user in value_users(n):
            if keeps_last_dim(user) is n:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
            else:
                out.append((user, n))
    return out


def producer(node: Node) -> Node:
    """Walk up layout ops to the node that computed the values."""
    while True:
        src = keeps_last_dim(node)
        if src is None:
            return node
        node = src


def is_linear_input(user: Node, reads: Node) -> bool:
    return is_call(user, F.linear) and user.args[0] is reads and user.args[1] is not reads


# --------------------------------------------------------------------------- RoPE


def _half(node, x: Node, d: int):
    if not is_call(node, operator.getitem) or node.args[0] is not x:
        return None
    bounds = index_on_last(node.args[1], tval(x).dim(), d)
    if bounds in (None, "untouched"):
        return None
    return _slice_bounds(bounds, d)


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
            if x is None or d is None or d % 2 or dim % tval(x).dim() != tval(x).dim() - 1:
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
    if _name(split) == "chunk":
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


def _split_dim(node: Node) -> int | None:
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim if isinstance(dim, int) else None


def _scalar_scale(node: Node, src: Node) -> bool:
    if is_call(node, operator.mul, torch.mul) and len(node.args) == 2:
        a, b = node.args
        return (a is src and is_scalar(b)) or (b is src and is_scalar(a))
    return is_call(node, operator.truediv, torch.div) and node.args[0] is src and is_scalar(
        node.args[1]) and not node.kwargs


def _head_split(user: Node, src: Node, width: int) -> int | None:
    """D when user views [..., width] as [..., width / D, D]."""
    if not ((user.op == "call_method" and _name(user) in ("view", "reshape", "unflatten"))
            or is_call(user, torch.reshape, torch.unflatten)) or user.args[0] is not src:
        return None
    d, h = last_size(user), size_at(user, -2)
    if d is None or h is None or d * h != width:
        return None
    if h == 1 and tval(user).dim() != tval(src).dim() + 1:
        return None  # [..., w] -> [..., 1, w] is a split into one head; others are not
    return d


def _head_merge(user: Node, src: Node, head_dim: int) -> int | None:
    """The merged width when user views [..., H, D] as [..., H * D]."""
    if not ((user.op == "call_method" and _name(user) in ("view", "reshape", "flatten"))
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
    val = tval(user)
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
                bounds = index_on_last(user.args[1], tval(node).dim(), last_size(node))
                if bounds in (None, "untouched"):
                    flows.append(Flow(user, node, off, w, hd, rope, scaled))
                    continue
                a, b = _slice_bounds(bounds, w)
                push(user, o=off + a, ww=b - a)
            elif hd is None and (is_method(user, "split", "chunk") or is_call(
                    user, torch.split, torch.chunk)) and user.args[0] is node and _split_dim(
                    user) is not None and _split_dim(user) % tval(node).dim() == tval(
                    node).dim() - 1:
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


# --------------------------------------------------------------------------- results


@dataclass
class NormSite:
    node: Node
    kind: str  # "layer_norm" | "rms_norm"
    hidden: int | None  # d when the norm normalizes the last dim only
    consumers: list[tuple[Node, Node]]  # (consumer, node it reads) through layout ops
    position: str = "none"  # "pre" (reads a residual stream), "post" (writes one), "none"

    @property
    def linears(self) -> list[Node]:
        return [u for u, r in self.consumers if is_linear_input(u, r)]

    @property
    def all_linear(self) -> bool:
        return bool(self.consumers) and all(is_linear_input(u, r) for u, r in self.consumers)


@dataclass
class Writer:
    """A node whose output is added into a residual stream."""

    node: Node  # the node whose value enters the stream
    kind: str  # "linear" | "embedding" | "conv" | "constant" | "norm" | "other"
    source: Node | None = None  # the node holding the weights (the conv for "conv")
    role: str = ""  # for linears: "attn_out" | "mlp_down" | ""

    @property
    def foldable(self) -> bool:
        return self.kind in ("linear", "embedding", "conv", "constant")


@dataclass
class Reader:
    """A consumer of a residual-stream value that is not part of the stream."""

    node: Node
    reads: Node
    kind: str  # "norm" | "linear" | "output" | "other"


@dataclass
class ResidualStream:
    hidden: int
    nodes: list[Node]  # stream values: sums, value-moving views, in graph order
    writers: list[Writer]
    readers: list[Reader]

    @property
    def adds(self) -> list[Node]:
        return [n for n in self.nodes if combine_operands(n, self.hidden) is not None
                and len(combine_operands(n, self.hidden)) > 1]

    @property
    def post_norm(self) -> bool:
        return any(w.kind == "norm" for w in self.writers)

    def describe(self) -> str:
        kinds = Counter(w.kind for w in self.writers)
        rk = Counter(r.kind for r in self.readers)
        return (f"stream d={self.hidden}: {len(self.adds)} adds, writers {dict(kinds)}, "
                f"readers {dict(rk)}")


@dataclass
class Attention:
    sdpa: Node
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    q: Flow | None = None  # flow from the q projection (user = sdpa); .rope says RoPE
    k: Flow | None = None
    v: Flow | None = None
    q_linear: Node | None = None
    k_linear: Node | None = None
    v_linear: Node | None = None
    o_flows: list[Flow] = field(default_factory=list)  # sdpa output to its consumers

    @property
    def o_linears(self) -> list[Node]:
        return [f.user for f in self.o_flows if is_linear_input(f.user, f.source)]

    @property
    def grouped(self) -> bool:
        return bool(self.num_heads and self.num_kv_heads and self.num_kv_heads < self.num_heads)


@dataclass
class Structure:
    norms: list[NormSite]
    streams: list[ResidualStream]
    attention: list[Attention]
    mlp_down: list[Node]  # linears writing a stream whose input is not attention output
    style: str  # "pre-norm" | "post-norm" | "none"
    tied: list[tuple[Node, Node]]  # (embedding, linear) sharing one weight tensor

    def norm_site(self, node: Node) -> NormSite | None:
        return next((s for s in self.norms if s.node is node), None)

    def summary(self) -> str:
        writers = Counter(w.kind for s in self.streams for w in s.writers)
        readers = Counter(r.kind for s in self.streams for r in s.readers)
        hidden = sorted({s.hidden for s in self.streams})
        return (f"{self.style}; {len(self.norms)} norms; {len(self.streams)} residual "
                f"stream(s) d={hidden} written by {dict(writers)}, read by {dict(readers)}; "
                f"{len(self.attention)} attention ({sum(a.grouped for a in self.attention)} "
                f"grouped KV, {sum(bool(a.q and a.q.rope) for a in self.attention)} RoPE); "
                f"{len(self.mlp_down)} MLP down-projections; {len(self.tied)} tied embedding(s)")


def combine_operands(node, d: int) -> list[Node] | None:
    """The tensor operands when node combines hidden-state tensors linearly (a residual
    add/sub, a concat along tokens, a scalar scale), else None."""
    if not isinstance(node, Node) or last_size(node) != d:
        return None
    if (is_call(node, operator.add, operator.sub, torch.add, torch.sub)
            or is_method(node, "add", "sub")) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if all(isinstance(x, Node) and last_size(x) == d for x in (a, b)):
            return [a, b]
        return None
    if is_call(node, torch.cat, torch.concat, torch.concatenate):
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        nd = tval(node).dim()
        if not isinstance(dim, int) or dim % nd == nd - 1 or not isinstance(parts, (list, tuple)):
            return None
        parts = [p for p in parts if not is_empty(p)]
        if all(isinstance(p, Node) and last_size(p) == d for p in parts):
            return parts
        return None
    if is_call(node, operator.mul, torch.mul, operator.truediv) and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, Node) and is_scalar(b):
            return [a]
        if isinstance(b, Node) and is_scalar(a) and node.target is not operator.truediv:
            return [b]
    return None


# --------------------------------------------------------------------------- skips


def op_name(node: Node) -> str:
    """A short name for what a node computes ("add", "output", "linear", ...)."""
    if node.op in ("output", "placeholder", "get_attr"):
        return {"get_attr": "constant", "placeholder": "input"}.get(node.op, node.op)
    return _name(node) or str(node.target)


class Skips:
    """Skip reasons of one pass, written as one note per distinct reason."""

    def __init__(self, ctx, pass_name: str, verb: str = "skipped"):
        self.ctx, self.pass_name, self.verb = ctx, pass_name, verb
        self.by_reason: dict[str, list[str]] = {}

    def add(self, what: str, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(what)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def flush(self) -> None:
        for reason, whats in self.by_reason.items():
            shown = ", ".join(whats[:4]) + (f" and {len(whats) - 4} more" if len(whats) > 4
                                            else "")
            self.ctx.note(f"{self.pass_name}: {self.verb} {shown}: {reason}")
        self.by_reason.clear()


# --------------------------------------------------------------------------- weights


def param_name(node) -> str:
    if not isinstance(node, Node):
        return "const"
    return str(node.meta.get("qc_param_name", node.target))


def layer_name(linear: Node) -> str:
    """A linear's layer name as the report uses it (weight path minus .weight)."""
    return param_name(linear.args[1]).removesuffix(".weight")


class WeightEditor:
    """Writes new weight values for one consumer at a time, never mutating a tensor.

    A constant whose attribute only this consumer reads is swapped (replace_constant);
    one read by others too (tied embeddings, a weight used twice) gets a fresh constant
    for this consumer only, and `untied` records it.
    """

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.readers: Counter[str] = Counter()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.readers[node.target] += len(node.users)
        self.untied: list[str] = []

    def get(self, user: Node, index: int) -> torch.Tensor | None:
        arg = user.args[index] if index < len(user.args) else None
        return get_constant(self.gm, arg) if isinstance(arg, Node) else None

    def get64(self, user: Node, index: int) -> torch.Tensor | None:
        value = self.get(user, index)
        return None if value is None else value.detach().to(torch.float64)

    def value64(self, node: Node) -> torch.Tensor:
        return get_constant(self.gm, node).detach().to(torch.float64)

    def set_node(self, node: Node, value: torch.Tensor, users: list[Node]) -> None:
        """The constant behind get_attr `node` becomes value for `users` (a subset of its
        readers); the other readers keep the old tensor."""
        like = get_constant(self.gm, node)
        value = value.detach().to(dtype=like.dtype, device=like.device).contiguous()
        users = list(dict.fromkeys(users))
        if self.readers[node.target] == len(users) == len(node.users):
            replace_constant(self.gm, node, value)
            return
        self.untied.append(param_name(node))
        new = add_constant(self.gm, param_name(node), value, before=min(
            users, key=lambda u: _position(self.gm, u)))
        new.meta["qc_param_name"] = param_name(node)
        for user in users:
            user.replace_input_with(node, new)
        self.readers[node.target] -= len(users)
        self.readers[new.target] = len(users)

    def set(self, user: Node, index: int, value: torch.Tensor, *, like: torch.Tensor,
            name: str) -> None:
        """args[index] of user becomes a constant holding value (cast to like's dtype)."""
        value = value.detach().to(dtype=like.dtype, device=like.device).contiguous()
        old = user.args[index] if index < len(user.args) else None
        if isinstance(old, Node) and old.op == "get_attr" and self.readers[old.target] == 1:
            replace_constant(self.gm, old, value)
            return
        if isinstance(old, Node) and old.op == "get_attr":
            self.readers[old.target] -= 1
            self.untied.append(param_name(old))
            name = param_name(old)
        new = add_constant(self.gm, name, value, before=user)
        new.meta["qc_param_name"] = name
        self.readers[new.target] = 1
        args = list(user.args)
        while len(args) <= index:
            args.append(None)
        args[index] = new
        user.args = tuple(args)


def _position(gm: GraphModule, node: Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    raise KeyError(node)


def linear_params(ed: WeightEditor, linear: Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [N, K], b [N] or None) in float64."""
    bias = linear.args[2] if len(linear.args) > 2 else None
    return ed.get64(linear, 1), (ed.get64(linear, 2) if bias is not None else None)


def set_linear(ed: WeightEditor, linear: Node, weight=None, bias=None) -> None:
    """New weight and/or bias (float64 values, cast to the weight's dtype)."""
    like = ed.get(linear, 1)
    wname = param_name(linear.args[1])
    if weight is not None:
        ed.set(linear, 1, weight, like=like, name=wname)
    if bias is not None:
        ed.set(linear, 2, bias, like=like, name=wname.removesuffix(".weight") + ".bias")
