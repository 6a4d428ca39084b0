"""canonicalize-norm: LayerNorm and RMSNorm become `F.layer_norm(x, shape, w, b, eps)` and
`F.rms_norm(x, shape, w, eps)`, all arguments positional, w and b constants or None.

Spellings: the functional / module calls (Dynamo shows nn.LayerNorm as F.layer_norm
and nn.RMSNorm as torch.rms_norm), torch.layer_norm, and the decomposed forms
  RMSNorm:   x * rsqrt(mean(x^2, -1, keepdim) + eps) [* w]   (x^2 as pow(2), x*x, x**2;
             rsqrt as torch.rsqrt / .rsqrt() / 1 / sqrt; weight on either side;
             the fp32 round trip `.to(float32)` ... `.to(dtype)` of LLaMA-style code;
             w a constant or an element-wise expression of one, such as Gemma's
             `1.0 + w.float()`, which becomes a constant holding its value)
  LayerNorm: (x - mean) * rsqrt(var + eps) [* w] [+ b]   (var as mean((x - mean)^2) or
             x.var(-1, unbiased=False, keepdim=True); rsqrt spelled as above or / sqrt)
Why: norm folding and LayerNorm -> RMSNorm conversion need to find every norm.
Exactness: F.rms_norm is bit-identical to the fp32 decomposed form; a decomposed
LayerNorm differs from F.layer_norm by float rounding only (about 1e-7 relative).
Pre: freeze-params. Post: norms are in the canonical form (rule in verify.py).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import (
    add_constant,
    erase_unused,
    get_constant,
    is_call,
    is_method,
    scalar_value,
    tensor_val,
)
from qcompile.pass_manager import PassContext, PassResult, graph_pass

_LN_ORDER = ("input", "normalized_shape", "weight", "bias", "eps")
_RMS_ORDER = ("input", "normalized_shape", "weight", "eps")


def _normalize(node: Node, order: tuple[str, ...], defaults: dict) -> bool:
    args = dict(zip(order, node.args))
    args.update(node.kwargs)
    new_args = tuple(args.get(k, defaults.get(k)) for k in order)
    if node.args == new_args and not node.kwargs:
        return False
    node.args, node.kwargs = new_args, {}
    return True


def _strip_to(node):
    """x.to(float32) / x.float() -> x (the fp32 upcast of LLaMA-style norms)."""
    if is_method(node, "to", "float", "type_as") and isinstance(node.args[0], Node):
        return node.args[0]
    return node


def _is_square_of(node, x) -> bool:
    if is_method(node, "pow") or is_call(node, torch.pow, operator.pow):
        return node.args[0] is x and scalar_value(node.args[1]) == 2.0
    return is_call(node, operator.mul, torch.mul) and node.args[0] is x and node.args[1] is x


def _is_mean_last(node, of=None) -> bool:
    if not (is_method(node, "mean") or is_call(node, torch.mean)):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    val = tensor_val(node)
    ok = isinstance(dim, int) and keep and val is not None and dim % val.dim() == val.dim() - 1
    return ok and (of is None or node.args[0] is of)


def _inv_sqrt_of(node):
    """Returns (denominator node d, multiply?) where the norm divides by sqrt(d)."""
    if is_call(node, torch.rsqrt) or is_method(node, "rsqrt"):
        return node.args[0]
    if is_call(node, operator.truediv) and scalar_value(node.args[0]) == 1.0:
        s = node.args[1]
        if is_call(s, torch.sqrt) or is_method(s, "sqrt"):
            return s.args[0]
    return None


def _var_plus_eps(node):
    """(var node, eps) for var + eps, else None."""
    if not is_call(node, operator.add, torch.add):
        return None
    a, b = node.args
    if scalar_value(b) is not None:
        return a, scalar_value(b)
    if scalar_value(a) is not None:
        return b, scalar_value(a)
    return None


# element-wise ops a norm's weight may be computed with from one constant (and numbers)
_CONSTANT_OPS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                 torch.add, torch.sub, torch.mul)
_CONSTANT_METHODS = ("to", "float", "double", "add", "sub", "mul")


def _constant_expr(gm, node) -> tuple[Node, torch.Tensor] | None:
    """(the constant, the value) when node is a constant, or an element-wise expression
    of exactly one constant and numbers (Gemma's RMSNorm weight `1.0 + w.float()`),
    computed here as the graph would compute it; else None."""
    if get_constant(gm, node) is not None:
        return node, get_constant(gm, node)
    if not (is_call(node, *_CONSTANT_OPS) or is_method(node, *_CONSTANT_METHODS)):
        return None
    leaf, args = None, []
    for arg in node.args:
        if isinstance(arg, Node):
            found = _constant_expr(gm, arg)
            if found is None or leaf is not None:
                return None
            leaf, value = found
            args.append(value)
        elif isinstance(arg, (int, float, bool, torch.dtype)):
            args.append(arg)
        else:
            return None
    if leaf is None or any(isinstance(v, Node) for v in node.kwargs.values()):
        return None
    fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
    with torch.no_grad():
        value = fn(*args[1:], **node.kwargs) if node.op == "call_method" else fn(*args,
                                                                                   **node.kwargs)
    return (leaf, value) if isinstance(value, torch.Tensor) else None


def _affine_operand(gm, user: Node, node: Node) -> Node | None:
    """What user multiplies (or shifts) node by, when it is a 1-D constant or an
    expression of one (see _constant_expr), else None."""
    other = user.args[1] if user.args[0] is node else user.args[0]
    found = _constant_expr(gm, other)
    return other if found is not None and found[1].dim() == 1 else None


def _as_constant(gm, node: Node | None, before: Node) -> Node | None:
    """node itself when it is a constant; for an expression of one, a new constant holding
    its value (named after the parameter it is computed from), inserted before `before`."""
    if node is None or get_constant(gm, node) is not None:
        return node
    leaf, value = _constant_expr(gm, node)
    name = leaf.meta.get("qc_param_name", leaf.target)
    new = add_constant(gm, name, value, before=before)
    new.meta["qc_param_name"] = name
    return new


def _affine_tail(gm, node: Node):
    """Follow `* w` and `+ b` with 1-D constants or expressions of one. Returns (last
    node, w, b)."""
    w = b = None
    user = next(iter(node.users)) if len(node.users) == 1 else None
    if user is not None and is_method(user, "to") and _single(user):
        node, user = user, next(iter(user.users))  # .to(input dtype) before the weight
    if is_call(user, operator.mul, torch.mul):
        w = _affine_operand(gm, user, node)
        if w is not None:
            node = user
            user = next(iter(node.users)) if len(node.users) == 1 else None
    if is_call(user, operator.add, torch.add) and w is not None:
        b = _affine_operand(gm, user, node)
        if b is not None:
            node = user
    return node, w, b


def _single(node) -> bool:
    return len(node.users) == 1


def _match_norm(gm: GraphModule, mul: Node):
    """mul = centered * inv_sqrt(var + eps) (or centered / sqrt(...)).

    Returns (kind, x, eps, tail node, w, b) or None."""
    if is_call(mul, operator.truediv):
        centered, s = mul.args
        denom = s.args[0] if (is_call(s, torch.sqrt) or is_method(s, "sqrt")) else None
    elif is_call(mul, operator.mul, torch.mul):
        centered, r = mul.args
        denom = _inv_sqrt_of(r)
        if denom is None:
            r, centered = mul.args
            denom = _inv_sqrt_of(r)
    else:
        return None
    found = _var_plus_eps(denom) if denom is not None else None
    if found is None:
        return None
    var, eps = found
    x = _strip_to(centered)
    if is_call(centered, operator.sub, torch.sub):  # LayerNorm: x - mean(x)
        x, mean = centered.args
        if not _is_mean_last(mean, of=x):
            return None
        ok_var = (_is_mean_last(var) and _is_square_of(var.args[0], centered)) or (
            (is_method(var, "var") or is_call(var, torch.var))
            and var.args[0] is x and var.kwargs.get("unbiased", var.kwargs.get("correction"))
            in (False, 0) and var.kwargs.get("keepdim", False)
        )
        kind = "layer_norm" if ok_var else None
    else:  # RMSNorm: mean(x^2)
        ok = _is_mean_last(var) and _is_square_of(var.args[0], centered)
        kind = "rms_norm" if ok else None
    if kind is None:
        return None
    val = tensor_val(x)
    if val is None or val.dtype not in (torch.float32, torch.float64):
        return None  # low-precision decomposed norms keep their own casts
    tail, w, b = _affine_tail(gm, mul)
    if kind == "rms_norm" and b is not None:
        return None
    return kind, _strip_to(x), eps, tail, w, b


@graph_pass("canonicalize-norm", requires=("freeze-params",))
def canonicalize_norm(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters: dict[str, int] = {}

    def bump(key):
        counters[key] = counters.get(key, 0) + 1

    for node in list(gm.graph.nodes):
        if node.op != "call_function" and node.op != "call_method":
            continue
        if is_call(node, F.layer_norm, torch.layer_norm):
            changed = node.target is not F.layer_norm
            node.target = F.layer_norm  # torch.layer_norm's trailing cudnn flag is dropped
            node.args = node.args[:5]
            if _normalize(node, _LN_ORDER, {"weight": None, "bias": None, "eps": 1e-5}) or changed:
                bump("layer_norm_normalized")
            continue
        if is_call(node, F.rms_norm, torch.rms_norm):
            changed = node.target is not F.rms_norm
            node.target = F.rms_norm
            if _normalize(node, _RMS_ORDER, {"weight": None, "eps": None}) or changed:
                bump("rms_norm_normalized")
            continue
        found = _match_norm(gm, node)
        if found is None:
            continue
        kind, x, eps, tail, w, b = found
        size, at = tensor_val(x).shape[-1], tail
        if isinstance(size, torch.SymInt):
            # a symbolic last dim (dynamic shapes) as a graph value: a SymInt literal in
            # the arguments would print as an expression over names the graph frees
            with gm.graph.inserting_after(tail):
                at = gm.graph.call_function(torch.ops.aten.sym_size.int, (x, -1))
            at.meta["val"], size = size, at
        shape = (size,)
        with gm.graph.inserting_after(at):
            if kind == "layer_norm":
                new = gm.graph.call_function(F.layer_norm, (x, shape, None, None, eps))
            else:
                new = gm.graph.call_function(F.rms_norm, (x, shape, None, eps))
        w, b = _as_constant(gm, w, before=new), _as_constant(gm, b, before=new)
        new.args = (x, shape, w, b, eps) if kind == "layer_norm" else (x, shape, w, eps)
        tail.replace_all_uses_with(new)
        bump(f"decomposed_{kind}")
    if any(k.startswith("decomposed") for k in counters):
        erase_unused(gm)
    return PassResult(gm, modified=bool(counters), counters=counters)
