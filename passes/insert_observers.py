"""insert-observers: observers on every activation a static recipe quantizes.

What: for each linear or convolution chosen by select-layers, an `Observe` call on its
input (site "in:<layer>") and on its output ("out:<layer>"; for a convolution read only by
a ReLU / ReLU6 / clamp, on the activation's output, which its requantization absorbs);
for attention, on q, k and v ("attn:<v layer>:q|k|v"); for a residual add of a quantized
layer's output and another quantized activation, on the sum ("add:<layer>"; after a ReLU
that reads only the sum, as for a convolution). Which statistics each keeps depends on the
options: a range observer (options.observer, else the recipe's) always; per-channel
min/max when smoothing or the learned transforms are on (the ranges of their shifted and
scaled activations come from these), with the per-channel mean for learning; the Hessian
X^T X when GPTQ or weight clipping is on; when bias correction is on, on linear inputs,
the per-channel mean E[x_j] and (static activations) a uniform sample of SAMPLE_ROWS
rows, whose rounding error is measured once the scale is known; the mean and the row
sample also when smoothing searches each layer's shift and scale (the sample is what it
measures the candidates on).
Observers are identity functions in the graph: the model computes in float while
calibrating. They store into the model's ModelState (ctx.state), keyed by site, so every
graph of the model and every recompile shares them.
Why: static activation scales and GPTQ need data; this is where it is collected.
Pre: select-layers. Post: observed nodes carry a `Sites` annotation naming their sites by
role; calibrate-qparams turns the observers into parameters and removes them.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import is_call
from qcompile.numerics.observers import observer_for
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._activations import fused_activation
from qcompile.sites import attention_site, is_conv, is_layer, producer_through_layout

SAMPLE_ROWS = 512  # rows of each linear input kept for bias correction's activation part
_OBSERVER_NAMES = {"minmax": "minmax", "moving-minmax": "moving_average_minmax",
                   "percentile": "percentile", "mse": "mse"}


class Observe(torch.nn.Module):
    """Identity that feeds the site's observers while the model is being calibrated."""

    def __init__(self, ctx: PassContext, site: str, kinds: tuple[str, ...]):
        super().__init__()
        self.ctx, self.site, self.kinds = ctx, site, kinds

    def forward(self, x):
        state = self.ctx.state
        if state is not None and state.calibrating and not isinstance(x, FakeTensor):
            for kind in self.kinds:
                key = observer_key(self.ctx, self.site, kind)
                state.observer(key, lambda k=kind: _make(k, self.ctx)).update(x.detach())
        return x


def observer_key(ctx: PassContext, site: str, kind: str) -> str:
    """Observers are per model, per options fingerprint, per site and statistic."""
    return f"{ctx.options.fingerprint()}|{site}|{kind}"


def _make(kind: str, ctx: PassContext):
    if kind == "range":
        return observer_for(_OBSERVER_NAMES[ctx.options.observer_name])
    if kind == "channels":
        return observer_for("per_channel_minmax", axis=-1)
    if kind == "hessian":
        return observer_for("hessian")
    if kind == "mean":
        return observer_for("per_channel_mean", axis=-1)
    if kind == "sample":
        return observer_for("row_sample", rows=SAMPLE_ROWS, seed=ctx.options.seed)
    raise ValueError(kind)


def _observe(gm: GraphModule, ctx: PassContext, node: Node, site: str, kinds: tuple[str, ...],
             role: str) -> bool:
    sites = ann.get(node, ann.Sites) or ann.put(node, ann.Sites())
    if getattr(sites, role) == site:
        return False
    name = "observe_" + "".join(c if c.isalnum() else "_" for c in site)
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, Observe(ctx, site, kinds))
    with gm.graph.inserting_after(node):
        obs = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
    setattr(sites, role, site)
    return True


