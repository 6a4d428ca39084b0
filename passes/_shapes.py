"""Shapes and the last dim, as the equivalence transforms see a canonical graph.

What: concrete sizes from `meta["val"]`; how a getitem index treats the last dim; which
ops keep the last dim in place (`keeps_last_dim`), and the consumers and producer of a
value through them.
Why: a rotation, a channel scale or a mean shift acts on each vector of the last dim, so
it commutes with any op that keeps those vectors intact, and the transforms fold it
across such ops. This is narrower than a layout op (qcompile.sites: a transpose of the
last dim only moves values, but across rows) and wider in two ways: float casts and
copies, and selections or repeats along the leading dims, keep every row intact although
the integer passes do not count them as layout ops.
Pre: shapes and dtypes in `meta["val"]` (every pass keeps them). Post: reads the graph
only. A helper of the transform passes (analyze-structure, fold-norm-affine,
layernorm-to-rmsnorm, rotate-residual, rotate-heads, online-hadamard, smooth), not a pass.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from qcompile.fx_utils import is_call, is_method, tensor_val
from qcompile.sites import layout_kind


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
    val = tensor_val(node)
    if val is None or val.dim() == 0:
        return None
    return concrete(val.shape[-1])


def size_at(node, dim: int) -> int | None:
    val = tensor_val(node)
    if val is None or not -val.dim() <= dim < val.dim():
        return None
    return concrete(val.shape[dim])


def is_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_empty(node) -> bool:
    """A tensor known to hold no elements (the empty KV cache of a first call)."""
    val = tensor_val(node)
    return val is not None and concrete(val.numel()) == 0


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


def slice_bounds(bounds, size: int) -> tuple[int, int]:
    """(start, stop) of index_on_last's slice, resolved against a last dim of `size`."""
    start, stop = bounds
    start, stop, _ = slice(start, stop).indices(size)
    return start, max(start, stop)


def _dims(node: Node, start: int = 1) -> list:
    dims = list(node.args[start:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    return dims


# Not layout ops, yet no value leaves its row: casts change only the dtype and copies
# nothing. On a floating result a per-vector map commutes with them (up to the cast's
# rounding, which float transforms accept); an integer result ends the walk.
_FLOAT_CASTS = ("to", "float", "double", "half", "bfloat16", "type_as", "clone", "detach")


def keeps_last_dim(node) -> Node | None:
    """The data input of `node` when node only moves values along the leading dims (the
    last dim's elements stay in place and in order), else None: a layout op
    (sites.layout_kind) that leaves the last dim where it is, a float cast or copy, or a
    selection (select, narrow, index_select, getitem) or repeat along the leading dims.
    Split items are not: their data input is the split, and channel_flows follows them."""
    if not isinstance(node, Node) or node.op not in ("call_method", "call_function"):
        return None
    src = node.args[0] if node.args else None
    out, inp = tensor_val(node), tensor_val(src)
    if out is None or inp is None or out.dim() == 0 or inp.dim() == 0:
        return None
    d = last_size(src)
    if d is None or d != last_size(node):
        return None
    nd, kind = inp.dim(), layout_kind(node)
    if kind in ("reshape", "copy"):
        return src  # row-major reshapes with an equal last dim keep each row intact
    if kind == "transpose":
        dims = {a % nd for a in node.args[1:3] if isinstance(a, int)}
        return src if len(dims) == 2 and nd - 1 not in dims else None
    if kind == "permute":
        perm = _dims(node)
        return src if perm and isinstance(perm[-1], int) and perm[-1] % nd == nd - 1 else None
    if is_method(node, *_FLOAT_CASTS) or is_call(node, torch.clone):
        return src if out.is_floating_point() else None
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


def last_dim_consumers(node: Node) -> list[tuple[Node, Node]]:
    """(consumer, the node it reads) for every use of node's values, looking through ops
    that keep the last dim (keeps_last_dim); the graph output counts as a consumer."""
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


def last_dim_producer(node: Node) -> Node:
    """Walk up ops that keep the last dim (keeps_last_dim) to the node that computed the
    values. Unlike sites.producer_through_layout it stops at a transpose or permute of the
    last dim and at a split item, and walks through float casts and leading-dim selections:
    what it returns computed each row of `node` as it is."""
    while True:
        src = keeps_last_dim(node)
        if src is None:
            return node
        node = src


def is_linear_input(user: Node, reads: Node) -> bool:
    return is_call(user, F.linear) and user.args[0] is reads and user.args[1] is not reads
