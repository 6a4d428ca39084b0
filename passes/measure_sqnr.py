"""measure-sqnr: per-layer SQNR of the quantized graph against the float graph.

What: runs the float graph (as it was before the rewrites, after smoothing where that ran:
smoothing rescales the outputs of the layers it folds into) and the quantized graph on the
same sample inputs (the last calibration batch, or the compile-time example inputs; a few
leading rows of them, `probe_inputs`: the statistics of a few hundred tokens are the
report's, and a full serving batch made this pass most of a compile), and
for every quantized layer compares its float output with the quantized graph's output at
the same point: SQNR = 10 log10(|y|^2 / |y - y_q|^2). Errors accumulate through the
model, so a layer's figure includes the effect of the layers before it.
It also records, per linear, its input's max|x| and kurtosis before the transforms (the
canonical graph) and after them, for the report's picture.
Why: the report says, per layer, how much quantization costs and what transforms did.
With a mixed-precision plan (choose-precision), the distortion of the graph's outputs
(passes/_sensitivity.py's D, on the same rows) is recorded beside the plan's prediction.
A graph output no closer to float than zeros (SQNR <= ALARM_SQNR_DB) is wrong values: a
QuantizationAccuracyWarning and a report note say so.
Pre: lower. Post: ctx.layers[name].sqnr_db set; the graph is unchanged.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Interpreter, Node

from qcompile import annotations as ann
from qcompile.fx_utils import is_call
from qcompile.pass_manager import (
    PassContext,
    PassResult,
    QuantizationAccuracyWarning,
    graph_pass,
)
from qcompile.passes._activations import fused_activation
from qcompile.passes._sensitivity import float_outputs
from qcompile.sites import is_conv, linear_name


class _Record(Interpreter):
    """Each layer's output (by `key`); with inputs=True also the input statistics of every
    linear it runs (_input_stats)."""

    def __init__(self, gm, key, inputs: bool = False):
        super().__init__(gm)
        self.key, self.seen = key, {}
        self.stats = {} if inputs else None

    def run_node(self, n):
        out = super().run_node(n)
        if self.stats is not None:
            _input_stats(self, n)
        layer = self.key(n)
        if layer is None or not isinstance(out, torch.Tensor):
            return out
        qp = ann.get(n, ann.QParams)
        if out.is_floating_point():
            self.seen[layer] = out.detach()
        elif qp is not None:  # an int8 output that flows on as integers
            self.seen.setdefault(layer, (out.float() - qp.zero_point) * qp.scale)
        return out


def _layer_of(n) -> str | None:
    """The layer whose output n stands for (or, an int8 output, carries)."""
    for kind in (ann.LayerOutput, ann.Layer):
        found = ann.get(n, kind)
        if found is not None:
            return found.name
    return None


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    # squares in the outputs' float32, sums in float64: each square rounds by 2**-24 at
    # most, far below what a dB figure shows, and a float64 copy of every layer's output
    # was a tenth of MiniLM's compile
    ref, test = ref.float(), test.float()
    noise = (ref - test).pow(2).sum(dtype=torch.float64).item()
    signal = ref.pow(2).sum(dtype=torch.float64).item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


PROBE_ROWS = 512  # about this many leading-dim items' worth of tokens (rows of a linear)
KURTOSIS_ROWS = 1024  # the kurtosis of a linear's input is taken on this many rows at most


def probe_inputs(gm: GraphModule, inputs: list) -> list:
    """The sample inputs cut to their first few leading-dim items (batch rows), so that
    about PROBE_ROWS rows reach each linear; symbolic-size inputs follow the tensors they
    size. The inputs unchanged where that cannot be done consistently: no tensor input,
    or a size symbol that stands for the leading dim and another one (Dynamo's duck
    sizing gives one symbol to a 16 x 16 batch)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 2]
    if not tensors or len(placeholders) != len(inputs):
        return inputs
    b = tensors[0].shape[0]
    if b == 0:
        return inputs  # an empty batch: nothing to cut
    per_item = math.prod(tensors[0].shape[1:-1]) if tensors[0].dim() > 2 else \
        tensors[0].shape[-1]
    keep = max(1, min(b, -(-PROBE_ROWS // max(1, per_item))))
    if keep == b:
        return inputs
    cut, sizes = [], {}  # sizes: size symbol -> its value after the cut
    for node, x in zip(placeholders, inputs):
        val = node.meta.get("val")
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == b:
            x = x[:keep]
        if isinstance(x, torch.Tensor) and isinstance(val, torch.Tensor):
            for d_sym, d in zip(val.shape, x.shape):
                if isinstance(d_sym, torch.SymInt):
                    if sizes.setdefault(str(d_sym), d) != d:
                        return inputs  # one symbol, two sizes after the cut
        cut.append(x)
    out = []
    for node, x in zip(placeholders, cut):
        val = node.meta.get("val")
        out.append(sizes.get(str(val), x) if isinstance(val, torch.SymInt) else x)
    return out


@graph_pass("measure-sqnr", requires=("lower",))
def measure_sqnr(gm: GraphModule, ctx: PassContext) -> PassResult:
    float_gm = ctx.analysis.get("float_gm")
    inputs = ctx.analysis.get("sample_inputs")
    if float_gm is None or inputs is None:
        ctx.note("no float graph or sample inputs: per-layer SQNR not measured")
        return PassResult(gm, False, {})
    probe = probe_inputs(gm, inputs)
    try:
        return _measure(gm, ctx, float_gm, probe)
    except Exception:  # noqa: BLE001 - a graph that bakes the batch size: use it all
        if probe is inputs:
            raise
        return _measure(gm, ctx, float_gm, inputs)


def _float_layer_of(n, fused: bool) -> str | None:
    """The layer a float node's output stands for: a selected layer, or (fused: static
    recipes) the activation a quantized convolution absorbs (rewrite-conv: its quantized
    output is after it)."""
    if n.op != "call_function":
        return None
    layer = ann.selected(n)
    first = n.args[0] if n.args else None
    if layer is None and fused and isinstance(first, Node) and is_conv(first):
        act = fused_activation(n.args[0])
        if act is not None and act.node is n:
            layer = ann.selected(n.args[0])
    return getattr(layer, "name", None)


def _measure(gm: GraphModule, ctx: PassContext, float_gm, inputs) -> PassResult:
    with torch.no_grad():
        act = ctx.options.recipe_obj.act
        fused = act is not None and not act.dynamic
        ref = _Record(float_gm, lambda n: _float_layer_of(n, fused), inputs=True)
        ref_out = float_outputs(ref.run(*inputs))
        test = _Record(gm, _layer_of)
        test_out = test.run(*inputs)
    plan, metric = ctx.analysis.get("precision"), ctx.analysis.pop("distortion", None)
    test_out = float_outputs(test_out)
    if plan is not None and metric is not None and metric.matches(test_out):
        # what the mixed-precision choice really costs, beside its forecast
        plan.real_measured = metric(test_out)
    measured = 0
    for layer, y in ref.seen.items():
        # an empty output (a batch of 0 rows) carries no signal and no noise: no figure
        if layer in test.seen and layer in ctx.layers and y.numel():
            ctx.layers[layer].sqnr_db = sqnr_db(y, test.seen[layer])
            measured += 1
    _alarm(ctx, ref_out, test_out)
    if not measured and ref.seen:
        ctx.note("the sample inputs reach every layer with 0 rows: per-layer SQNR not "
                 "measured")
    _activation_ranges(ctx, ref.stats, inputs)
    return PassResult(gm, modified=False, counters={"layers": measured})


# A graph output whose quantization noise is as large as the output itself (SQNR <= 0 dB:
# returning zeros would be as close to float) is wrong values, whatever the recipe meant.
ALARM_SQNR_DB = 0.0
BAD_LAYER_SQNR_DB = 10.0  # the alarm names the first layers at or below this


def _alarm(ctx: PassContext, ref: list, test: list) -> None:
    """Warn (and note) when a float output of the quantized graph is no closer to float
    than zeros on the probe rows, naming the layers where the error is first that large."""
    if len(ref) != len(test):
        return
    worst = min((sqnr_db(r, t) for r, t in zip(ref, test)
                 if r.numel() and r.shape == t.shape), default=math.inf)
    if worst > ALARM_SQNR_DB:
        return
    first = [name for name, layer in ctx.layers.items()  # in graph order
             if layer.sqnr_db is not None and layer.sqnr_db <= BAD_LAYER_SQNR_DB][:4]
    msg = (f"qcompile: {ctx.name} under recipe {ctx.options.recipe!r}: an output of the "
           f"quantized graph is no closer to float than zeros would be (SQNR {worst:.1f} dB "
           "on the probe rows): its values are wrong, not approximate. Layers whose SQNR "
           f"first falls to {BAD_LAYER_SQNR_DB:g} dB: {first or 'none'}. Use a recipe with "
           "more bits, leave those layers in float (options={'skip': [...]}), or read "
           "qcompile.report(model)")
    ctx.note(msg)
    warnings.warn(msg, QuantizationAccuracyWarning, stacklevel=2)


def _input_stats(interp: Interpreter, n: Node) -> None:
    """max|x| (every row) and kurtosis (KURTOSIS_ROWS evenly spaced rows, in float64) of
    n's input where n is a linear, into interp.stats by layer name."""
    if is_call(n, F.linear) and interp.env[n.args[0]].numel():  # 0 rows: no statistics
        x = interp.env[n.args[0]].detach()
        x = x.reshape(-1, x.shape[-1])  # real sizes: metadata may hold symbolic ones
        c = x[::-(-x.shape[0] // KURTOSIS_ROWS)].double()
        c = c - c.mean()
        kurt = (c.pow(4).mean() / c.pow(2).mean().clamp(min=1e-30).pow(2)).item()
        interp.stats[linear_name(n)] = {"absmax": x.abs().max().item(), "kurtosis": kurt}


def _activation_ranges(ctx: PassContext, after: dict, inputs) -> None:
    """Per-layer input range before the transforms (the canonical graph, run here) and
    after them (`after`: taken while the float graph ran for the SQNR), for the report and
    its picture."""
    before = {}
    if ctx.analysis.get("canonical_gm") is not None:
        probe = _Record(ctx.analysis["canonical_gm"], lambda n: None, inputs=True)
        with torch.no_grad():
            probe.run(*inputs)
        before = probe.stats
    for key, stats_of in (("before", before), ("after", after)):
        for layer, stats in stats_of.items():
            if layer in ctx.layers:
                ctx.layers[layer].detail[f"input_{key}"] = stats
