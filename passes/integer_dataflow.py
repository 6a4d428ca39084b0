"""integer-dataflow: int8 values flow from integer op to integer op without float trips.

What, for integer-only recipes after rewrite-linear:
1. residual adds: add(dequantize(yq) [layout ops], b) where b is also held as int8 (it is
   quantized for a linear, or it is another integer op's dequantized output) and
   calibration observed the sum ("add:<layer>") becomes dequantize(add_int8(yq, b_int8)):
   each side rescaled dyadically to the sum's scale, one rounding.
2. round trips: quantize(dequantize(yq) [layout ops]) becomes the layout ops applied to
   yq itself (same scale and zero point: the identity on integers), followed by
   requant_int8 (another scale: a dyadic rescale, integer-only) otherwise. A rescale of
   a linear's or convolution's output that nothing else reads folds into that op's own
   requantization (one rounding).
3. float outputs: a linear whose int8 output now only feeds dequantize (a float island:
   residual add, GELU, norm) becomes linear_int8_dq: its int32 accumulator is dequantized
   directly, so no requantization error is paid for an integer consumer that does not
   exist. (Outlier channels of BERT-style residual writers made this worth 0.05-0.1 of
   embedding cosine on all-MiniLM-L6-v2.)
4. attention outputs: an attention whose float32 output only a static quantize reads
   (through the heads' transpose and reshape) becomes attention_int8_q, which stores the
   int8 codes itself, token-major, so the reshape is a view.
Residual adds are made integer only when their sum flows on into integer ops; a sum that
enters a float norm is added in float.
Layout ops (view, reshape, transpose, permute, split items, ...) move values without
changing them, so they run on int8 tensors as well as on floats.
Why: every dequantize/quantize pair costs a float round trip (and in general a rounding);
integer-only inference keeps values as integers between integer ops.
Pre: rewrite-linear. Post: no quantize reads a dequantize (through layout ops) with equal
parameters; float islands (norms, softmax, GELU, anything unrecognized) still dequantize
on entry and quantize on exit.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, erase_unused, is_call
from qcompile.lowering import conv_ops, ops
from qcompile.lowering.registry import arg, set_arg
from qcompile.numerics.specs import QuantSpec, compute_qparams
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._activations import Clamp, fused_activation
from qcompile.passes.rewrite_linear import ACT as ACT_RANGE
from qcompile.sites import is_layout


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(d) for d in v]


def _max_pool_args(node: Node) -> tuple | None:
    """(kernel, stride, padding, dilation, ceil_mode) of an F.max_pool2d without indices,
    else None."""
    if not is_call(node, F.max_pool2d):
        return None
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")
    a = dict(zip(names, node.args)) | dict(node.kwargs)
    if a.get("return_indices", False):
        return None
    kernel = _pair(a["kernel_size"])
    stride = a.get("stride")
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    return (kernel, stride, _pair(a.get("padding", 0)), _pair(a.get("dilation", 1)),
            bool(a.get("ceil_mode", False)))


def _moves_values(node) -> bool:
    """Layout ops and max pooling: every output element is one of the input's, so int8
    values and their scale pass through unchanged."""
    return is_layout(node) or _max_pool_args(node) is not None


def _dequant_through_layout(node) -> tuple[Node, list[Node]] | None:
    """(dequantize node, chain of value-moving ops from it down to `node`) or None."""
    chain: list[Node] = []
    while isinstance(node, Node) and _moves_values(node):
        chain.append(node)
        node = node.args[0]
    if isinstance(node, Node) and node.target is ops.DEQUANTIZE:
        return node, chain[::-1]
    return None


def _last(gm: GraphModule, nodes: list[Node]) -> Node:
    """The node of `nodes` that comes last in the graph (a new op reading them all goes
    after it: a view's symbolic sizes may be computed after the tensor it views)."""
    wanted = set(nodes)
    last = nodes[0]
    for n in gm.graph.nodes:
        if n in wanted:
            last = n
    return last


def _replay(gm: GraphModule, chain: list[Node], source: Node, before: Node) -> Node:
    """Apply the same layout ops (max pooling as its int8 op) to `source` (int8), each
    right after its input, reusing an identical op already made for another reader (so a
    max pooling read by a block and its shortcut runs once)."""
    out = source
    for op in chain:
        pool = _max_pool_args(op)
        if pool is not None:
            target, args, kwargs = conv_ops.MAX_POOL2D_INT8, (out, *pool), {}
        else:
            target, args, kwargs = op.target, (out, *op.args[1:]), dict(op.kwargs)
        same = next((u for u in out.users if u.op == op.op and u.target == target
                     and u.args == args and u.kwargs == kwargs), None)
        if same is None:
            with gm.graph.inserting_after(_last(gm, [out, *op.all_input_nodes])):
                same = gm.graph.create_node(op.op, target, args, kwargs)
        out = same
    return out


def _existing_quantize(node: Node) -> Node | None:
    return next((u for u in node.users if u.target is ops.QUANTIZE), None)


def _feeds_integers(node: Node) -> bool:
    """Whether some consumer (through layout ops) quantizes this value again."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.target is ops.QUANTIZE:
            return True
        # pooled, concatenated or tabled in integers (_round_trips) on the way
        if (_moves_values(user) or _avg_pool_args(user) is not None
                or is_call(user, torch.cat, torch.concat, torch.concatenate, *_ELEMENTWISE)):
            todo += list(user.users)
    return False


def _dequant_qparams(dq: Node) -> ann.QParams:
    return ann.QParams(arg(dq, "scale"), arg(dq, "zero_point"))


def _int8_of(gm: GraphModule, value, before: Node) -> tuple[Node, ann.QParams] | None:
    """(an int8 node holding `value`, its QParams), or None: the value's own quantize
    node, or the integer output a dequantize (through layout ops) came from."""
    if not isinstance(value, Node):
        return None
    found = _dequant_through_layout(value)
    if found is not None:
        dq, chain = found
        return _replay(gm, chain, arg(dq, "q"), before), _dequant_qparams(dq)
    q = _existing_quantize(value)
    return (q, ann.get(q, ann.QParams)) if q is not None else None


def _add_site(node: Node) -> tuple[Node, Clamp | None] | None:
    """(the node holding a residual add's observed sum, the ReLU it absorbs or None)."""
    if not is_call(node, operator.add, torch.add):
        return None
    if ann.site(node, "add") is not None:
        return node, None
    act = fused_activation(node)
    if act is not None and ann.site(act.node, "add") is not None:
        return act.node, act  # observed after the ReLU: add_int8 clamps instead
    return None


def _residual_adds(gm: GraphModule, ctx: PassContext) -> int:
    calib = ctx.analysis.get("calib", {})
    done = 0
    for node in list(gm.graph.nodes):
        found_site = _add_site(node)
        if found_site is None:
            continue
        at, act = found_site
        if not _feeds_integers(at):
            continue  # the sum enters a float island (a norm): adding in float loses nothing
        out = calib.get(ann.site(at, "add"))
        if out is None or out.scale is None:
            continue
        for i in (0, 1):
            found = _dequant_through_layout(node.args[i])
            other = _int8_of(gm, node.args[1 - i], node)
            if found is None or other is None:
                continue
            dq, chain = found
            aq = _replay(gm, chain, arg(dq, "q"), node)
            bq, b_qp = other
            a_qp = _dequant_qparams(dq)
            qmin, qmax = ACT_RANGE[ctx.options.recipe_obj.act.bits]
            if act is not None:
                qmin, qmax = act.bounds(out.scale, out.zero_point, qmin, qmax)
            with gm.graph.inserting_before(node):
                # (qa, sa, qb, sb) = (0, 1, 0, 1) until compute-dyadic
                yq = gm.graph.call_function(
                    ops.ADD_INT8, (aq, bq, a_qp.zero_point, b_qp.zero_point, 0, 1, 0, 1,
                                   out.zero_point, qmin, qmax))
                y = gm.graph.call_function(ops.DEQUANTIZE, (yq, out.scale, out.zero_point,
                                                            node.meta["val"].dtype))
            # the float value's shape stands until the pass manager re-derives it (a pooling
            # later in this pass reads it)
            y.meta["val"] = node.meta.get("val")
            ann.put(yq, ann.PendingRequant((a_qp.scale / out.scale, b_qp.scale / out.scale)))
            ann.put(yq, ann.QParams(out.scale, out.zero_point))
            if act is not None:
                ann.copy(act.node, y, ann.Sites)
                act.node.replace_all_uses_with(y)
                gm.graph.erase_node(act.node)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            done += 1
            break
    return done


def _avg_pool_args(node) -> tuple[list[int], list[int], bool] | None:
    """(kernel, stride, keeps the pooled dims) of an average pooling whose windows are all
    full and whose size is known at compile time, else None: adaptive_avg_pool2d to 1 x 1
    and mean over the last two dims (global), avg_pool2d without padding or ceil mode."""
    x = node.args[0] if isinstance(node, Node) and node.args else None
    val = x.meta.get("val") if isinstance(x, Node) else None
    if val is None or val.dim() != 4:
        return None
    h, w = val.shape[2:]
    static = isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0
    if is_call(node, F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if static and size in (1, (1, 1), [1, 1]):
            return [h, w], [h, w], True
        return None
    if is_call(node, torch.mean) or (node.op == "call_method" and node.target == "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        dims = sorted(d % 4 for d in dims) if isinstance(dims, (list, tuple)) else None
        return ([h, w], [h, w], keep) if static and dims == [2, 3] else None
    if is_call(node, F.avg_pool2d, torch._C._nn.avg_pool2d):
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode",
                 "count_include_pad", "divisor_override")
        a = dict(zip(names, node.args)) | dict(node.kwargs)
        if _pair(a.get("padding", 0)) != [0, 0] or a.get("ceil_mode", False) or a.get(
                "divisor_override") is not None:
            return None
        kernel = _pair(a["kernel_size"])
        stride = a.get("stride")
        stride = kernel if stride in (None, [], ()) else _pair(stride)
        return kernel, stride, True
    return None


def _rescaled(gm: GraphModule, ints: Node, qp_in: ann.QParams, qp_out: ann.QParams,
              qmin: int, qmax: int, before: Node) -> Node:
    """ints (at qp_in) as int8 at qp_out: itself, or requant_int8 (integer-only)."""
    if qp_in == qp_out:
        return ints
    with gm.graph.inserting_before(before):
        # (q, shift) = (0, 1) until compute-dyadic
        out = gm.graph.call_function(ops.REQUANT_INT8, (ints, qp_in.zero_point, 0, 1,
                                                        qp_out.zero_point, qmin, qmax))
    ann.put(out, ann.PendingRequant((qp_in.scale / qp_out.scale,)))
    ann.put(out, qp_out)
    return out


# element-wise functions an int8 value may go through as a table (lut_int8): unary, or
# with constant arguments only
_ELEMENTWISE = (F.hardswish, F.hardsigmoid, F.silu, F.mish, F.gelu, F.elu, F.selu, F.celu,
                F.leaky_relu, F.softplus, F.relu6, F.hardtanh, F.relu, torch.relu,
                torch.sigmoid, torch.tanh, F.sigmoid, F.tanh)
# an int8 value a linear made keeps the float-island rule (its accumulator is dequantized
# for a float activation: more precise, and what the transformer recipes are tuned on)
_LINEARS = (ops.LINEAR_INT8, ops.LINEAR_W4A8, ops.LINEAR_W4A8_GROUPED, ops.LINEAR_A16W8)
_CATS = (torch.cat, torch.concat, torch.concatenate)


class _Int8Builder:
    """Builds, for a float value, an int8 node holding it at given quantization parameters
    (or at its own, `qp=None`), from integer ops only; None where some part of it has no
    integer form. Each rule is exact or rounds once, like the float path's quantize:
      dequantize(yq)              yq, rescaled (requant_int8)
      layout ops, max pooling     the same op on the int8 value (each output is an input)
      cat(parts)                  each part at the target parameters, concatenated
      average pooling             avg_pool2d_int8: window sums, one requantization
      f(v), f element-wise        lut_int8: f's 256 outputs, computed with f itself
    Nothing is built until the whole value is known to have an integer form (`plan`
    first), so a failed attempt leaves the graph unchanged."""

    def __init__(self, gm: GraphModule, qmin: int, qmax: int, before: Node):
        self.gm, self.qmin, self.qmax, self.before = gm, qmin, qmax, before

    def natural(self, v) -> ann.QParams | None:
        """The parameters v is built at when nothing asks for others: its own where it is a
        dequantized int8 value; for a table, those covering exactly f's 256 outputs; for a
        concatenation, those covering its parts' ranges; an average pooling's input's.
        (A pooling's input is built at these, never at the pooled value's narrower
        observed range, which would clip it.) None: no integer form."""
        found = _dequant_through_layout(v)
        if found is not None:
            return _dequant_qparams(found[0])
        if not isinstance(v, Node):
            return None
        if is_layout(v) or _max_pool_args(v) is not None or _avg_pool_args(v) is not None:
            return self.natural(v.args[0])
        if is_call(v, *_CATS):
            parts = self._parts(v)
            ranges = [self._range(self.natural(p)) for p in parts or ()]
            if not parts or None in ranges:
                return None
            return self._covering(min(r[0] for r in ranges), max(r[1] for r in ranges))
        if self._table_input(v) is not None:  # f over the codes its input can hold
            y = self._table_values(v)[self.qmin + 128:self.qmax + 129]
            return self._covering(float(y.min()), float(y.max()))
        return None

    def _range(self, qp: ann.QParams | None) -> tuple[float, float] | None:
        if qp is None:
            return None
        return ((self.qmin - qp.zero_point) * qp.scale, (self.qmax - qp.zero_point) * qp.scale)

    def _covering(self, lo: float, hi: float) -> ann.QParams:
        spec = QuantSpec(bits=8, symmetric=False)
        if (self.qmin, self.qmax) != (spec.qmin, spec.qmax):
            spec = QuantSpec(bits=4, symmetric=False)
        scale, zp = compute_qparams(lo, hi, spec)
        return ann.QParams(float(scale), int(zp))

    @staticmethod
    def _parts(v: Node):
        parts = v.args[0] if v.args else v.kwargs.get("tensors")
        return parts if isinstance(parts, (list, tuple)) else None

    def _table_input(self, v: Node) -> ann.QParams | None:
        """An element-wise f of a value with integer parameters of its own: those."""
        if not is_call(v, *_ELEMENTWISE) or any(
                isinstance(a, Node) for a in (*v.args[1:], *v.kwargs.values())):
            return None
        found = _dequant_through_layout(v.args[0])
        if found is not None and arg(found[0], "q").target in _LINEARS:
            return None
        return self.natural(v.args[0])

    def _table_values(self, v: Node) -> torch.Tensor:
        """f of the 256 codes of its input, computed with f itself in float32."""
        qp_in = self._table_input(v)
        codes = torch.arange(-128, 128, dtype=torch.int8)  # lut_int8 indexes x + 128
        x = ops.dequantize(codes, qp_in.scale, qp_in.zero_point, torch.float32,
                           impl="reference")
        return v.target(x, *v.args[1:], **{k: a for k, a in v.kwargs.items()
                                           if k != "inplace"})

    def possible(self, v, qp: ann.QParams | None) -> bool:
        if _dequant_through_layout(v) is not None:
            return True
        if not isinstance(v, Node):
            return False
        if is_layout(v) or _max_pool_args(v) is not None:
            return self.possible(v.args[0], qp)
        if _avg_pool_args(v) is not None:
            return self.possible(v.args[0], self.natural(v.args[0]))
        if is_call(v, *_CATS):
            parts = self._parts(v)
            qp = qp or self.natural(v)
            return qp is not None and parts is not None and all(
                self.possible(p, qp) for p in parts)
        if self._table_input(v) is not None:
            return self.possible(v.args[0], None)
        return False

    def build(self, v: Node, qp: ann.QParams | None) -> tuple[Node, ann.QParams]:
        gm, before = self.gm, self.before
        found = _dequant_through_layout(v)
        if found is not None:
            dq, chain = found
            ints, qp_in = _replay(gm, chain, arg(dq, "q"), before), _dequant_qparams(dq)
            if qp is None:
                return ints, qp_in
            return _rescaled(gm, ints, qp_in, qp, self.qmin, self.qmax, before), qp
        if is_layout(v) or _max_pool_args(v) is not None:
            inner, qp = self.build(v.args[0], qp)
            return _replay(gm, [v], inner, before), qp
        pool = _avg_pool_args(v)
        if pool is not None:
            kernel, stride, keep = pool
            inner, qp_in = self.build(v.args[0], self.natural(v.args[0]))
            qp = qp or qp_in
            with gm.graph.inserting_before(before):
                out = gm.graph.call_function(conv_ops.AVG_POOL2D_INT8, (
                    inner, qp_in.zero_point, 0, 1, qp.zero_point, self.qmin, self.qmax,
                    kernel, stride))
                ann.put(out, ann.PendingRequant((qp_in.scale / (qp.scale * kernel[0]
                                                                 * kernel[1]),)))
                ann.put(out, qp)
                if not keep:  # mean over (2, 3) without keepdim: [B, C, 1, 1] -> [B, C]
                    out = gm.graph.call_method("flatten", (out, 1))
            return out, qp
        if is_call(v, *_CATS):
            qp = qp or self.natural(v)
            dim = v.args[1] if len(v.args) > 1 else v.kwargs.get("dim", 0)
            ints = [self.build(p, qp)[0] for p in self._parts(v)]
            with gm.graph.inserting_before(before):
                return gm.graph.call_function(torch.cat, (ints, dim)), qp
        # element-wise: the table of f from the input's own parameters to qp
        qp = qp or self.natural(v)
        inner, _ = self.build(v.args[0], None)
        table = ops.quantize(self._table_values(v), qp.scale, qp.zero_point, self.qmin,
                             self.qmax, impl="reference")
        table_node = add_constant(gm, f"{v.name}_table", table, before=before)
        with gm.graph.inserting_before(before):
            out = gm.graph.call_function(conv_ops.LUT_INT8, (inner, table_node))
        ann.put(out, qp)
        return out, qp


def _round_trips(gm: GraphModule, ctx: PassContext) -> int:
    """quantize(v) where v has an integer form (_Int8Builder) -> that form. The float ops
    left between int8 values are said in one note (nothing runs in float silently)."""
    done, islands = 0, {}
    for node in list(gm.graph.nodes):
        if node.target is not ops.QUANTIZE:
            continue
        builder = _Int8Builder(gm, arg(node, "qmin"), arg(node, "qmax"), node)
        qp = ann.QParams(arg(node, "scale"), arg(node, "zero_point"))
        if not builder.possible(node.args[0], qp):
            island = _island_ops(node)
            if island:
                key = " -> ".join(dict.fromkeys(island))
                islands[key] = islands.get(key, 0) + 1
            continue
        ints, _ = builder.build(node.args[0], qp)
        node.replace_all_uses_with(ints)
        gm.graph.erase_node(node)
        done += 1
    if islands:
        ctx.note("integer-dataflow: float between int8 values (no integer form): " + "; ".join(
            f"{ops_} (x{n})" for ops_, n in islands.items()))
    return done


def _merge_identical_rescales(gm: GraphModule) -> None:
    """requant_int8 calls with the same input and parameters (a value read several times
    at one scale: q = k = v of one projection) become one."""
    seen: dict = {}
    for node in list(gm.graph.nodes):
        pending = ann.get(node, ann.PendingRequant)
        if node.target is not ops.REQUANT_INT8 or pending is None:
            continue
        key = (node.args, tuple(node.kwargs.items()), pending.multipliers,
               ann.get(node, ann.QParams))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)


def _sole_source(node: Node, targets: tuple) -> Node | None:
    """The op (one of `targets`) whose output only `node` reads, through layout ops that
    only pass it on; else None."""
    src = node.args[0]
    while isinstance(src, Node) and is_layout(src) and len(src.users) == 1:
        src = src.args[0]
    if isinstance(src, Node) and src.target in targets and len(src.users) == 1:
        return src
    return None


def _fold_rescales(gm: GraphModule) -> int:
    """requant_int8 of a requantizing op's output (through layout ops), where nothing else
    reads that output: the op requantizes to the rescale's parameters itself, one rounding
    instead of two (q, k and v of an int8 attention: the linear's calibrated grid, then
    the attention's symmetric one). Ops with a fused activation clamp (a range narrower
    than the rescale's) keep their rescale."""
    _merge_identical_rescales(gm)
    done = 0
    for node in list(gm.graph.nodes):
        src = _sole_source(node, ops.REQUANT_OPS) if node.target is ops.REQUANT_INT8 else None
        if src is None:
            continue
        pending = ann.get(src, ann.PendingRequant)
        rescale = ann.get(node, ann.PendingRequant)
        if (pending is None or rescale is None
                or arg(src, "out_zp") != arg(node, "in_zp")
                or (arg(src, "qmin"), arg(src, "qmax")) != (arg(node, "qmin"),
                                                            arg(node, "qmax"))):
            continue
        (ratio,) = rescale.multipliers
        for name in ("out_zp", "qmin", "qmax"):
            set_arg(src, name, arg(node, name))
        ann.put(src, ann.PendingRequant((pending.multipliers[0] * ratio,)))
        ann.put(src, ann.get(node, ann.QParams))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        done += 1
    return done


def _island_ops(node: Node, depth: int = 8) -> list[str] | None:
    """The float ops between the dequantized int8 values above `node` and `node` (a few
    levels up), or None where no int8 value is above it (the model's float input)."""
    ops_seen, found, level, seen = [], False, [node], set()
    for _ in range(depth):
        nxt = []
        for n in level:
            for up in n.all_input_nodes:
                if up in seen:
                    continue
                seen.add(up)
                if up.target is ops.DEQUANTIZE:
                    found = True
                elif up.op in ("call_function", "call_method"):
                    ops_seen.append(getattr(up.target, "__name__", str(up.target)))
                    nxt.append(up)
        level = nxt
    return ops_seen[::-1] if found else None


def _quantized_attention_outputs(gm: GraphModule) -> int:
    """A static quantize that is the only reader of an attention's float32 output (through
    layout ops: the heads' transpose and reshape for the output projection) moves into the
    attention: attention_int8_q stores int8 codes where attention_int8 stored float32 that
    the quantize read back (the same values, the same rounding), and the layout ops run on
    the codes."""
    done = 0
    for node in list(gm.graph.nodes):
        src = _sole_source(node, (ops.ATTENTION_INT8,)) if node.target is ops.QUANTIZE else None
        if src is None or arg(src, "out_dtype") != torch.float32:
            continue
        with gm.graph.inserting_before(src):
            new = gm.graph.call_function(ops.ATTENTION_INT8_Q, (
                *(arg(src, p) for p in ops.attention_int8.params if p != "out_dtype"),
                *(arg(node, p) for p in ("scale", "zero_point", "qmin", "qmax"))))
        new.meta.update(src.meta)
        ann.copy(src, new, ann.Layer, ann.LayerOutput, ann.Sites)
        src.replace_all_uses_with(new)
        gm.graph.erase_node(src)
        ann.copy(node, node.args[0], ann.QParams)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        done += 1
    return done


def _float_outputs(gm: GraphModule) -> int:
    """Linears whose int8 output only feeds float islands: dequantize the accumulator."""
    done = 0
    for node in list(gm.graph.nodes):
        epi = ann.get(node, ann.FloatEpilogue)
        if node.target not in ops.REQUANT_OPS or epi is None:
            continue
        if not node.users or any(u.target is not ops.DEQUANTIZE for u in node.users):
            continue
        x, w = arg(node, "x"), arg(node, "w")
        layer = ann.get(node, ann.Layer)
        name = (layer.name if layer else node.name).replace(".", "_")
        if epi.w_int8 is not None:  # int4 weights: the int8 GEMM runs on their int8 values
            w = add_constant(gm, f"{name}_w_unpacked", epi.w_int8, before=node)
        ws = add_constant(gm, f"{name}_w_scale", epi.w_scale, before=node)
        b = (add_constant(gm, f"{name}_bias_f", epi.bias, before=node)
             if epi.bias is not None else None)
        for dq in list(node.users):
            with gm.graph.inserting_before(dq):
                if node.target is conv_ops.CONV2D_INT8:
                    geometry = [arg(node, k) for k in ("stride", "padding", "dilation",
                                                       "groups")]
                    y = gm.graph.call_function(conv_ops.CONV2D_INT8_DQ, (
                        x, w, b, arg(node, "in_zp"), epi.x_scale, ws, arg(dq, "dtype"),
                        *geometry))
                elif node.target is ops.LINEAR_A16W8:
                    y = gm.graph.call_function(ops.LINEAR_A16W8_DQ, (
                        x, w, b, epi.x_scale, ws, arg(dq, "dtype")))
                else:
                    y = gm.graph.call_function(ops.LINEAR_INT8_DQ, (
                        x, w, b, arg(node, "zp_term"), epi.x_scale, ws, arg(dq, "dtype")))
                if epi.clamp is not None:  # the activation its clamp stood for, in float
                    lo, hi = epi.clamp
                    out = gm.graph.call_function(torch.clamp, (y, lo, hi))
            final = y
            if epi.clamp is not None:
                final = out
                ann.copy(dq, out, ann.Sites)
            ann.copy(node, y, ann.Layer)
            ann.copy(dq, final, ann.LayerOutput)
            dq.replace_all_uses_with(final)
            gm.graph.erase_node(dq)
        gm.graph.erase_node(node)
        done += 1
    return done


@graph_pass("integer-dataflow", requires=("rewrite-linear",))
def integer_dataflow(gm: GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.options.recipe_obj
    if recipe.requant != "dyadic":
        return PassResult(gm, False, {})
    counters = {"residual_adds": _residual_adds(gm, ctx), "round_trips_removed": 0}
    counters["round_trips_removed"] = _round_trips(gm, ctx)
    erase_unused(gm)  # the float reads of what round trips replaced
    counters["rescales_folded"] = _fold_rescales(gm)
    counters["float_outputs"] = _float_outputs(gm)
    counters["attention_outputs_quantized"] = _quantized_attention_outputs(gm)
    erase_unused(gm)
    return PassResult(gm, modified=any(counters.values()), counters=counters)
