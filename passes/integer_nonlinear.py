"""integer-nonlinear: GELU, LayerNorm and the attention softmax become integer-only ops.

What (integer-only recipes, options["integer_nonlinear"]), after I-BERT (Kim et al.,
"I-BERT: Integer-only BERT Quantization", ICML 2021; ops in lowering/int_ops.py):
1. GELU: F.gelu (exact or approximate="tanh") or GPT-2's spelled-out tanh form
   0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x**3))), reading dequantize(yq) and
   quantized for a linear, becomes dequantize(gelu_int8(yq)) at that linear's input
   scale (i-GELU approximates the exact GELU; the tanh form differs from it by < 1e-3).
2. LayerNorm: F.layer_norm over the last dim whose output is quantized for a linear.
   a. Post-norm block end, LayerNorm(dequantize(linear_int8(x)) + r) with r int8 (BERT):
      linear_residual_layernorm_int8 takes the GEMM's int32 accumulator and r to a common
      scale 2**-e finer than the sum's calibrated int8 scale (I-BERT adds residuals in
      int32): rounding the linear's output and the sum to int8 costs all-MiniLM-L6-v2
      ~0.1 of embedding cosine, this costs ~0.005.
   b. Otherwise, an int8 input at a known scale (dequantize(yq), an activation already
      quantized, or a residual add that calibration observed: integer-dataflow makes it
      add_int8) becomes dequantize(layernorm_int8(quantize(x))).
   Both: integer mean and variance, i-sqrt, gamma and beta as integers, one rounding to
   the consumer's scale.
3. Softmax: attention_int8 becomes attention_int8_isoftmax (same arguments): i-exp on
   the integer logits, 16-bit probabilities, integer P V.
Each replacement ends in a dequantize at exactly the scale its consumers quantize to, so
integer-dataflow (next) removes the quantize(dequantize(...)) pairs: the int8 values flow
from op to op. Before it runs the graph still computes correctly (float round trips).
Why: integer-only inference (no float unit) needs the non-linear islands in integers;
the report and bench/integer_nonlinear_error.py measure what that costs against float.
Stays in float, with the reason in ctx.note: an island whose input scale is unknown
(e.g. BERT's embedding LayerNorm), whose output feeds no quantized linear (the final
LayerNorm), a norm over several dims or with non-constant affine / eps.
Pre: rewrite-linear, rewrite-attention; integer-dataflow after it. Post: the matched
islands read and write int8 through the new ops; counters gelu / layernorm (of which
residual_layernorm fused) / softmax / float.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, get_constant, is_call, is_method, tensor_val
from qcompile.lowering import int_ops, ops, registry
from qcompile.numerics import ibert
from qcompile.numerics.dyadic import MultiplierRangeError
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.sites import is_layout, producer_through_layout

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------- matching helpers


def _mul_by(gm, ctx, node, value: float) -> Node | None:
    """x for node = value * x (either order; value known at compile time), else None."""
    if not is_call(node, operator.mul, torch.mul):
        return None
    a, b = node.args[:2]
    for c, x in ((a, b), (b, a)):
        c = _compile_time_float(gm, ctx, c) if isinstance(c, Node) else c
        if isinstance(c, (int, float)) and math.isclose(c, value, rel_tol=1e-6):
            return x if isinstance(x, Node) else None
    return None


def _tanh_gelu_input(gm, ctx, node) -> Node | None:
    """x for GPT-2's 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3))) ending at node."""
    if not is_call(node, operator.mul, torch.mul):
        return None
    for half, rest in (node.args[:2], node.args[1::-1]):
        x = _mul_by(gm, ctx, half, 0.5)
        if x is None or not is_call(rest, operator.add, torch.add):
            continue
        tanh = next((a for a in rest.args if is_call(a, torch.tanh)), None)
        if tanh is None or 1.0 not in rest.args:
            continue
        inner = _mul_by(gm, ctx, tanh.args[0], _SQRT_2_OVER_PI)
        if not is_call(inner, operator.add, torch.add) or x not in inner.args:
            continue
        cube = _mul_by(gm, ctx, inner.args[1] if inner.args[0] is x else inner.args[0],
                       0.044715)
        if is_call(cube, torch.pow, operator.pow) and cube.args[0] is x and cube.args[1] == 3:
            return x
    return None


def _gelu_input(gm, ctx, node) -> Node | None:
    if is_call(node, F.gelu):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return node.args[0] if approx in ("none", "tanh") else None
    return _tanh_gelu_input(gm, ctx, node)


