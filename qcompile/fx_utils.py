"""Small helpers every pass uses: constants, metadata propagation, node predicates.

Metadata: every node carries `meta["val"]` (a FakeTensor, SymInt, or a tuple of them),
taken from Dynamo's `example_value` at capture and re-derived after each modifying pass
by running the graph on fake tensors in the compilation's fake mode. Symbolic shapes
stay symbolic (sympy expressions under the hood), so dynamic batch / sequence length
survive every pass.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_map


def get_constant(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for any other node."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def add_constant(gm: GraphModule, base: str, value: torch.Tensor, *, before: Node) -> Node:
    """Register `value` as a buffer of gm under a fresh name and return a get_attr node."""
    name = _fresh_attr(gm, base)
    gm.register_buffer(name, value.detach(), persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["qc_constant"] = True
    return node


def replace_constant(gm: GraphModule, node: Node, value: torch.Tensor) -> None:
    """Swap the tensor behind a get_attr node (a weight transform writes its result here)."""
    owner: Any = gm
    *path, last = node.target.split(".")
    for part in path:
        owner = getattr(owner, part)
    if last in owner._buffers:
        owner._buffers[last] = value.detach()
    else:
        setattr(owner, last, value.detach())
    node.meta.pop("val", None)


def _fresh_attr(gm: GraphModule, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base).strip("_") or "c"
    if base[0].isdigit():
        base = "c_" + base
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def tensor_val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def scalar_value(x: Any) -> float | None:
    """The number an argument stands for: a Python int or float, or a node whose value is
    a compile-time constant (with dynamic shapes Dynamo keeps arithmetic on Python floats
    in the graph, e.g. `1.0 / scale` as a node whose meta["val"] is the float); None for
    anything else (tensors, symbolic values, booleans)."""
    if isinstance(x, Node):
        x = x.meta.get("val")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def shape_of(node: Node) -> tuple | None:
    val = tensor_val(node)
    return tuple(val.shape) if val is not None else None


class _FakeProp(Interpreter):
    """Runs the graph on fake tensors; get_attr constants are converted once each."""

    def __init__(self, gm: GraphModule, fake_mode):
        super().__init__(gm, garbage_collect_values=True)
        self.fake_mode = fake_mode
        self._consts: dict[str, torch.Tensor] = {}

    def placeholder(self, target, args, kwargs):
        return self._node.meta["val"]

    def get_attr(self, target, args, kwargs):
        if target not in self._consts:
            real = super().get_attr(target, args, kwargs)
            if isinstance(real, torch.Tensor):
                with unset_fake_temporarily():
                    real = self.fake_mode.from_tensor(real, static_shapes=True)
            self._consts[target] = real
        return self._consts[target]

    def run_node(self, n: Node):
        self._node = n
        result = super().run_node(n)
        if n.op != "output":
            n.meta["val"] = result
        return result


def propagate_meta(gm: GraphModule, ctx) -> None:
    """Re-derive `meta["val"]` on every node by a fake-tensor run in ctx.fake_mode.

    Under the Python dispatcher, as Dynamo traced the graph: without it a meta function
    that calls a CompositeExplicitAutograd op with symbolic sizes (baddbmm's expand, on
    BLOOM's ALiBi scores under dynamic shapes) fails, "SymIntArrayRef expected to contain
    only concrete integers"."""
    from torch._dispatch.python import enable_python_dispatcher

    mode = ctx.fake_mode
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = ctx.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, enable_python_dispatcher():
        _FakeProp(gm, mode).run(*[None] * _num_placeholders(gm))


def _num_placeholders(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


def seed_meta_from_dynamo(gm: GraphModule) -> None:
    """Dynamo's graph carries `example_value` and, on placeholders, `grapharg` (whose source
    names the parameter); qcompile's passes read `val` and `qc_source`. Dynamo drops its
    keys after the backend returns, so this runs on the graph it hands over, once."""
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is not None:
            node.meta.setdefault("qc_source", source.name)


def users_of(node: Node) -> list[Node]:
    return list(node.users)


def only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def getitem_users(node: Node) -> dict[int, Node]:
    return {u.args[1]: u for u in node.users if is_call(u, operator.getitem)}


def fake_to_shape(x: Any) -> Any:
    return tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, x)


def erase_unused(gm: GraphModule) -> int:
    """Dead code elimination that also drops get_attr constants nobody reads any more."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op in ("call_function", "call_method") and _has_side_effect(node):
                continue
            gm.graph.erase_node(node)
            removed += 1
            changed = True
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in list(gm._buffers) if b not in used]:
        del gm._buffers[name]
    return removed


def _has_side_effect(node: Node) -> bool:
    """In-place methods, setitem and mutating ops must survive dead-code elimination."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    target = node.target
    if target is operator.setitem or getattr(target, "__name__", "").endswith("_"):
        return True
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of gm's graph (node metas shallow-copied), sharing
    gm's attributes, so passes can rewrite it while gm stays as Dynamo gave it."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def graph_fake_mode(gm: GraphModule):
    """The fake mode Dynamo traced gm with (from its placeholders' example values)."""
    for node in gm.graph.nodes:
        val = node.meta.get("example_value", node.meta.get("val"))
        mode = getattr(val, "fake_mode", None)
        if mode is not None:
            return mode
    return None
