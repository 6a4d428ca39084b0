"""quantize-weights: every selected linear's weight becomes integers with scales.

What: round-to-nearest, or GPTQ (columns in act_order) where the recipe or options turn
it on and calibration gathered the input's Hessian. 8-bit: symmetric per output channel
(7-bit, [-64, 63], where select-layers narrowed them for this CPU's int8 kernel). 4-bit
with integer activations (w4a8, w4a4, w4a4-static, mixed's int4 layers): symmetric per
output channel, so the accumulator has one scale per channel; with options["group_size"],
group-wise with each group's scale its row's times an integer in 1..Layer.group_levels
(QuantSpec.group_levels): q times that integer is an int8 value, so the GEMM is still one
int8 GEMM with one scale per row. 4-bit weight-only (w4a16): group-wise, group 128 (one
group per row when K is not a multiple of 128; the report says so).
With options["weight_clip"], each row's range is first clipped to the ratio whose rounding
gives the layer the least output error (numerics.weights.clip_search, Hessian-weighted
where calibration gathered the input's Hessian), for RTN and GPTQ alike, except that
GPTQ on a group-wise weight searches each group's range instead, as it reaches the group
(gptq_quantize's group_search); a layer whose clip ratios learn-transforms learned
(Layer.clip) uses those instead.
Pre: select-layers (and calibrate-qparams when GPTQ or weight clipping is on).
A model given a saved quantization (qcompile.load) takes each layer's weight from it.
Post: each selected linear's Layer annotation holds its numerics.weights.QuantizedWeight.
The graph itself is unchanged; the rewrite passes use the quantized weights.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant, is_call
from qcompile.numerics.observers import shrink_hessian
from qcompile.numerics.specs import QuantSpec
from qcompile.numerics.weights import (
    QuantizedWeight,
    clip_search,
    gptq_quantize,
    quantize_weight_rtn,
)
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._sequential import few_rows_note, sequential_gptq
from qcompile.passes.calibrate_qparams import loaded_quantization
from qcompile.sites import is_conv


def weight_spec_for(ctx: PassContext, k: int, bits: int | None = None,
                    levels: int | None = None, conv: bool = False
                    ) -> tuple[QuantSpec, str | None]:
    """The weight spec of a layer: the recipe's, at `bits` where select-layers narrowed
    them for the CPU route; group-wise where options["group_size"] or the recipe says, with
    integer group multipliers up to `levels` (select-layers' Layer.group_levels, else the
    most that keeps the products int8: QuantSpec.max_group_levels) where the activations
    are integers too; symmetric or with a zero point per group as options say."""
    recipe = ctx.options.recipe_obj
    bits = bits or recipe.weight.bits
    g = ctx.options.weight_group_size
    sym = ctx.options.group_weights_symmetric
    channel = QuantSpec(bits=bits, granularity="per_channel", axis=0)
    # groups are for int4 (recipe mixed: its int4 layers)
    if bits > 4 or not ctx.options.group_wise_weights:
        return channel, None
    if conv:
        return channel, "a convolution: per output channel (no group-wise convolution)"
    if recipe.act is None:  # weight-only: float group scales; per channel, a group per row
        uneven = g is not None and k % g
        return (QuantSpec(bits=bits, symmetric=sym, granularity="per_group",
                          group_size=g if g is not None and not uneven else k),
                f"K={k} is not a multiple of {g}: one group per row" if uneven else None)
    if k % g:
        return channel, f"K={k} is not a multiple of group_size {g}: per output channel"
    spec = QuantSpec(bits=bits, symmetric=sym, granularity="per_group", group_size=g)
    return dataclasses.replace(spec, group_levels=levels or spec.max_group_levels), None


@graph_pass("quantize-weights", requires=("select-layers",))
def quantize_weights(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"rtn": 0, "gptq": 0, "loaded": 0, "clipped_rows": 0, "sequential": 0,
                "sequential_reused": 0}
    todo = [n for n in gm.graph.nodes if (is_call(n, F.linear) or is_conv(n))
            and ann.selected(n) is not None]
    done: set[Node] = set()
    if ctx.options.transform_on("gptq") and ctx.options.transform_on("sequential") and \
            loaded_quantization(ctx) is None:
        batches = ctx.analysis.get("calib_inputs") or []
        eligible = [n for n in todo if not is_conv(n)]
        cache = ctx.state.learned if ctx.state is not None else {}
        keys = {n: _sequential_key(ctx, n) for n in eligible}
        if eligible and all(k in cache for k in keys.values()):
            for n in eligible:  # as the graph of the model that replayed most batches did
                _quantize_layer(gm, ctx, n, counters, preset=cache[keys[n]])
                done.add(n)
            counters["sequential_reused"] = len(eligible)
        elif batches:
            def quantize(lin: Node, hessian: torch.Tensor, shrinkage: float,
                         weight: torch.Tensor) -> torch.Tensor:
                done.add(lin)
                qw = _quantize_layer(gm, ctx, lin, counters, (hessian, shrinkage),
                                     weight=weight)
                cache[keys[lin]] = qw
                return qw.dequantize()

            counters["sequential"] = sequential_gptq(gm, ctx, batches, set(eligible),
                                                     quantize)
        else:
            ctx.note("quantize-weights: no calibration batch reached this graph, so GPTQ "
                     "used the float model's Hessians, not the partly quantized model's")
    few: list = []  # GPTQ on calibration's Hessians from fewer rows than K
    for node in todo:
        if node not in done:
            _quantize_layer(gm, ctx, node, counters, few=few)
    if few:
        ctx.note(few_rows_note(few))
    for key in ("sequential", "sequential_reused"):  # named only where sequential ran
        if not counters[key]:
            del counters[key]
    return PassResult(gm, modified=False, counters=counters)


def _sequential_key(ctx: PassContext, node: Node) -> str:
    name = ann.selected(node).name
    transforms = ann.weight_transforms(ctx.layer(name, "linear").transforms)
    return f"{ctx.options.fingerprint()}|gptq|{name}|{transforms}"


def _quantize_layer(gm: GraphModule, ctx: PassContext, node: Node, counters: dict,
                    gathered: tuple[torch.Tensor, float] | None = None,
                    preset: QuantizedWeight | None = None,
                    weight: torch.Tensor | None = None,
                    few: list | None = None) -> QuantizedWeight:
    """node's weight quantized (loaded, GPTQ or RTN) onto its Layer; `gathered`: the input's
    Hessian and its shrinkage that sequential GPTQ gathered, in place of calibration's;
    `preset`: what sequential GPTQ gave this layer in an earlier graph of the model; `few`
    collects (node, rows, K, shrinkage) where GPTQ runs on calibration's Hessian from fewer
    rows than K (sequential GPTQ reports its own)."""
    conv = is_conv(node)
    selected = ann.selected(node)
    w = get_constant(gm, node.args[1]).detach().float() if weight is None else weight
    w = w.reshape(w.shape[0], -1)  # a conv's [N, C/g, kh, kw] as the GEMM's [N, K]
    spec, note = weight_spec_for(ctx, w.shape[1], selected.weight_bits,
                                 selected.group_levels, conv)
    layer = ctx.layer(selected.name, "linear")
    if note:
        layer.detail["weight_groups"] = note
    sequential = gathered is not None
    if gathered is not None:
        hessian, shrinkage = gathered
    else:
        site = (ctx.analysis.get("calib") or {}).get(ann.site(node.args[0], "input"))
        hessian = site.hessian if site is not None else None  # q/k/v share one site
        shrinkage = site.hessian_shrinkage if site is not None else 0.0
        rows = site.hessian_rows if site is not None else 0
    use_gptq = ctx.options.transform_on("gptq")
    use_clip = ctx.options.transform_on("weight_clip")
    loaded = loaded_quantization(ctx)
    selected.qweight_transforms = ann.weight_transforms(layer.transforms)
    saved = loaded.weight(selected.name, selected.qweight_transforms) if loaded else None
    if preset is not None:
        qw = preset
        layer.transforms.append("gptq")
        layer.detail["gptq"] = ("sequential, as quantized for the graph of the model that "
                                "replayed the most calibration batches")
    elif saved is not None:
        if tuple(saved.qweight.shape) != tuple(w.shape):
            raise ValueError(f"the loaded weight of {selected.name} is "
                             f"{tuple(saved.qweight.shape)}, the layer's {tuple(w.shape)}")
        qw = saved
        counters["loaded"] += 1
        layer.transforms.append("loaded")
    elif use_gptq and hessian is not None and not conv:
        group_search = _group_search(spec, use_clip, learned=selected.clip is not None)
        if group_search:
            layer.detail["weight_clip"] = GROUP_SEARCH_DETAIL
        clip = None if group_search else _clip(layer, w, spec, hessian, counters, selected,
                                               use_clip)
        qw = _gptq(w, hessian, shrinkage, spec, clip, group_search)
        if not sequential and few is not None and rows < w.shape[1]:
            few.append((node, rows, w.shape[1], shrinkage))
        counters["gptq"] += 1
        layer.transforms.append("gptq")
        layer.detail["gptq"] = (
            ("sequential: the Hessian of its input in the model quantized up to it, rounded "
             "as it runs" if sequential else "the Hessian of its float input") +
            f"; shrunk {shrinkage:.2f} of the way to its mean diagonal (Ledoit-Wolf)")
    else:
        if use_gptq:
            layer.detail["gptq"] = ("a convolution: round-to-nearest" if conv else
                                    "no Hessian was gathered: round-to-nearest")
        clip = _clip(layer, w, spec, None if conv else hessian, counters, selected,
                     use_clip)
        qw = quantize_weight_rtn(w, spec, clip=clip)
        counters["rtn"] += 1
    selected.qweight = qw
    if qw.spec.group_levels is not None:
        layer.detail["weight_groups"] = (
            f"int4 in groups of {qw.spec.group_size}"
            f"{'' if qw.spec.symmetric else ' with a zero point each'}, each group's scale "
            f"the row's times an integer in 1..{qw.spec.group_levels}")
    return qw


def preview_weight(ctx: PassContext, w: torch.Tensor, spec: QuantSpec, site, conv: bool
                   ) -> QuantizedWeight:
    """What quantize-weights will make of a float weight w [N, K] whose input is the
    calibrated `site` (a CalibSite, or None), short of sequential GPTQ's replay and of
    learned clip ratios: GPTQ on the site's shrunk Hessian where gptq is on (not for a
    convolution), else round-to-nearest; rows clipped by the Hessian-weighted search where
    weight_clip is on. choose-precision measures each candidate width with it, so that
    the distortion it predicts is that of the weights the model will run."""
    hessian = site.hessian if site is not None and not conv else None
    use_clip = ctx.options.transform_on("weight_clip") and spec.granularity != "per_tensor"
    if ctx.options.transform_on("gptq") and hessian is not None:
        group_search = _group_search(spec, use_clip)
        clip = clip_search(w, spec, hessian) if use_clip and not group_search else None
        return _gptq(w, hessian, site.hessian_shrinkage, spec, clip, group_search)
    return quantize_weight_rtn(w, spec, clip=clip_search(w, spec, hessian) if use_clip else None)


# what a layer's report says of weight_clip where GPTQ searches each group's range
GROUP_SEARCH_DETAIL = ("each group's range searched by its error weighted with the "
                       "Hessian's diagonal, as GPTQ reaches the group")


def _group_search(spec: QuantSpec, use_clip: bool, learned: bool = False) -> bool:
    """Whether GPTQ searches each group's range (gptq_quantize's group_search) in place of
    one clip ratio per row: for group-wise weights where weight_clip is on and no clip
    ratio was learned. Held-out output error of Gemma 3 270M's rotated layers (int4,
    groups of 16, GPTQ on 1,024 calibration tokens): 3-8% below the row clip's."""
    return use_clip and spec.granularity == "per_group" and not learned


