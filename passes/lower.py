"""lower: every quantized op is bound to an implementation.

What: sets each qcompile op's `impl` argument: "triton" (generated Triton kernels) on
CUDA, "cpu" (torch._int_mm and integer epilogues) on CPU, or what options["kernels"]
asks for ("triton" on CPU runs the kernels in the Triton interpreter; "reference" is the
exact int64 simulation). On the CPU path the int8 weights are laid out K-major once, the
layout torch._int_mm is fastest with. The report records the kernel per layer.
Pre: rewrite-linear (and compute-dyadic for integer recipes). Post: no op is left with
an unchosen implementation.
"""

from __future__ import annotations

from qcompile.lowering import int_ops, ops
from torch.fx import GraphModule

from qcompile.fx_utils import get_constant, replace_constant
from qcompile.pass_manager import PassContext, PassResult, graph_pass

# op -> position of its `impl` argument
IMPL_ARG = {ops.QUANTIZE: 5, ops.LINEAR_INT8: 9, ops.LINEAR_W4A8: 9, ops.LINEAR_DYNAMIC: 4,
            ops.LINEAR_W4A16: 6, ops.ATTENTION_INT8: 10,
            **int_ops.IMPL_ARG}  # gelu_int8, layernorm_int8, attention_int8_isoftmax


def choose_impl(ctx: PassContext, device) -> str:
    wanted = ctx.options.kernels
    if wanted != "auto":
        return wanted
    return "triton" if getattr(device, "type", "cpu") == "cuda" else "cpu"


@graph_pass("lower", requires=("rewrite-linear",))
def lower(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters: dict[str, int] = {}
    for node in gm.graph.nodes:
        pos = IMPL_ARG.get(node.target)
        if pos is None:
            continue
        first = node.args[0]
        device = first.meta["val"].device if hasattr(first, "meta") else None
        impl = choose_impl(ctx, device)
        args = list(node.args)
        args[pos] = impl
        node.args = tuple(args)
        if impl == "cpu" and node.target in (ops.LINEAR_INT8, ops.LINEAR_DYNAMIC):
            from qcompile.lowering.cpu import prepare_weight

            w = get_constant(gm, node.args[1])
            if w.is_contiguous():  # K-major, once: [N, K] view of a contiguous [K, N]
                replace_constant(gm, node.args[1], prepare_weight(w))
        key = f"{node.target._opname}:{impl}"
        counters[key] = counters.get(key, 0) + 1
        layer = node.meta.get("qc_layer")
        if layer and layer in ctx.layers:
            ctx.layers[layer].kernel = key
    return PassResult(gm, modified=bool(counters), counters=counters)
