"""canonicalize-conv: every spelling of a 1-D or 2-D convolution against a constant weight
becomes one call,

    torch.conv2d(x, W, b, (sh, sw), (ph, pw), (dh, dw), groups)

all seven arguments positional, stride / padding / dilation tuples of two Python ints,
W a 4-D get_attr constant [N, C/groups, kh, kw], b a 1-D get_attr constant [N] or None.

Spellings (a table, not copies): torch.conv2d / F.conv2d (the same function) and
torch.conv1d / F.conv1d, positional or keyword, with int, tuple or list stride /
padding / dilation, and string padding: "valid" is 0; "same" becomes explicit numbers
when it pads both sides alike, i.e. dilation * (kernel - 1) is even in every dim.
A conv1d becomes `x.unsqueeze(-2)` -> conv2d -> `.squeeze(-2)`, with kernel
[N, C/g, 1, k], stride (1, s), padding (0, p), dilation (1, d); its 4-D weight is a new
constant (a view of the same storage) that keeps the parameter's qc_param_name.

Why: one form for the analysis, folding and rewrite passes to look for (nn.Conv2d already
reaches the graph in it; nn.Conv1d, F.conv2d with keywords and padding="same" do not).
Left alone, recorded with ctx.note: transposed convolutions and conv3d (no rewrite for
them downstream), a weight that is not a constant (activation-activation convolution, a
weight computed in the graph), a bias that is not a constant, non-integer arguments, and
"same" padding that would pad one side more than the other (PyTorch pads the extra
element on the right; conv2d's padding argument cannot say that).
Pre: freeze-params (weights are constants). Post: no spelling it rewrites is left (rule
registered below); the graph computes the same function (conv1d through conv2d is what
ATen does inside conv1d, so the float output is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qcompile.fx_utils import add_constant, erase_unused, get_constant, tensor_val
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._structure import Skips
from qcompile.sites import is_conv
from qcompile.verify import register_rule

# target -> number of spatial dims; F.conv1d / F.conv2d are these very functions
_CONVS = {torch.conv1d: 1, torch.conv2d: 2}
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
# convolutions nothing downstream handles: they stay float, and the note says why
_LEFT_ALONE = {
    torch.conv3d: "conv3d is not canonicalized (only 1-D and 2-D convolutions are)",
    torch.conv_transpose1d: "transposed convolutions are not canonicalized",
    torch.conv_transpose2d: "transposed convolutions are not canonicalized",
    torch.conv_transpose3d: "transposed convolutions are not canonicalized",
}


@dataclass
class ConvMatch:
    """A convolution spelling against a constant weight, its arguments normalized to 2-D."""

    x: Node
    weight: Node  # get_attr, 3-D for conv1d, 4-D for conv2d
    bias: Node | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    spatial: int  # 1 (conv1d) or 2
    string_padding: str | None  # "same" / "valid" when given as a string


def _bind(node: Node) -> dict | None:
    args = dict(zip(_ARG_NAMES, node.args))
    for key, value in node.kwargs.items():
        if key not in _ARG_NAMES or key in args:
            return None
        args[key] = value
    if "input" not in args or "weight" not in args:
        return None
    return {**_DEFAULTS, **args}


def _ints(value, spatial: int) -> tuple[int, ...] | None:
    """An int or a sequence of 1 or `spatial` ints as `spatial` ints, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * spatial
    if isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == spatial:
            return tuple(value)
        if len(value) == 1:
            return tuple(value) * spatial
    return None


def _to_2d(values: tuple[int, ...], fill: int) -> tuple[int, int]:
    return (fill, values[0]) if len(values) == 1 else (values[0], values[1])