def _gptq(w: torch.Tensor, hessian: torch.Tensor, shrinkage: float, spec: QuantSpec,
          clip: torch.Tensor | None, group_search: bool = False) -> QuantizedWeight:
    """GPTQ as quantize-weights runs it (and preview_weight previews it). The Hessian is
    shrunk as far as its rows leave it uncertain (Ledoit-Wolf): from a handful of
    calibration tokens GPTQ over-fits them (a tiny LLaMA calibrated on 8 tokens: 0.9800
    mean logit cosine unshrunk, 0.9845 shrunk, 0.9877 round-to-nearest). Columns go in
    order of decreasing Hessian diagonal (GPTQ's act_order, AutoGPTQ's desc_act):
    all-MiniLM-L6-v2 w4a8, groups of 32, mean cosine 0.9865 -> 0.9880."""
    h = shrink_hessian(hessian.to(w.device), shrinkage)
    return gptq_quantize(w, h, spec, clip=clip, act_order=True, group_search=group_search)


def _clip(layer, w: torch.Tensor, spec, hessian, counters, selected: ann.Layer,
          search: bool) -> torch.Tensor | None:
    """Each row's clip ratio: learned (learn-transforms), else searched where `search`
    (numerics.weights.clip_search), with what it weighed in the layer's detail; None for a
    per-tensor weight or neither."""
    learned = selected.clip is not None and selected.clip.shape == (w.shape[0],)
    if spec.granularity == "per_tensor" or not (learned or search):
        return None
    clip = selected.clip.float() if learned else clip_search(w, spec, hessian)
    clipped = int((clip < 1).sum())
    counters["clipped_rows"] += clipped
    layer.detail["weight_clip"] = (
        f"{clipped} of {clip.numel()} rows clipped (mean ratio {float(clip.mean()):.3f}), "
        + ("learned against the block's output error" if learned else
           "by the Hessian-weighted output error" if hessian is not None else
           "by the weight's squared error (no calibration Hessian)"))
    return clip
