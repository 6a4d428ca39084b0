"""Quantized ops written out in plain torch, so that Inductor fuses them with their graph.

What: `inline_for_inductor(gm)` replaces each call of a registered op that has an inliner
for its bound implementation's family (QuantizedOp.inliner) with the inliner's plain
torch function: the activation quantization, the per-token scales, the float epilogue of
a dequantizing GEMM become ordinary element-wise and reduction ops, and only the GEMM
itself stays opaque (lowering/cpu.py: cpu_acc). Calls whose constants break an
inliner's bound (|acc| or the zero-point term beyond 2**24 in float32, a route chosen per
call) stay as they are.

Why: each opaque op is a pass over memory of its own. On CPU, a MiniLM layer spent about
as long in its quantize and epilogue passes as in the LayerNorm, GELU and residual adds
around them; written out, Inductor folds the quantization into the LayerNorm or GELU that
produces its input and the epilogue into the add or GELU that consumes its output.

Exact: each inliner runs the arithmetic of the implementation it replaces (the same
bodies: ops._quantize_body, ops._per_token_body, ops._per_token_asym_body (w4a4),
cpu.dequant_body, and for the requantizing linears on int32 accumulators the int64 dyadic
requantization, dyadic.rounding_shift_unchecked, which Inductor already compiled when they
ran inside the op), in the reference's op order. Divisors reach
Inductor as tensors (Inline.constants), never as constants it could turn into a
multiplication by the reciprocal. Tests compare the inlined, compiled graph with the
graph as lowered and with the reference, bit for bit.

The model's exact GELUs on CPU (erf form) get a rational erf there (`erf_rational`: one
division, no exp; max abs error 4.3e-7 against float32 erf's 3.3e-8): Inductor's erf calls
out to SLEEF's exp, and MiniLM's dequantize -> GELU -> quantize loops were a tenth of its
quantized forward. Their outputs are quantized; the report's notes say how many.

Used on a copy of the lowered graph, the one Inductor compiles (artifact.py); the graph
the report, the debug dumps and measure-sqnr read keeps its ops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from qcompile.fx_utils import add_constant
from qcompile.lowering import registry


@dataclass
class Inlined:
    """What inline_for_inductor wrote out: the count of calls per op name, and the config
    Inductor should compile the graph with (`compile_fx(..., config_patches=...)`)."""

    calls: Counter = field(default_factory=Counter)
    config_patches: dict[str, Any] = field(default_factory=dict)
    rational_gelus: int = 0  # exact GELUs whose erf is erf_rational (_rational_gelus)


# A per-token quantization reads its input in two loops (the row's range, then the
# division), and Inductor recomputes a pointwise producer in both unless it stores it; on
# CPU it stores only bodies of over 50 ops. A GELU's erf computed twice made MiniLM's w8a8
# slower than with the quantization opaque (465 vs 440 ms per 32 x 128 batch on 2 AVX2
# cores); storing bodies of over 8 ops gave 414 ms. That threshold splits every long chain,
# though, and a split the loops cannot merge across (a per-channel body, then a flat one)
# is a pass over memory of its own: with only static quantizers (each read once) the
# default is faster (MiniLM w8a8-static 142 -> 133 ms per batch on 2 AVX512-VNNI cores,
# where w8a8 was 158 ms with 8 and 154 ms with the default). So the low threshold is set
# only where a written-out body rereads its input.
_STORE_REREAD_INPUTS = {"realize_opcount_threshold": 8}


def inline_for_inductor(gm: GraphModule) -> Inlined:
    """Rewrite gm in place; what was inlined, and how Inductor should compile the result."""
    done = Inlined()
    opaque = set()  # written-out calls that hand their input to an opaque GEMM
    for node in list(gm.graph.nodes):
        op = registry.op_of(node) if node.op == "call_function" else None
        if op is None:
            continue
        impl = registry.bound_impl(node)
        inliner = op.inliners.get(impl.split("-", 1)[0]) if impl else None
        plan = inliner(registry.args_of(gm, node), impl) if inliner is not None else None
        if plan is None:
            continue
        consts = {name: add_constant(gm, f"{node.name}_{name}", value, before=node)
                  for name, value in plan.constants.items()}
        call_args = tuple(registry.arg(node, name) for name in op.params)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(plan.fn, call_args, {**consts, **plan.options})
        new.meta.update(node.meta)
        if plan.opaque_input:
            opaque.add(new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done.calls[op.name] += 1
        if plan.rereads_input:
            done.config_patches.update(_STORE_REREAD_INPUTS)
    done.rational_gelus = _rational_gelus(gm)
    if _store_shared_inputs(gm, opaque) or done.calls or done.rational_gelus:
        gm.graph.lint()
        gm.recompile()
    return done


# erf(x) = x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf rounds to +-1 in float32
# beyond): P of degree 6 (odd numerator of degree 13), Q of degree 4 (even, degree 8),
# highest power first. Max abs error 4.3e-7 on a 2-million-point grid over [-6, 6]
# (float32 erf's is 3.3e-8); tests/lowering/test_inline.py holds it to 5e-7.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def erf_rational(x: torch.Tensor) -> torch.Tensor:
    """erf in float32 from multiplications, additions and one division (no exp): what
    Inductor's CPU code computes inline, where its erf calls out to SLEEF's exp."""
    x = x.clamp(-4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[0] + _ERF_P[1]
    for c in _ERF_P[2:]:
        p = p * x2 + c
    q = x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * x2 + c
    return x * p / q


def gelu_rational(x: torch.Tensor) -> torch.Tensor:
    """GELU (the exact, erf form) with erf_rational, in Inductor's order of operations."""
    return x * 0.5 * (1.0 + erf_rational(x * 0.7071067811865476))