def match_conv(gm: GraphModule, node: Node) -> ConvMatch | str | None:
    """A ConvMatch when `node` is a spelling of conv1d / conv2d against a constant weight
    that is not canonical yet; a reason (str) when it is a convolution this pass leaves
    alone; None for anything else, canonical convolutions included."""
    if node.op != "call_function":
        return None
    if node.target in _LEFT_ALONE:
        return _LEFT_ALONE[node.target]
    spatial = _CONVS.get(node.target)
    if spatial is None or (spatial == 2 and is_conv(node)):
        return None
    args = _bind(node)
    if args is None:
        return "arguments it does not recognize"
    x, w, b = args["input"], args["weight"], args["bias"]
    weight = get_constant(gm, w)
    if weight is None:
        return "its weight is not a constant (activation-activation convolution or a " \
               "weight computed in the graph)"
    if weight.dim() != spatial + 2:
        return f"a {weight.dim()}-D weight"
    bias = get_constant(gm, b) if b is not None else None
    if b is not None and (bias is None or bias.shape != (weight.shape[0],)):
        return "its bias is not a constant of one value per output channel"
    x_val = tensor_val(x)
    if x_val is None or x_val.dim() not in (spatial + 1, spatial + 2):
        return "an input of unknown rank"
    stride, dilation = _ints(args["stride"], spatial), _ints(args["dilation"], spatial)
    groups = args["groups"]
    if stride is None or dilation is None or type(groups) is not int:
        return "stride, dilation or groups not given as Python ints"
    string_padding = args["padding"] if isinstance(args["padding"], str) else None
    if string_padding == "valid":
        padding = (0,) * spatial
    elif string_padding == "same":
        if any(s != 1 for s in stride):
            return "padding='same' with a stride other than 1"
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in total):
            return ("padding='same' pads one side more than the other (dilation * "
                    "(kernel - 1) is odd)")
        padding = tuple(t // 2 for t in total)
    else:
        padding = _ints(args["padding"], spatial)
        if padding is None:
            return f"padding {args['padding']!r} not given as Python ints"
    return ConvMatch(x, w, b, _to_2d(stride, 1), _to_2d(padding, 0), _to_2d(dilation, 1),
                     groups, spatial, string_padding)


def _weight_4d(gm: GraphModule, w: Node, made: dict[Node, Node], before: Node) -> Node:
    """The conv1d weight [N, C/g, k] as a [N, C/g, 1, k] constant, one per weight."""
    if w not in made:
        name = str(w.meta.get("qc_param_name", w.target))
        new = add_constant(gm, name + ".2d", get_constant(gm, w).unsqueeze(-2), before=before)
        new.meta["qc_param_name"] = name
        if "qc_source" in w.meta:
            new.meta["qc_source"] = w.meta["qc_source"]
        made[w] = new
    return made[w]


def _rewrite(gm: GraphModule, node: Node, m: ConvMatch, made: dict[Node, Node]) -> Node:
    graph = gm.graph
    conv_args = (m.stride, m.padding, m.dilation, m.groups)
    if m.spatial == 2:
        with graph.inserting_before(node):
            new = graph.call_function(torch.conv2d, (m.x, m.weight, m.bias, *conv_args))
        out = new
    else:
        w = _weight_4d(gm, m.weight, made, before=node)
        with graph.inserting_before(node):
            x = graph.call_method("unsqueeze", (m.x, -2))  # [B, C, 1, L]
            new = graph.call_function(torch.conv2d, (x, w, m.bias, *conv_args))
            out = graph.call_method("squeeze", (new, -2))  # [B, N, L']
    new.meta["qc_spelling"] = f"conv{m.spatial}d"
    if "val" in node.meta:  # the same value: a convolution reading it matches in this walk
        out.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return new


@graph_pass("canonicalize-conv", requires=("freeze-params",))
def canonicalize_conv(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters: dict[str, int] = {}
    made: dict[Node, Node] = {}
    skips = Skips(ctx, "canonicalize-conv", verb="kept in float")
    for node in list(gm.graph.nodes):
        found = match_conv(gm, node)
        if found is None:
            continue
        if isinstance(found, str):
            skips.add(node.name, found)
            continue
        new = _rewrite(gm, node, found, made)
        key = new.meta["qc_spelling"]
        counters[key] = counters.get(key, 0) + 1
        if found.string_padding:
            key = f"padding_{found.string_padding}"
            counters[key] = counters.get(key, 0) + 1
    skips.flush()
    if counters:
        erase_unused(gm)
    return PassResult(gm, modified=bool(counters), counters=counters)


@register_rule("canonicalize-conv", "no spelling of conv1d / conv2d against a constant "
               "weight that canonicalize-conv rewrites is left")
def _no_conv_spellings(gm: GraphModule, node: Node) -> bool:
    return not isinstance(match_conv(gm, node), ConvMatch)


@register_rule("canonicalize-conv", "canonical convolution weights are 4-D constants and "
               "biases 1-D constants of one value per output channel")
def _conv_weight_const(gm: GraphModule, node: Node) -> bool:
    if not is_conv(node):
        return True
    w, b = get_constant(gm, node.args[1]), node.args[2]
    if w is None or w.dim() != 4:
        return False
    return b is None or (get_constant(gm, b) is not None
                         and get_constant(gm, b).shape == (w.shape[0],))