def _input_kinds(ctx: PassContext) -> tuple[str, ...]:
    kinds = ["range"]
    if _rescales(ctx):
        kinds.append("channels")
    if ctx.options.transform_on("gptq") or ctx.options.transform_on("weight_clip"):
        kinds.append("hessian")
    if ctx.options.transform_on("bias_correction"):
        kinds.append("mean")  # E[x]: the weight part of the output shift
        act = ctx.options.recipe_obj.act
        if act is not None and not act.dynamic:  # rows: E[x - Q(x)] once Q's scale is known
            kinds.append("sample")
    if ctx.options.smooth_search:  # rows to measure each candidate's output error on; the
        kinds += [k for k in ("mean", "sample") if k not in kinds]  # mean: a shifted Hessian
    if ctx.options.transform_on("learn") and "mean" not in kinds:
        kinds.append("mean")  # a learned shift moves the Hessian by the mean
    return tuple(kinds)


def _rescales(ctx: PassContext) -> bool:
    """Whether smooth or the learned transforms may shift and scale activations per channel
    (their new ranges come from per-channel ones)."""
    return ctx.options.transform_on("smooth") or ctx.options.transform_on("learn")


@graph_pass("insert-observers", requires=("select-layers",))
def insert_observers(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"inputs": 0, "outputs": 0, "attention": 0, "residual_adds": 0}
    static = ctx.options.recipe_obj.act is not None and not ctx.options.recipe_obj.act.dynamic
    layers = [n for n in gm.graph.nodes if is_layer(n) and ann.selected(n)]
    for node in layers:
        layer = ann.get(node, ann.Layer).name
        x = node.args[0]
        kinds = _input_kinds(ctx) if static else tuple(k for k in _input_kinds(ctx)
                                                       if k != "range")
        if is_conv(node):  # channels are dim 1, not the last: ranges only (no SmoothQuant,
            kinds = ("range",) if static else ()  # no GPTQ Hessian of a last-dim input)
        if kinds and ann.site(x, "input") is None:
            counters["inputs"] += _observe(gm, ctx, x, f"in:{layer}", kinds, "input")
        if static:
            # smoothing may fold 1/s into this linear's output rows: keep channel ranges
            out_kinds = ("range", "channels") if _rescales(ctx) else ("range",)
            out = node
            if is_conv(node):
                out_kinds = ("range",)
                # a ReLU / ReLU6 reading only this conv becomes its requantization's clamp
                # (rewrite-conv): the output scale is the one after it
                act = fused_activation(node)
                out = act.node if act is not None else node
            counters["outputs"] += _observe(gm, ctx, out, f"out:{layer}", out_kinds,
                                            "output")
    if static:
        for node in list(gm.graph.nodes):
            if is_call(node, F.scaled_dot_product_attention):
                site = attention_site(node)
                for i, part in enumerate("qkv"):
                    arg = node.args[i]
                    if isinstance(arg, Node):
                        counters["attention"] += _observe(gm, ctx, arg, f"{site}:{part}",
                                                          ("range",), f"attn_{part}")
        for node in list(gm.graph.nodes):
            layer = _residual_writer(node)
            if layer is not None:
                # a ReLU after the sum (ResNet) becomes add_int8's clamp (integer-dataflow)
                act = fused_activation(node)
                at = act.node if act is not None else node
                counters["residual_adds"] += _observe(gm, ctx, at, f"add:{layer}", ("range",),
                                                      "add")
    modified = any(counters.values())
    return PassResult(gm, modified=modified, counters=counters)


def _residual_writer(node: Node) -> str | None:
    """The layer writing a residual add whose other side is also quantized (a quantized
    linear's input or output), else None."""
    if not is_call(node, operator.add, torch.add) or len(node.args) != 2:
        return None
    sides = [_source(a) for a in node.args]
    if not all(isinstance(s, Node) for s in sides):
        return None
    def quantized_linear(n):
        return is_layer(n) and ann.selected(n) is not None

    for i, s in enumerate(sides):
        other = _unobserved(node.args[1 - i])
        if quantized_linear(s) and (ann.site(other, "input") is not None
                                    or quantized_linear(sides[1 - i])):
            return ann.get(s, ann.Layer).name
    return None


def _source(node):
    """Up through layout ops and observers to the node that computed the values."""
    while True:
        up = producer_through_layout(_unobserved(node))
        if up is node:
            return node
        node = up


def _unobserved(node):
    while isinstance(node, Node) and node.op == "call_module" and node.target.startswith(
            "observe_"):
        node = node.args[0]
    return node