def _output_quantize(node: Node) -> Node | None:
    """The quantize a linear reads node's value through (rewrite-linear made one), directly
    or through layout ops (GPT-2's Conv1D views its input)."""
    todo = list(node.users)
    while todo:
        user = todo.pop(0)
        if user.target is ops.QUANTIZE:
            return user
        if is_layout(user):
            todo.extend(user.users)
    return None


def _consumers(node: Node) -> list[str]:
    q = _output_quantize(node)
    layers = [ann.get(u, ann.Layer) for u in q.users] if q else []
    return [layer.name for layer in layers if layer is not None]


def _qparams(node: Node) -> ann.QParams:
    """The (scale, zero point) a quantize or dequantize call applies."""
    return ann.QParams(registry.arg(node, "scale"), registry.arg(node, "zero_point"))


def _bounds(q: Node) -> tuple[int, int]:
    return registry.arg(q, "qmin"), registry.arg(q, "qmax")


def _int8_input(gm, ctx, x) -> tuple[Node, float, int] | None:
    """(int8 node, scale, zero point) carrying x, or None where no scale is known.

    x = dequantize(yq) gives yq itself. Otherwise a quantize at the scale x is known to
    have is put on x: a dequantize behind layout ops, or a residual add that calibration
    observed (integer-dataflow turns it into add_int8 at that very scale); integer-dataflow
    then removes the quantize(dequantize(...)) it makes."""
    if not isinstance(x, Node):
        return None
    if x.target is ops.DEQUANTIZE:
        qp = _qparams(x)
        return registry.arg(x, "q"), qp.scale, qp.zero_point
    src = producer_through_layout(x)
    if src.target is ops.DEQUANTIZE:
        qp = _qparams(src)
    else:
        existing = next((u for u in x.users if u.target is ops.QUANTIZE), None)
        if existing is not None:
            qp = _qparams(existing)
            return existing, qp.scale, qp.zero_point
        site = ctx.analysis.get("calib", {}).get(ann.site(x, "add"))
        if site is None or site.scale is None:
            return None
        qp = ann.QParams(site.scale, site.zero_point)
    qmin, qmax = _act_range(ctx)
    with gm.graph.inserting_after(x):  # erased again, unused, if the rewrite gives up
        q = gm.graph.call_function(ops.QUANTIZE, (x, qp.scale, qp.zero_point, qmin, qmax))
    ann.put(q, qp)
    return q, qp.scale, qp.zero_point


def _act_range(ctx) -> tuple[int, int]:
    bits = ctx.options.recipe_obj.act.bits
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


_SCALAR_OPS = {operator.truediv: operator.truediv, operator.mul: operator.mul,
               operator.add: operator.add, operator.sub: operator.sub,
               operator.pow: operator.pow, operator.neg: operator.neg, math.sqrt: math.sqrt,
               torch._sym_sqrt: math.sqrt}


def _compile_time_float(gm, ctx, arg, depth: int = 0) -> float | None:
    """A scalar known at compile time: a literal, a constant, (for floats Dynamo turns into
    graph inputs, like LayerNorm's eps or math.pi) its value in the sample inputs, or
    scalar arithmetic on those (GPT-2's sqrt(2 / math.pi) under dynamic shapes)."""
    if isinstance(arg, (int, float)):
        return float(arg)
    if depth < 8 and isinstance(arg, Node) and arg.op == "call_function" and (
            arg.target in _SCALAR_OPS):
        vals = [_compile_time_float(gm, ctx, a, depth + 1) for a in arg.args]
        return None if None in vals else float(_SCALAR_OPS[arg.target](*vals))
    if is_method(arg, "item"):
        arg = arg.args[0]
    const = get_constant(gm, arg)
    if const is not None and const.numel() == 1:
        return float(const)
    if isinstance(arg, Node) and arg.op == "placeholder":
        sample = ctx.analysis.get("sample_inputs")
        idx = [n for n in gm.graph.nodes if n.op == "placeholder"].index(arg)
        value = sample[idx] if sample is not None and idx < len(sample) else None
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor)
                                                and value.numel() == 1):
            return float(value)
    return None


