"""lower: every quantized op is bound to an implementation, from the op registry.

What: for each call of a registered op (lowering/registry.py), chooses the implementation
`options["kernels"]` asks for on the device the call's tensors live on ("auto": Triton
kernels on CUDA, the CPU integer path on CPU; "triton" on CPU runs the kernels in the
Triton interpreter; "reference" is the exact simulation), runs that implementation's
`prepare` hook on the call's constant arguments once (weight layouts, int4 unpacking:
fresh constants, the originals stay for other readers), and binds the call by keyword
(`impl=`, and `origin=` naming the graph node, which generated kernels put in their
header). On CPU, GEMM ops of a layer bind the route select-layers planned for it
("cpu-<route>", lowering/cpu_routes.py). With debug_dir set, the Triton source of every
generated GEMM is written to <debug_dir>/<graph>/kernels/. The report records the kernel
per layer.
Pre: rewrite-linear (and compute-dyadic for integer recipes). Post: no op is unbound
(stage rule below).
"""

from __future__ import annotations

import os

from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import add_constant, get_constant
from qcompile.lowering import registry
from qcompile.lowering.registry import QuantizedOp
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.verify import register_rule


def _device(node: Node) -> str:
    for a in node.all_input_nodes:
        val = a.meta.get("val")
        if hasattr(val, "device"):
            return val.device.type
    return "cpu"


def _prepare(gm: GraphModule, node: Node, op: QuantizedOp, impl: registry.Impl) -> None:
    consts = {name: get_constant(gm, registry.arg(node, name)) for name in op.params}
    consts = {k: v for k, v in consts.items() if v is not None}
    for name, value in impl.prepare(consts).items():
        if value is consts[name]:
            continue
        base = f"{registry.arg(node, name).target}_{impl.name}"
        registry.set_arg(node, name, add_constant(gm, base, value, before=node))


def _dump_kernel(gm: GraphModule, ctx: PassContext, node: Node, op: QuantizedOp,
                 origin: str) -> None:
    """Write the generated Triton source this node runs (or would run, on CUDA)."""
    from qcompile.lowering.codegen import generated_source
    from qcompile.pass_manager import graph_dump_dir

    args = registry.args_of(gm, node)
    epilogue = op.epilogue(args)
    folder = os.path.join(graph_dump_dir(ctx), "kernels")
    os.makedirs(folder, exist_ok=True)
    name = f"{node.name}_{epilogue.signature().replace('+', '_').replace('.', '_')}.py"
    source = (op.kernel_source(args, origin) if op.kernel_source is not None
              else generated_source(epilogue, origin=origin))
    with open(os.path.join(folder, name), "w") as f:
        f.write(source)


@graph_pass("lower", requires=("rewrite-linear",))
def lower(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        op = registry.op_of(node) if node.op == "call_function" else None
        if op is None:
            continue
        impl = registry.choose(op, ctx.options.kernels, _device(node))
        layer_ann = ann.get(node, ann.Layer)
        route = f"cpu-{layer_ann.route}" if layer_ann is not None and layer_ann.route else None
        if impl.family == "cpu" and route in op.impls:  # the route select-layers planned
            impl = op.impls[route]
        if impl.prepare is not None:
            _prepare(gm, node, op, impl)
        layer = getattr(layer_ann, "name", None)
        origin = f"{ctx.name}:{node.name}" + (f" ({layer})" if layer else "")
        registry.bind(node, impl, origin)
        if op.epilogue is not None and ctx.options.debug_dir:
            _dump_kernel(gm, ctx, node, op, origin)
        key = f"{op.name}:{impl.name}"
        counters[key] = counters.get(key, 0) + 1
        if layer and layer in ctx.layers:
            ctx.layers[layer].kernel = key
    return PassResult(gm, modified=bool(counters), counters=counters)


@register_rule("lower", "every qcompile op is bound to one of its implementations")
def _bound(gm: GraphModule, node: Node) -> bool:
    op = registry.op_of(node) if node.op == "call_function" else None
    return op is None or registry.bound_impl(node) in op.impls
