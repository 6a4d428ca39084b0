"""The graph structure the equivalence transforms need, and how they edit weights.

What: the analysis result (`Structure`: norms and their consumers, residual streams with
their writers and readers, attention with its q/k/v/o flows, MLP down projections, tied
embeddings), filled in by passes/analyze_structure.py; `Skips`, one note per distinct
reason a transform skipped something; `WeightEditor` and the linear weight helpers.
Why: every transform pass reads the same analysis and edits weights the same way. Every
weight change goes into a new tensor; a constant read by one consumer is replaced, a
shared one (tied embeddings, one weight read twice) gets a fresh constant for the consumer
being changed, so no other reader sees the change.
Pre: weights are get_attr constants (freeze-params). Post: the user's tensors are never
mutated. Helper of the transform passes, not a pass itself.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import (
    add_constant,
    get_constant,
    is_call,
    is_method,
    replace_constant,
    tensor_val,
)
from qcompile.passes._channel_flow import Flow
from qcompile.passes._shapes import is_empty, is_linear_input, is_scalar, last_size

NORMS = (F.layer_norm, F.rms_norm)

# --------------------------------------------------------------------------- results


@dataclass
class NormSite:
    node: Node
    kind: str  # "layer_norm" | "rms_norm"
    hidden: int | None  # d when the norm normalizes the last dim only
    consumers: list[tuple[Node, Node]]  # (consumer, node it reads) keeping the last dim
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
        nd = tensor_val(node).dim()
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
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") or str(node.target)


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