def _replace(gm, node, target, args, out_q: Node) -> Node:
    """node -> dequantize(target(*args)) at out_q's scale, so integer-dataflow can drop
    out_q's float round trip."""
    out = _qparams(out_q)
    with gm.graph.inserting_before(node):
        yq = gm.graph.call_function(target, args)
        y = gm.graph.call_function(ops.DEQUANTIZE, (yq, out.scale, out.zero_point,
                                                    tensor_val(node).dtype))
    ann.put(yq, out)
    y.meta["val"] = node.meta["val"]  # same shape and dtype; later matches in this pass read it
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)
    return yq


# ---------------------------------------------------------------- rewrites


def _rewrite_gelu(gm, ctx, node) -> str | None:
    """None on success, else why the GELU stays in float."""
    out_q = _output_quantize(node)
    if out_q is None:
        return "its output is not quantized for a linear"
    found = _int8_input(gm, ctx, _gelu_input(gm, ctx, node))
    if found is None:
        return "its input has no int8 scale (not a quantized op's output)"
    xq, s_in, zp_in = found
    try:
        out = _qparams(out_q)
        p = ibert.gelu_params(s_in, zp_in, out.scale, out.zero_point, *_bounds(out_q),
                              in_range=_act_range(ctx))
    except MultiplierRangeError as exc:
        return f"requantization out of range: {exc}"
    _replace(gm, node, int_ops.GELU_INT8, (xq, *p), out_q)
    return None


def _rewrite_layernorm(gm, ctx, node, counters: dict) -> str | None:
    x, shape, w, b, eps = node.args
    val = tensor_val(x)
    if isinstance(shape, Node):  # x.shape[-1:] under dynamic shapes: its value is the size
        shape = shape.meta.get("val")
    # normalized_shape names the last len(shape) dims of x (PyTorch checks the sizes)
    if val is None or not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return "LayerNorm over more than the last dim"
    out_q = _output_quantize(node)
    if out_q is None:
        return "its output is not quantized for a linear"
    weight, bias = get_constant(gm, w), get_constant(gm, b)
    eps_value = _compile_time_float(gm, ctx, eps)
    if (w is not None and weight is None) or (b is not None and bias is None) or (
            eps_value is None):
        return "affine weights or eps not known at compile time"
    fused = _residual_linear(x)
    if fused is not None:
        why = _rewrite_residual_layernorm(gm, ctx, node, *fused, weight, bias, eps_value, out_q)
        if why is None:
            counters["residual_layernorm"] += 1
            return None
        ctx.note(f"integer-nonlinear: {node.name}: no fused residual LayerNorm ({why}); "
                 "the residual stream goes through int8")
    found = _int8_input(gm, ctx, x)
    if found is None:
        return "its input has no int8 scale (not a quantized op's output or an observed add)"
    xq, s_in, zp_in = found
    try:
        out = _qparams(out_q)
        p = ibert.layernorm_params(s_in, zp_in, int(shape[0]), weight, bias, eps_value,
                                   out.scale, out.zero_point, *_bounds(out_q),
                                   in_range=_act_range(ctx))
    except (ValueError, MultiplierRangeError) as exc:
        return str(exc)
    name = f"{node.name}_int"
    g = add_constant(gm, f"{name}_gamma", p.gamma, before=node)
    bt = add_constant(gm, f"{name}_beta", p.beta, before=node)
    _replace(gm, node, int_ops.LAYERNORM_INT8, (xq, g, bt, *p[2:]), out_q)
    return None


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = tensor_val(a), tensor_val(b)  # compared as text: no guards on symbolic sizes
    return va is not None and vb is not None and str(tuple(va.shape)) == str(tuple(vb.shape))


def _residual_linear(x) -> tuple[Node, Node] | None:
    """(linear_int8 node, residual) for x = dequantize(linear_int8(...)) + residual when
    nothing else reads the sum or the linear's output (BERT's post-norm block end)."""
    if not is_call(x, operator.add, torch.add) or len(x.args) != 2 or len(x.users) != 1:
        return None
    for a, r in (x.args, x.args[::-1]):
        if (isinstance(a, Node) and isinstance(r, Node) and a.target is ops.DEQUANTIZE
                and registry.arg(a, "q").target is ops.LINEAR_INT8 and len(a.users) == 1
                and len(registry.arg(a, "q").users) == 1 and _same_shape(a, r)):
            return registry.arg(a, "q"), r
    return None


