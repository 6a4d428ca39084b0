"""lower: every quantized op is bound to an implementation.

What: sets each qcompile op's `impl` argument: "triton" (generated Triton kernels) on
CUDA, "cpu" (torch._int_mm and integer epilogues) on CPU, or what options["kernels"]
asks for ("triton" on CPU runs the kernels in the Triton interpreter; "reference" is the
exact int64 simulation). Generated GEMMs get an origin naming the graph node they
serve; with debug_dir set, their Triton source is written to <debug_dir>/<graph>/kernels/.
On the CPU path the int8 weights are laid out K-major once, the
layout torch._int_mm is fastest with. The report records the kernel per layer.
Pre: rewrite-linear (and compute-dyadic for integer recipes). Post: no op is left with
an unchosen implementation.
"""

from __future__ import annotations

import os

from torch.fx import GraphModule

from qcompile.fx_utils import get_constant, replace_constant
from qcompile.lowering import int_ops, ops
from qcompile.pass_manager import PassContext, PassResult, graph_pass

# op -> position of its `impl` argument
IMPL_ARG = {ops.QUANTIZE: 5, ops.LINEAR_INT8: 9, ops.LINEAR_W4A8: 9, ops.LINEAR_DYNAMIC: 4,
            ops.LINEAR_W4A16: 6, ops.ATTENTION_INT8: 10, ops.LINEAR_INT8_DQ: 7,
            **int_ops.IMPL_ARG}  # gelu_int8, layernorm_int8, attention_int8_isoftmax


# op -> position of its `origin` argument (generated GEMMs name the node they serve)
ORIGIN_ARG = {ops.LINEAR_INT8: 10, ops.LINEAR_W4A8: 10, ops.LINEAR_DYNAMIC: 5,
              ops.LINEAR_INT8_DQ: 8}


def _dump_kernel(gm: GraphModule, ctx: PassContext, node) -> None:
    """Write the generated Triton source this node runs (or would run, on CUDA)."""
    from qcompile.lowering.codegen import generated_source
    from qcompile.pass_manager import graph_dump_dir

    if node.target is ops.LINEAR_DYNAMIC:
        epilogue = ops.dynamic_epilogue(node.args[3] is not None)
    elif node.target is ops.LINEAR_INT8_DQ:
        epilogue = ops.dequant_epilogue(node.args[2] is not None, node.args[3] is not None)
    else:
        q = get_constant(gm, node.args[4])
        epilogue = ops.requant_epilogue(node.args[2] is not None, node.args[3] is not None,
                                        q is not None and q.numel() > 1)
    folder = os.path.join(graph_dump_dir(ctx), "kernels")
    os.makedirs(folder, exist_ok=True)
    name = f"{node.name}_{epilogue.signature().replace('+', '_').replace('.', '_')}.py"
    with open(os.path.join(folder, name), "w") as f:
        f.write(generated_source(epilogue, origin=node.args[ORIGIN_ARG[node.target]]))


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
        if impl == "cpu" and node.target is ops.LINEAR_W4A8:
            # torch._int_mm has no int4 path: on CPU the int4 values run through the int8
            # GEMM (same arguments, same integers); packing two per byte pays on GPUs
            from qcompile.numerics.specs import unpack_int4

            replace_constant(gm, node.args[1], unpack_int4(get_constant(gm, node.args[1])))
            node.target = ops.LINEAR_INT8
        if impl == "cpu" and node.target in (ops.LINEAR_INT8, ops.LINEAR_DYNAMIC,
                                             ops.LINEAR_INT8_DQ):
            from qcompile.lowering.cpu import prepare_weight

            w = get_constant(gm, node.args[1])
            if w.is_contiguous():  # K-major, once: [N, K] view of a contiguous [K, N]
                replace_constant(gm, node.args[1], prepare_weight(w))
        layer = node.meta.get("qc_layer")
        if node.target in ORIGIN_ARG:  # kernels name the graph node they serve
            args[ORIGIN_ARG[node.target]] = f"{ctx.name}:{node.name} ({layer})"
            node.args = tuple(args)
            if ctx.options.debug_dir:
                _dump_kernel(gm, ctx, node)
        key = f"{node.target._opname}:{impl}"
        counters[key] = counters.get(key, 0) + 1
        if layer and layer in ctx.layers:
            ctx.layers[layer].kernel = key
    return PassResult(gm, modified=bool(counters), counters=counters)
