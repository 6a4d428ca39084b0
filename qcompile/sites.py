"""Quantization sites: stable names for the activations a recipe quantizes.

A site is named after parameter paths, never after graph node names, so the same site
in a graph recompiled for a new shape (or in another graph of the same model) finds the
same calibration statistics:  "in:<layer>" (a linear's input), "out:<layer>" (its
output), "attn:<layer>:q|k|v" (attention inputs, named after the v projection), and
"add:<layer>" (a residual add written by that layer).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch.fx import Node

from qcompile.fx_utils import is_call, is_method

LAYOUT_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "unflatten",
                  "flatten", "unsqueeze", "squeeze", "expand")


def linear_name(node: Node) -> str:
    """The layer name of a canonical linear: its weight's parameter path minus .weight."""
    w = node.args[1]
    return str(w.meta.get("qc_param_name", w.target)).removesuffix(".weight")


def is_linear(node) -> bool:
    return is_call(node, F.linear)


def is_layout(node) -> bool:
    """Ops that only move values (int8 data may flow through them unchanged)."""
    import operator

    import torch

    if is_method(node, *LAYOUT_METHODS):
        return True
    if is_call(node, torch.reshape, torch.transpose, torch.permute, torch.flatten,
               torch.unsqueeze, torch.squeeze):
        return True
    return is_call(node, operator.getitem) and _is_split_item(node)


def _is_split_item(node) -> bool:
    src = node.args[0]
    return isinstance(src, Node) and (is_method(src, "split", "chunk")
                                      or getattr(src.target, "__name__", "") in ("split", "chunk"))


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
    change the name."""
    if "qc_site" not in sdpa.meta:
        v = producer_through_layout(sdpa.args[2])
        sdpa.meta["qc_site"] = f"attn:{linear_name(v)}" if is_linear(v) else f"attn:{sdpa.name}"
    return sdpa.meta["qc_site"]
