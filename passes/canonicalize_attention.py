"""canonicalize-attention: attention becomes one form,
`F.scaled_dot_product_attention(q, k, v, attn_mask=, dropout_p=0.0, is_causal=, scale=,
enable_gqa=)` with every keyword spelled out.

Spellings: sdpa with positional or missing keywords, and the explicit
`softmax(q @ k^T [* s | / s] [+ mask], dim=-1) [.to(dtype)] @ v` (k^T as
`transpose(-2, -1)`, `transpose(2, 3)` on 4-D, or `.mT`; matmul as `@` or torch.matmul;
softmax as F.softmax, torch.softmax or the method; eval dropout already removed).

Why: the quantized-attention rewrite looks for one op.
Exactness: sdpa spellings stay bit-identical. The explicit form computes the same
function but sdpa's kernel rounds differently (about 1e-7 relative in fp32); the
explicit chain is only rewritten when no intermediate (scores, probabilities) is used
elsewhere, e.g. returned as attention weights.
Pre: freeze-params. Post: every sdpa node has 3 positional args and 5 keywords.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import is_call, is_method, only_user, scalar_value, tensor_val
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.sites import attention_site

SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                 "enable_gqa": False}
_SDPA_ORDER = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _normalize_sdpa(node: Node) -> bool:
    args = dict(zip(_SDPA_ORDER, node.args))
    args.update(node.kwargs)
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    kwargs = {key: args.get(key, default) for key, default in SDPA_DEFAULTS.items()}
    if node.args == (q, k, v) and dict(node.kwargs) == kwargs:
        return False
    node.args, node.kwargs = (q, k, v), kwargs
    return True


def _is_matmul(node) -> bool:
    return is_call(node, torch.matmul, operator.matmul)


def _key_transposed(node) -> Node | None:
    """k when node is k^T over the last two dims, else None."""
    val = tensor_val(node)
    if val is None:
        return None
    nd = val.dim()
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        dims = {d % nd for d in node.args[1:3]}
        return node.args[0] if dims == {nd - 2, nd - 1} else None
    if is_call(node, getattr) and node.args[1] == "mT":
        return node.args[0]
    return None


def _is_softmax_last(node) -> bool:
    if not (is_call(node, F.softmax, torch.softmax) or is_method(node, "softmax")):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    val = tensor_val(node)
    if dim is None or val is None or dim % val.dim() != val.dim() - 1:
        return False
    dtype = node.kwargs.get("dtype")
    return dtype is None or dtype == val.dtype == tensor_val(node.args[0]).dtype


def _match_explicit(pv: Node):
    """pv = softmax(...) @ v  ->  (q, k, v, mask, scale, nodes to erase) or None."""
    if not _is_matmul(pv):
        return None
    probs, v = pv.args[0], pv.args[1]
    chain = [pv]
    if is_method(probs, "to") and only_user(probs) is pv:  # probs.to(query dtype)
        chain.append(probs)
        probs = probs.args[0]
    if not _is_softmax_last(probs) or only_user(probs) is not chain[-1]:
        return None
    chain.append(probs)
    node, mask, scale, constants = probs.args[0], None, 1.0, []
    if is_call(node, operator.add, torch.add) and only_user(node) is probs:
        chain.append(node)
        node, mask = node.args
        if _is_matmul(mask) or is_call(mask, operator.mul, operator.truediv):
            node, mask = mask, node  # mask + scores
    if is_call(node, operator.mul, operator.truediv) and only_user(node) is chain[-1]:
        a, b = node.args
        s = scalar_value(b)
        if s is None and node.target is operator.mul:  # scale * scores
            s, a = scalar_value(a), b
        if s is None or s == 0:
            return None
        chain.append(node)
        # a scale Dynamo kept as a constant node (dynamic shapes) dies with the chain
        constants = [arg for arg in node.args if isinstance(arg, Node) and scalar_value(arg)]
        scale = s if node.target is operator.mul else 1.0 / s
        node = a
    if not _is_matmul(node) or only_user(node) is not chain[-1]:
        return None
    chain.append(node)
    q, kt = node.args
    k = _key_transposed(kt)
    if k is None:
        return None
    if only_user(kt) is node:
        chain.append(kt)
    qv, kv, vv = tensor_val(q), tensor_val(k), tensor_val(v)
    if qv is None or kv is None or vv is None or qv.dim() != 4 or kv.dim() != 4:
        return None
    return q, k, v, mask, scale, chain + constants


@graph_pass("canonicalize-attention", requires=("freeze-params",))
def canonicalize_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"sdpa_normalized": 0, "explicit": 0}
    for node in list(gm.graph.nodes):
        if is_call(node, F.scaled_dot_product_attention):
            counters["sdpa_normalized"] += _normalize_sdpa(node)
            attention_site(node)  # pin the stable site name before any transform
            continue
        found = _match_explicit(node)
        if found is None:
            continue
        q, k, v, mask, scale, chain = found
        kwargs = dict(SDPA_DEFAULTS, attn_mask=mask, scale=scale)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs)
        attention_site(new)
        node.replace_all_uses_with(new)
        for dead in chain:  # pv first, then towards q @ k^T
            if not dead.users:
                gm.graph.erase_node(dead)
        counters["explicit"] += 1
    modified = any(counters.values())
    return PassResult(gm, modified=modified, counters={k: v for k, v in counters.items() if v})