_GELU = (torch._C._nn.gelu, torch.nn.functional.gelu)


def _rational_gelus(gm: GraphModule) -> int:
    """Exact GELUs on CPU tensors computed with erf_rational; how many. Their outputs are
    quantized (this is a quantized graph), and the error it adds (<= 2.2e-7 |x|) is far
    below an int8 step. Why: Inductor's vectorized erf calls SLEEF's exp through a
    function pointer and spills around it; MiniLM's dequantize -> GELU -> quantize over
    [4096, 1536] took 8.5 ms, 5.7 ms with the rational erf (2 Zen 3 cores)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _GELU or len(node.args) != 1:
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if (node.kwargs.get("approximate", "none") != "none" or not isinstance(val, torch.Tensor)
                or val.device.type != "cpu" or val.dtype != torch.float32):
            continue
        node.target, node.kwargs = gelu_rational, {}
        count += 1
    return count


def _store_shared_inputs(gm: GraphModule, opaque: set) -> bool:
    """Store once what several opaque calls read (qcompile ops left as they are, and the
    `opaque` written-out calls, which hand their input to a GEMM route). Inductor recomputes
    an unstored pointwise input into a copy for each call that reads it: the quantized
    LayerNorm output once for each of q, k and v, and HF's [B, 1, S, S] bool padding mask
    once per attention, each through Inductor's vectorized bool code (1.6 ms for 32 x 128
    tokens on 2 Zen 4 cores, where eager takes 0.2 ms): about 6 of MiniLM's 130 ms per
    batch. Inductor's own prim for fixing a tensor's strides stores it (in eager it is
    the tensor itself, so the graph means what it meant). Whether it stored anything."""
    try:
        from torch._inductor import inductor_prims  # noqa: F401  (registers the prim)

        store = torch.ops.prims.inductor_force_stride_order.default
    except (ImportError, AttributeError):  # an Inductor without it: copies, same values
        return False
    stored_any = False
    for node in list(gm.graph.nodes):
        readers = [user for user in node.users if registry.is_op(user) or user in opaque]
        val = node.meta.get("val")
        if (len(readers) < 2 or node.op not in ("call_function", "call_method")
                or not isinstance(val, torch.Tensor)
                or any(isinstance(s, int) and s == 0 for s in val.stride())):
            continue  # (a broadcast view is left as it is: storing it would write it out)
        with gm.graph.inserting_before(node.next):
            strides = [gm.graph.call_function(torch.ops.aten.sym_stride.int, (node, d))
                       if isinstance(s, torch.SymInt) else s
                       for d, s in enumerate(val.stride())]
            stored = gm.graph.call_function(store, (node, strides))
        stored.meta["val"] = val
        for user in readers:
            user.replace_input_with(node, stored)
        stored_any = True
    return stored_any
