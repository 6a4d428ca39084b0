"""rewrite-attention: sdpa -> quantized attention on int8 q, k, v.

What: F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale, gqa)
becomes attention_int8(quantize(q), quantize(k), quantize(v), scales, ...): int32 Q K^T
with the dequantization and softmax scale folded into one multiplier, float softmax,
P V (lowering/kernels/attention.py). q, k and v are int8 in every recipe (4-bit ones
too: their 4 bits are the linears' inputs). Static recipes quantize with the calibrated
per-tensor scales of the sites "attn:<layer>:q|k|v" (symmetric, so the kernel needs no
zero points); the dynamic recipe computes per-tensor scales at run time
(quantize_absmax). Where v (or q, k) comes straight from a quantized linear through
layout ops, integer-dataflow then removes the float round trip.
Skipped (stays in float, with the reason in the report): dropout > 0, a query/key head
size mismatch, w4a16 (weight-only recipes keep activations in float), option
quantize_attention=False, and (quantize_attention None) on CPU under kernels="auto",
unless integer_nonlinear asks for the integer softmax (float_attention_reason): on a CPU
with neither AVX2 nor AVX512-VNNI, whose int8 attention is float SDPA on dequantized
inputs, never faster than float; with a kernel, where online-hadamard would rotate q and k
at run time. Elsewhere on CPU an int8 kernel runs: with AVX512-VNNI
(lowering/kernels/attention_cpu.py) 2.1-2.7 vs 7.0 ms for one all-MiniLM-L6-v2 layer, 32 x
128 tokens, 2 Zen 4 cores; with AVX2 (lowering/kernels/attention_avx2.py) 6.1 vs 13.2 ms
on 2 Zen 3 cores. integer-dataflow then lets the q,
k and v linears requantize straight to the attention's grid, and moves a static quantize
of the output into the attention itself.
Pre: canonicalize-attention (and calibrate-qparams for static recipes).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, is_call, tensor_val
from qcompile.lowering import cpu_routes, ops, registry
from qcompile.numerics.specs import QuantSpec
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes.calibrate_qparams import activation_spec
from qcompile.sites import attention_site


def float_attention_reason(ctx: PassContext, q) -> str | None:
    """Why every attention whose query is `q` stays float under these options, whatever its
    shape, or None: a weight-only recipe; option quantize_attention; with it None,
    kernels="auto" on CPU (never slower than float), unless the integer-only softmax was
    asked for. online-hadamard asks too: rotating q and
    k of a float attention would only cost time."""
    opts = ctx.options
    recipe = opts.recipe_obj
    if recipe.act is None:
        return f"recipe {recipe.name!r} keeps activations in float"
    if opts.quantize_attention is not None:
        return None if opts.quantize_attention else "option quantize_attention=False"
    if (opts.kernels == "auto" and tensor_val(q).device.type == "cpu"
            and not opts.transform_on("integer_nonlinear")):
        if registry.choose(ops.attention_int8, "cpu", "cpu").name == "cpu-sdpa":
            caps = cpu_routes.cpu_capabilities()
            why = ("no int8 attention kernel is built here (its build failed, or Inductor does "
                   "not build for AVX2 or AVX512-VNNI)" if caps.avx2 or caps.avx512_vnni
                   else "this CPU has neither AVX2 nor AVX512-VNNI")
            return (f"{why}: its int8 attention is float SDPA on the dequantized inputs, no "
                    "faster than float (kernels='cpu' quantizes it anyway)")
        # measured on MiniLM (32 x 128, ms per batch, int8 kernel against float SDPA): 2
        # AVX512-VNNI cores w8a8-static 122 vs 143, w8a8 143 vs 164, w4a8 252 vs 239; 2
        # AVX2 cores w8a8-static 400 vs 433, w8a8 415 vs 435
        if opts.transform_on("online_hadamard"):
            return ("with online-hadamard an int8 attention rotates q and k at run time, "
                    "which costs more than the int8 attention kernel saves (kernels='cpu' "
                    "quantizes it anyway)")
    return None


# q, k and v are int8 in every recipe: the kernel is attention_int8, and a recipe's 4-bit
# activations are its linears' inputs (QuaRot's W4A4 computes attention in 16 bits; its
# 4-bit KV cache is grouped per head). Per-tensor int4 q / k / v took all-MiniLM-L6-v2's
# w4a4 (attention quantized) to 0.9489 mean cosine.
ATTENTION_QMAX = 127


def _symmetric_scale(site, grid: QuantSpec, qmax: int) -> float | None:
    """A symmetric scale for [-qmax, qmax] covering the calibrated range [lo, hi] (from
    the asymmetric parameters on the activations' grid: lo = (grid.qmin - zp) * s,
    hi = (grid.qmax - zp) * s)."""
    if site is None or site.scale is None:
        return None
    lo = (grid.qmin - site.zero_point) * site.scale
    hi = (grid.qmax - site.zero_point) * site.scale
    return max(abs(lo), abs(hi), 1e-12) / qmax


@graph_pass("rewrite-attention", requires=("canonicalize-attention",))
def rewrite_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.options.recipe_obj
    counters = {"static": 0, "dynamic": 0, "float": 0}
    calib = ctx.analysis.get("calib", {})
    for node in list(gm.graph.nodes):
        if not is_call(node, F.scaled_dot_product_attention):
            continue
        site = attention_site(node)
        rec = ctx.layer(site, "attention")
        for t in node.meta.get("qc_transforms", ()):  # e.g. online Hadamard on q and k
            if t not in rec.transforms:
                rec.transforms.append(t)
        q, k, v = node.args
        kw = node.kwargs
        reason = float_attention_reason(ctx, q)
        if reason is None and kw["dropout_p"]:
            reason = "attention dropout > 0"
        elif reason is None and tensor_val(q).shape[-1] != tensor_val(k).shape[-1]:
            reason = "query and key head sizes differ"
        if reason:
            rec.reason = reason
            counters["float"] += 1
            continue
        qmax = ATTENTION_QMAX
        out_dtype = tensor_val(node).dtype
        if recipe.act.dynamic:
            parts = []
            with gm.graph.inserting_before(node):
                for t in (q, k, v):
                    pair = gm.graph.call_function(ops.QUANTIZE_ABSMAX, (t, qmax))
                    parts.append((gm.graph.call_function(operator.getitem, (pair, 0)),
                                  gm.graph.call_function(operator.getitem, (pair, 1))))
            counters["dynamic"] += 1
        else:
            grid = activation_spec(ctx)  # what calibrate-qparams computed the sites on
            scales = [_symmetric_scale(calib.get(f"{site}:{p}"), grid, qmax) for p in "qkv"]
            if any(s is None for s in scales):
                rec.reason = "no calibration data reached this attention's inputs"
                counters["float"] += 1
                continue
            parts = []
            for t, s in zip((q, k, v), scales):
                with gm.graph.inserting_before(node):
                    tq = gm.graph.call_function(ops.QUANTIZE, (t, s, 0, -qmax - 1, qmax))
                ann.put(tq, ann.QParams(s, 0))
                parts.append((tq, add_constant(gm, f"{site}_scale", torch.tensor(s), before=node)))
            counters["static"] += 1
        (qq, qs), (kq, ks), (vq, vs) = parts
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                ops.ATTENTION_INT8,
                (qq, kq, vq, qs, ks, vs, kw["attn_mask"], kw["is_causal"], kw["scale"],
                 out_dtype))
        ann.put(new, ann.Layer(site))
        ann.put(new, ann.LayerOutput(site))
        ann.copy(node, new, ann.Sites)  # the same value, for a linear reading it directly
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rec.quantized, rec.kernel, rec.reason = True, "attention_int8", ""
    modified = counters["static"] + counters["dynamic"] > 0
    return PassResult(gm, modified=modified, counters={k: v for k, v in counters.items() if v})