def _channel_multipliers(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (q, shift) for an int32 accumulator; 0 for a channel whose multiplier
    underflows (a weight row of zeros)."""
    pairs = []
    for v in m.tolist():
        try:
            pairs.append(ibert.fit_multiplier(v, 1 << 31))
        except MultiplierRangeError:
            pairs.append((0, 1))
    return (torch.tensor([q for q, _ in pairs], dtype=torch.int64),
            torch.tensor([s for _, s in pairs], dtype=torch.int64))


def _rewrite_residual_layernorm(gm, ctx, node, lin, r, weight, bias, eps, out_q) -> str | None:
    """LayerNorm(dequantize(linear_int8(x)) + r) -> linear_residual_layernorm_int8: the
    sum is formed from the GEMM's int32 accumulator and r at a scale 2**-e finer than the
    sum's calibrated int8 scale (e as large as int64 allows, <= 8), clamped at 4x that
    range, as I-BERT's int32 residual; only the LayerNorm's output is int8."""
    pending = ann.get(lin, ann.PendingRequant)  # s_x s_w[c] / s_out, before compute-dyadic
    found = _int8_input(gm, ctx, r)
    if pending is None or found is None:
        return "residual or linear multiplier not known"
    (mult,) = pending.multipliers
    rq, s_r, zp_r = found
    s_lin = ann.get(lin, ann.QParams).scale
    site = ctx.analysis.get("calib", {}).get(ann.site(node.args[0], "add"))
    s_ref = site.scale if site is not None and site.scale else s_lin + s_r
    qmin, qmax = _bounds(out_q)
    out = _qparams(out_q)
    for e in range(8, -1, -1):
        bound, s_h = 1 << (9 + e), s_ref / 2**e
        try:
            p = ibert.layernorm_params(s_h, 0, mult.numel(), weight, bias, eps, out.scale,
                                       out.zero_point, qmin, qmax, in_range=(-bound, bound))
            r_q, r_shift = ibert.fit_multiplier(s_r / s_h, 255)
            break
        except (ValueError, MultiplierRangeError) as exc:
            why = str(exc)
    else:
        return why
    acc_q, acc_shift = _channel_multipliers(mult * s_lin / s_h)
    layer = ann.get(lin, ann.Layer)
    name = layer.name.replace(".", "_")
    consts = [add_constant(gm, f"{name}_{k}", v, before=node) for k, v in (
        ("acc_q", acc_q), ("acc_shift", acc_shift), ("ln_gamma", p.gamma), ("ln_beta", p.beta))]
    gemm = [registry.arg(lin, k) for k in ("x", "w", "bias", "zp_term")]
    args = (*gemm, consts[0], consts[1], rq, zp_r, r_q, r_shift, bound, consts[2], consts[3],
            *p[3:])
    fused = _replace(gm, node, int_ops.LINEAR_RESIDUAL_LAYERNORM_INT8, args, out_q)
    ann.put(fused, layer)  # lower records its kernel in the layer's report entry
    ctx.layer(layer.name, "linear").transforms.append("int-residual-layernorm")
    return None


@graph_pass("integer-nonlinear", requires=("rewrite-linear",))
def integer_nonlinear(gm: GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.options.recipe_obj
    if recipe.requant != "dyadic" or not ctx.options.transform_on("integer_nonlinear"):
        return PassResult(gm, False, {})
    counters = {"gelu": 0, "layernorm": 0, "residual_layernorm": 0, "softmax": 0, "float": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is ops.ATTENTION_INT8:
            node.target = int_ops.ATTENTION_INT8_ISOFTMAX
            ctx.layer(ann.get(node, ann.Layer).name, "attention").transforms.append(
                "int-softmax")
            counters["softmax"] += 1
            continue
        if is_call(node, F.layer_norm):
            kind, consumers = "layernorm", _consumers(node)
            why = _rewrite_layernorm(gm, ctx, node, counters)
        elif _gelu_input(gm, ctx, node) is not None:
            kind, consumers = "gelu", _consumers(node)
            why = _rewrite_gelu(gm, ctx, node)
        else:
            continue
        if why is None:
            counters[kind] += 1
            for layer in consumers:
                ctx.layer(layer, "linear").transforms.append(f"int-{kind}")
        else:
            counters["float"] += 1
            ctx.note(f"integer-nonlinear: {kind} {node.name} stays in float: {why}")
    for node in list(gm.graph.nodes):
        if node.target is ops.QUANTIZE and not node.users:  # inputs of rewrites given up
            gm.graph.erase_node(node)
    modified = counters["gelu"] + counters["layernorm"] + counters["softmax"] > 0
    if modified:
        gm.graph.eliminate_dead_code()  # GPT-2's spelled-out GELU leaves its pieces
    return PassResult(gm, modified=modified, counters=counters)
