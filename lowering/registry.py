"""The quantized op registry: each qcompile op is declared once, with all it needs.

An op is declared by a function whose signature is the op's schema and whose docstring is
its contract. `quantized_op` makes the `torch.library` custom op `qcompile::<name>` from it,
adding two keyword arguments every op takes: `impl` (the implementation, bound by the
`lower` pass) and `origin` (the graph node the call serves, for generated kernels' headers
and error messages). Next to the declaration stand the fake implementation and every real
one:

    @quantized_op
    def requant_int8(x: Tensor, in_zp: int, q: int, shift: int, ...) -> Tensor:
        '''int8 -> int8 at another scale, integer-only.'''

    @requant_int8.fake
    def _(x, in_zp, q, shift, ...): ...

    @requant_int8.impl("reference")            # the definition: every other impl equals it
    def _(x, in_zp, q, shift, ...): ...

    @requant_int8.impl("triton", runs_on=triton_runs_on)
    def _(x, in_zp, q, shift, ...): ...

Implementations have a name ("reference", "cpu", "triton", or a route such as
"cpu-onednn"), the family it belongs to (the name before the first "-"), a check of
whether it runs on a device type on this machine, an optional `prepare` hook that rewrites
constant arguments once at lowering (weight layouts, int4 unpacking; it returns the
replaced arguments by name), and a priority among its family. Every op declares a
"reference"; integer ops must give its integers bit for bit (`exact=True`, the default);
float-output ops with a float softmax declare a tolerance instead.

Binding: passes never name an implementation. `lower` (passes/lower.py) binds each op
node with `bind(node, impl)`, choosing by `choose(op, family, device)`; a stage rule
says no op is unbound after it. An op called without `impl` (a graph run part-way
through the pipeline, calibration through an online Hadamard) runs what `choose` gives
for its device and `family="auto"`: the same choice `lower` makes absent per-layer facts.

Arguments by name: `arg(node, name)` / `set_arg(node, name, value)` read and write a call's
arguments through the op's schema, so passes never patch arguments by position.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

NAMESPACE = "qcompile"
UNBOUND = ""
FAMILIES = ("reference", "cpu", "triton")


@dataclass(frozen=True)
class Impl:
    """One implementation of an op."""

    name: str
    fn: Callable
    runs_on: Callable[[str], bool]  # device type ("cpu", "cuda") -> runs there, here
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    priority: int = 0  # larger first, within a family
    takes_origin: bool = False

    @property
    def family(self) -> str:
        return self.name.split("-", 1)[0]


def anywhere(device: str) -> bool:
    """Plain torch code runs on every device."""
    return True


def on_cpu(device: str) -> bool:
    return device == "cpu"


@dataclass(frozen=True)
class Inline:
    """A call written out for Inductor: `fn(*call_args, **constants, **options)` returns
    what the op returns. `constants` are new tensors the call needs (divisors reach
    Inductor as tensors: it turns division by a constant into a multiplication by its
    reciprocal, which rounds differently, on GPUs, and on CPUs in earlier releases,
    pytorch#157959); `options` plain values (a route's name). rereads_input: fn reads its
    input in two loops (a row's range, then the division), so the op that produces the
    input is better stored than computed twice (lowering/inline.py). opaque_input: fn hands
    its input as it is to an opaque call (a GEMM route), which reads it stored."""

    fn: Callable
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    rereads_input: bool = False
    opaque_input: bool = False


@dataclass
class QuantizedOp:
    """A declared op: its torch.library op, fake and implementations."""

    name: str
    declaration: Callable
    doc: str
    exact: bool = True
    tolerance: dict[str, float] = field(default_factory=dict)
    impls: dict[str, Impl] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    overload: Any = None  # torch.ops.qcompile.<name>.default: the graph target
    # GEMM ops: the generated Triton GEMM epilogue a call runs, from its arguments by name
    epilogue: Callable[[dict[str, Any]], Any] | None = None
    # ops whose generated kernel is not the GEMM's (convolutions): its source, from the
    # arguments by name and the origin (for debug dumps)
    kernel_source: Callable[[dict[str, Any], str], str] | None = None
    # family -> how a call bound to one of its implementations is written out in plain
    # torch for Inductor (lowering/inline.py)
    inliners: dict[str, Callable[[dict[str, Any], str], Inline | None]] = field(
        default_factory=dict)

    # ------------------------------------------------------------------ declaring

    def fake(self, fn: Callable) -> Callable:
        """Register the fake (meta) implementation: shapes and dtypes only."""

        def fake_fn(*args, impl: str = UNBOUND, origin: str = ""):
            return fn(*args)

        self._library_op.register_fake(fake_fn)
        return fn

    def impl(self, name: str, *, runs_on: Callable[[str], bool] = anywhere,
             prepare: Callable | None = None,
             priority: int = 0) -> Callable[[Callable], Callable]:
        """Register an implementation (see the module docstring)."""
        if name in self.impls:
            raise ValueError(f"op {self.name!r} already has an implementation {name!r}")
        if name.split("-", 1)[0] not in FAMILIES:
            raise ValueError(f"implementation {name!r} of {self.name!r}: the name must start "
                             f"with one of the families {list(FAMILIES)}")

        def wrap(fn: Callable) -> Callable:
            takes_origin = "origin" in inspect.signature(fn).parameters
            self.impls[name] = Impl(name, fn, runs_on, prepare, priority, takes_origin)
            return fn

        return wrap

    def inliner(self, family: str) -> Callable[[Callable], Callable]:
        """Register `fn(args_by_name, impl_name) -> Inline | None`: the same values as the
        implementation a call is bound to, in plain torch ops (and opaque GEMM calls) that
        Inductor can fuse with the graph around the call; None where that is not exact for
        this call's constants (lowering/inline.py)."""
        if family not in FAMILIES:
            raise ValueError(f"inliner of {self.name!r}: family must be one of {FAMILIES}")

        def wrap(fn: Callable) -> Callable:
            self.inliners[family] = fn
            return fn

        return wrap

    # ------------------------------------------------------------------ calling

    def __call__(self, *args, impl: str = UNBOUND, origin: str = ""):
        return self.overload(*args, impl=impl, origin=origin)

    def run(self, impl_name: str, args: tuple, origin: str = ""):
        impl = self.impls.get(impl_name)
        if impl is None:
            raise ValueError(f"op qcompile::{self.name} has no implementation "
                             f"{impl_name!r}; it has {sorted(self.impls)}")
        if impl.takes_origin:
            return impl.fn(*args, origin=origin)
        return impl.fn(*args)

    def _dispatch(self, *args, impl: str = UNBOUND, origin: str = ""):
        if impl == UNBOUND or (impl in FAMILIES and impl not in self.impls):
            # unbound: the device's default; a family this op has no implementation of:
            # what `lower` binds for it (see `choose`)
            impl = choose(self, impl or "auto", _device_of(args)).name
        return self.run(impl, args, origin)


REGISTRY: dict[str, QuantizedOp] = {}  # op name -> op
_BY_TARGET: dict[Any, QuantizedOp] = {}  # OpOverload -> op


def quantized_op(declaration: Callable | None = None, *, exact: bool = True,
                 tolerance: dict[str, float] | None = None):
    """Declare an op from a function's signature (its schema) and docstring (its contract).

    exact: every implementation gives the reference's outputs bit for bit. Otherwise
    `tolerance` (rtol / atol, as torch.testing.assert_close takes them) bounds how far
    the implementations may be from the reference (float softmax, float rotations).
    """

    def make(decl: Callable) -> QuantizedOp:
        name = decl.__name__
        if name in REGISTRY:
            raise ValueError(f"two ops are named qcompile::{name}")
        schema = torch.library.infer_schema(decl, mutates_args=())
        if "*" in schema.split("->")[0]:
            raise ValueError(f"qcompile::{name}: declare positional arguments only; impl "
                             "and origin are added as keywords")
        schema = schema.replace(") ->", f', *, str impl="{UNBOUND}", str origin="") ->', 1)
        op = QuantizedOp(name, decl, inspect.getdoc(decl) or "", exact, dict(tolerance or {}),
                         params=tuple(inspect.signature(decl).parameters))
        op._library_op = torch.library.custom_op(f"{NAMESPACE}::{name}", op._dispatch,
                                                 mutates_args=(), schema=schema)
        op.overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        REGISTRY[name] = op
        _BY_TARGET[op.overload] = op
        return op

    return make(declaration) if declaration is not None else make


def _device_of(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


# ---------------------------------------------------------------------- lookup


def op_of(node_or_target: Any) -> QuantizedOp | None:
    """The registered op a graph node calls (or a target is), else None."""
    target = node_or_target.target if isinstance(node_or_target, Node) else node_or_target
    return _BY_TARGET.get(target)


def is_op(node: Any, *ops: QuantizedOp) -> bool:
    """Whether node calls one of `ops` (any registered op when none is given)."""
    op = op_of(node) if isinstance(node, Node) and node.op == "call_function" else None
    return op is not None and (not ops or op in ops)


def candidates(op: QuantizedOp, family: str, device: str) -> list[Impl]:
    """Implementations of `family` that run on `device` on this machine, best first."""
    found = [i for i in op.impls.values() if i.family == family and i.runs_on(device)]
    return sorted(found, key=lambda i: -i.priority)


# the order families are tried in, per requested family and device
_PREFERENCE = {
    ("auto", "cuda"): ("triton", "reference"),
    ("auto", "cpu"): ("cpu", "reference"),
    ("triton", "cuda"): ("triton", "reference"),
    ("triton", "cpu"): ("triton", "cpu", "reference"),  # the interpreter, where it exists
    ("cpu", "cpu"): ("cpu", "reference"),
    ("cpu", "cuda"): ("reference",),
    ("reference", "cpu"): ("reference",),
    ("reference", "cuda"): ("reference",),
}


def choose(op: QuantizedOp, family: str, device: str) -> Impl:
    """The implementation a request for `family` ("auto", "cpu", "triton", "reference",
    or one implementation's exact name) gets on `device`. Ops without an implementation
    of the family fall back through the family order above, ending at the reference (the
    op's exact definition, so integers never change, only speed)."""
    if family in op.impls:
        impl = op.impls[family]
        if not impl.runs_on(device):
            raise ValueError(f"qcompile::{op.name}: implementation {family!r} cannot run on "
                             f"{device} on this machine")
        return impl
    order = _PREFERENCE.get((family, device))
    if order is None:
        raise ValueError(f"unknown kernel family {family!r} or device {device!r}; families: "
                         f"auto, {', '.join(FAMILIES)}")
    for fam in order:
        found = candidates(op, fam, device)
        if found:
            return found[0]
    raise ValueError(f"qcompile::{op.name} has no implementation for {device}")


# ---------------------------------------------------------------------- arguments by name


def _index(op: QuantizedOp, name: str) -> int:
    try:
        return op.params.index(name)
    except ValueError:
        raise KeyError(f"qcompile::{op.name} has no argument {name!r}; it takes "
                       f"{list(op.params)}") from None


def arg(node: Node, name: str) -> Any:
    """The argument `name` of a registered op's call node."""
    op = op_of(node)
    if op is None:
        raise TypeError(f"{node.format_node()} does not call a qcompile op")
    if name in ("impl", "origin"):
        return node.kwargs.get(name, UNBOUND)
    i = _index(op, name)
    if i < len(node.args):
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    default = inspect.signature(op.declaration).parameters[name].default
    if default is inspect.Parameter.empty:
        raise KeyError(f"{node.format_node()} does not give qcompile::{op.name}'s argument "
                       f"{name!r}")
    return default  # a trailing argument with a default, left out


def set_arg(node: Node, name: str, value: Any) -> None:
    """Replace the argument `name` of a registered op's call node."""
    op = op_of(node)
    if op is None:
        raise TypeError(f"{node.format_node()} does not call a qcompile op")
    if name in ("impl", "origin"):
        node.update_kwarg(name, value)
        return
    i = _index(op, name)
    if i < len(node.args):
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


def args_of(gm, node: Node) -> dict[str, Any]:
    """A call's arguments by name, get_attr constants resolved to their tensors."""
    from qcompile.fx_utils import get_constant

    op = op_of(node)
    out = {}
    for name in op.params:
        value = arg(node, name)
        const = get_constant(gm, value)
        out[name] = const if const is not None else value
    return out


def bind(node: Node, impl: Impl, origin: str = "") -> None:
    """Bind a call node to an implementation (what the lower pass does to every op)."""
    node.update_kwarg("impl", impl.name)
    node.update_kwarg("origin", origin)


def bound_impl(node: Node) -> str:
    return node.kwargs.get("impl", UNBOUND)


def all_ops() -> list[QuantizedOp]:
    """Every declared op (importing the modules that declare them)."""
    import qcompile.lowering.a4_ops  # noqa: F401
    import qcompile.lowering.a16_ops  # noqa: F401
    import qcompile.lowering.conv_ops  # noqa: F401
    import qcompile.lowering.int_ops  # noqa: F401
    import qcompile.lowering.ops  # noqa: F401

    return list(REGISTRY.values())
