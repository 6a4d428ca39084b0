"""canonicalize-linear: every spelling of "activation times constant weight" becomes
`F.linear(x, W, b)` with W a 2-D get_attr constant of shape [N, K] and b a constant or None.

Spellings (a table, not copies): F.linear / torch._C._nn.linear with keywords,
`x @ w.t()`, `x @ w.T`, `torch.matmul(x, W_kn)`, `torch.mm`, and
`torch.addmm(b, x, W_kn)` (GPT-2's Conv1D) with alpha = beta = 1. The weight side may be
the constant itself or any chain of 2-D transposes of it (`.t()`, `.T`, `.mT`,
`transpose(0, 1)`, `permute(1, 0)`, `torch.t`).

Why: one form for the analysis, transform and rewrite passes to look for.
Exactness: when the weight reaches the matmul transposed (W [K, N]), the new constant is
the transposed *view* of the same storage, so `linear` calls the same BLAS routine with
the same operand layout and the float output is bit-identical to eager.
Pre: freeze-params (weights are constants). Post: no matmul/mm/addmm against a constant
weight remains (rule in verify.py). Activation-activation matmuls are left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import add_constant, erase_unused, get_constant, is_call, is_method
from qcompile.pass_manager import PassContext, PassResult, graph_pass


def _flips(node: Node) -> bool | None:
    """True if `node` transposes a 2-D tensor (its first arg), None if it is no transpose."""
    if is_method(node, "t") or is_call(node, torch.t):
        return True
    if is_call(node, getattr) and node.args[1] in ("T", "mT"):
        return True
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        dims = {d % 2 for d in node.args[1:3]} if len(node.args) >= 3 else set()
        return True if dims == {0, 1} else None
    if is_method(node, "permute") or is_call(node, torch.permute):
        dims = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
        return True if [d % 2 for d in dims] == [1, 0] else None
    return None


def constant_weight_of(gm: GraphModule, node) -> tuple[Node, torch.Tensor, bool] | None:
    """(base get_attr node, 2-D value as seen at `node`, transposed?) or None.

    Follows transposes back to a constant; anything else means "not a constant weight".
    """
    flips = False
    while isinstance(node, Node) and node.op != "get_attr":
        if _flips(node) is None:
            return None
        flips = not flips
        node = node.args[0]
    value = get_constant(gm, node)
    if value is None or value.dim() != 2:
        return None
    return node, (value.t() if flips else value), flips


# target -> (x index, rhs index, bias index or None, rhs is already [N, K])
_SPELLINGS = {
    F.linear: (0, 1, 2, True),
    torch.matmul: (0, 1, None, False),
    operator.matmul: (0, 1, None, False),
    torch.mm: (0, 1, None, False),
    torch.addmm: (1, 2, 0, False),
}
_KW = {F.linear: ("input", "weight", "bias"), torch.addmm: ("mat1", "mat2", "input")}


def _arg(node: Node, index: int | None, name: str | None):
    if index is None:
        return None
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name) if name else None


def _bias_ok(gm: GraphModule, bias, n_out: int) -> bool:
    if bias is None:
        return True
    value = get_constant(gm, bias)
    return value is not None and value.dim() == 1 and value.shape[0] == n_out


def match_linear(gm: GraphModule, node: Node):
    """(x, bias, base get_attr, weight [N, K], weight is base?) when `node` is a spelling of
    linear against a constant weight that is not yet canonical, else None."""
    if node.op != "call_function" or node.target not in _SPELLINGS:
        return None
    xi, ri, bi, rhs_is_nk = _SPELLINGS[node.target]
    names = _KW.get(node.target, (None, None, None))
    x, rhs, bias = _arg(node, xi, names[0]), _arg(node, ri, names[1]), _arg(node, bi, names[2])
    if node.target is torch.addmm and (node.kwargs.get("alpha", 1) != 1
                                       or node.kwargs.get("beta", 1) != 1):
        return None
    found = constant_weight_of(gm, rhs)
    if found is None:
        return None
    base, value, flipped = found
    weight_nk = value if rhs_is_nk else value.t()  # [N, K]
    if not _bias_ok(gm, bias, weight_nk.shape[0]):
        return None
    x_val = x.meta.get("val") if isinstance(x, Node) else None
    if x_val is None or x_val.dim() < (2 if node.target in (torch.mm, torch.addmm) else 1):
        return None
    if node.target is F.linear and rhs is base and len(node.args) == 3 and not node.kwargs:
        return None  # already canonical
    weight_is_base = rhs_is_nk != flipped
    return x, bias, base, weight_nk, weight_is_base


@graph_pass("canonicalize-linear", requires=("freeze-params",))
def canonicalize_linear(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        found = match_linear(gm, node)
        if found is None:
            continue
        x, bias, base, weight_nk, weight_is_base = found
        if weight_is_base:
            w_node = base
        else:
            name = base.meta.get("qc_param_name", base.target) + ".T"
            w_node = add_constant(gm, name, weight_nk, before=node)
            w_node.meta["qc_param_name"] = base.meta.get("qc_param_name", base.target)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(F.linear, (x, w_node, bias))
        new.meta["qc_spelling"] = getattr(node.target, "__name__", str(node.target))
        # the same value: a linear reading this one matches in this same walk
        new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        key = new.meta["qc_spelling"]
        counters[key] = counters.get(key, 0) + 1
    if counters:
        erase_unused(gm)
    return PassResult(gm, modified=bool(counters), counters=counters)
