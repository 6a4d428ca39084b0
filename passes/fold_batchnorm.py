"""fold-batchnorm: an eval-mode batch norm right after a convolution or a linear moves into
that layer's weight and bias, and the batch norm leaves the graph.

What: for y = conv(x, W, b) (or F.linear) read only by
`F.batch_norm(y, mean, var, gamma, beta, training=False, momentum, eps)`,
    s  = gamma / sqrt(var + eps)                 (one value per output channel)
    W' = W * s[:, None, None, None]              (W[:, None] for a linear)
    b' = (b - mean) * s + beta
computed in float64 and stored in W's dtype as new constants (the user's tensors are never
mutated; a weight another layer also reads gets a copy for this layer only), and the
batch norm's readers read the convolution. gamma / beta / b may be None (1, 0, 0).
Handled: a canonical conv2d (BatchNorm2d after Conv2d), the conv1d form that
canonicalize-conv leaves (conv2d -> squeeze(-2) -> BatchNorm1d), and a canonical F.linear
with a 2-D output (BatchNorm1d after Linear); both `F.batch_norm` and `torch.batch_norm`.
Why: batch norm is per-channel affine in eval mode, so folding it is exact in real
arithmetic; it removes a float op between the convolution and what follows, and the
quantized weight is then the one that computes.
Left alone, recorded with ctx.note: a batch norm in training mode (batch statistics),
one whose statistics or affine parameters are not constants, one whose input is not such a
layer or is read by something else too (the unnormalized value is needed), and one whose
channel dim is not the layer's output channel dim (an unbatched convolution, a linear with
a 3-D output, which BatchNorm1d normalizes over its second dim).
Pre: canonicalize-conv (canonical convolutions; run canonicalize-linear first to fold
linears too). Post: no batch norm reads a canonical convolution or linear that only it
reads, unless a note says why; the graph computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile.fx_utils import (
    erase_unused,
    get_constant,
    is_call,
    is_method,
    scalar_value,
    tensor_val,
)
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._structure import Skips, WeightEditor, param_name
from qcompile.sites import is_conv
from qcompile.sites import layer_name as conv_name

# target -> its argument names in order (F.batch_norm puts the statistics first)
_BATCH_NORMS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training",
                       "momentum", "eps", "cudnn_enabled"),
}
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _bind(node: Node) -> dict:
    names = _BATCH_NORMS[node.target]
    return {**_DEFAULTS, **dict(zip(names, node.args)), **node.kwargs}


def _is_linear(gm: GraphModule, node) -> bool:
    if not is_call(node, F.linear) or len(node.args) != 3 or node.kwargs:
        return False
    w = get_constant(gm, node.args[1])
    return w is not None and w.dim() == 2


def _producer(gm: GraphModule, y) -> tuple[Node, str] | str:
    """(the layer whose output the batch norm reads, its kind) or why there is none."""
    rank = tensor_val(y).dim() if tensor_val(y) is not None else None
    only_bn = isinstance(y, Node) and len(y.users) == 1
    if is_conv(y):
        if not only_bn:
            return "the convolution's output is read by other nodes too"
        return (y, "conv2d") if rank == 4 else "an unbatched convolution"
    if is_method(y, "squeeze") and len(y.args) == 2 and y.args[1] in (-2, 2) \
            and is_conv(y.args[0]):
        conv = y.args[0]
        if not only_bn or len(conv.users) != 1:
            return "the convolution's output is read by other nodes too"
        conv_rank = tensor_val(conv).dim() if tensor_val(conv) is not None else None
        return (conv, "conv1d") if rank == 3 and conv_rank == 4 else "an unbatched conv1d"
    if _is_linear(gm, y):
        if not only_bn:
            return "the linear's output is read by other nodes too"
        return (y, "linear") if rank == 2 else "a linear output that is not 2-D (the " \
            "batch norm's channel dim is not the linear's output dim)"
    return "its input is not a canonical convolution or linear"


def _constants(gm: GraphModule, args: dict, channels: int) -> dict | str:
    """The statistics and affine parameters as float64 tensors, or why they are not usable."""
    out = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        node = args[key]
        if node is None and key in ("weight", "bias"):
            out[key] = None
            continue
        value = get_constant(gm, node) if isinstance(node, Node) else None
        if value is None:
            return f"its {key} is not a constant"
        if value.shape != (channels,):
            return f"its {key} has shape {tuple(value.shape)}, not ({channels},)"
        out[key] = value.detach().to(torch.float64)
    return out


def _fold(gm: GraphModule, editor: WeightEditor, layer: Node, kind: str, stats: dict,
          eps: float) -> None:
    w_node, b_node = layer.args[1], layer.args[2]
    weight = get_constant(gm, w_node)
    w64 = weight.detach().to(torch.float64)
    b64 = (get_constant(gm, b_node).detach().to(torch.float64) if b_node is not None
           else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    gamma = stats["weight"] if stats["weight"] is not None else torch.ones_like(b64)
    beta = stats["bias"] if stats["bias"] is not None else torch.zeros_like(b64)
    scale = gamma / torch.sqrt(stats["running_var"] + eps)  # [N]
    new_w = w64 * scale.reshape(-1, *[1] * (weight.dim() - 1))  # [N, C/g, kh, kw] or [N, K]
    new_b = (b64 - stats["running_mean"]) * scale + beta
    name = conv_name(layer) if kind != "linear" else param_name(w_node).removesuffix(".weight")
    editor.set(layer, 1, new_w, like=weight, name=param_name(w_node))
    editor.set(layer, 2, new_b, like=weight, name=f"{name}.bias")
    layer.meta.setdefault("qc_transforms", []).append("fold-batchnorm")


@graph_pass("fold-batchnorm", requires=("canonicalize-conv",))
def fold_batchnorm(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters: dict[str, int] = {}
    skips = Skips(ctx, "fold-batchnorm", verb="left")
    editor = WeightEditor(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _BATCH_NORMS:
            continue
        args = _bind(node)
        if args["training"] is not False:
            skips.add(node.name, "batch norm in training mode (batch statistics)")
            continue
        eps = scalar_value(args["eps"])
        found = _producer(gm, args["input"])
        if isinstance(found, str) or eps is None:
            skips.add(node.name, found if isinstance(found, str) else "eps is not a number")
            continue
        layer, kind = found
        stats = _constants(gm, args, get_constant(gm, layer.args[1]).shape[0])
        if isinstance(stats, str):
            skips.add(node.name, stats)
            continue
        _fold(gm, editor, layer, kind, stats, eps)
        node.replace_all_uses_with(args["input"])
        gm.graph.erase_node(node)
        counters[kind] = counters.get(kind, 0) + 1
    skips.flush()
    if counters:
        erase_unused(gm)
    return PassResult(gm, modified=bool(counters), counters=counters)
