"""Autotuning a whole compiled model: every generated GEMM it runs, at its real shapes.

`tune_model(compiled_model)` walks the model's quantized graphs, collects each int8 GEMM
(M from the shape it last ran at, bucketed to a power of two as the cache keys are; K, N
and the epilogue from the node), tunes each distinct one (on CUDA; without a GPU it looks
up the deterministic default configs) and returns the table. Results land in the same
persistent cache the kernels read at run time, so a later process does not tune again.
"""

from __future__ import annotations

import torch

from qcompile import annotations as ann
from qcompile.lowering import registry
from qcompile.state import state_for_model


def _hint(size) -> int:
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def gemm_shapes(model, rows: int | None = None) -> list[dict]:
    """One entry per distinct (M, K, N, epilogue) the compiled model's graphs run."""
    seen, out = set(), []
    for variant in sorted(state_for_model(model).artifacts, key=lambda v: v.name):
        if not variant.finalized:
            continue
        for node in variant.gm.graph.nodes:
            op = registry.op_of(node) if node.op == "call_function" else None
            if op is None or op.epilogue is None:  # not a generated GEMM
                continue
            x = node.args[0].meta["val"]
            m = rows if rows is not None else 1
            if rows is None:
                for d in x.shape[:-1]:
                    m *= _hint(d)
            k = _hint(x.shape[-1])
            n = _hint(node.meta["val"].shape[-1])
            epilogue = op.epilogue(registry.args_of(variant.gm, node))
            layer = getattr(ann.get(node, ann.Layer), "name", None)
            key = (m, k, n, epilogue.signature())
            if key not in seen:
                seen.add(key)
                out.append({"m": m, "k": k, "n": n, "epilogue": epilogue, "layers": [layer]})
            else:
                next(e for e in out if (e["m"], e["k"], e["n"], e["epilogue"].signature())
                     == key)["layers"].append(layer)
    return out


def tune_model(model, *, rows: int | None = None, cache_dir=None) -> list[dict]:
    from qcompile.lowering.gemm import tune_gemm

    table = []
    for entry in gemm_shapes(model, rows):
        result = tune_gemm(entry["m"], entry["n"], entry["k"], entry["epilogue"],
                           cache_dir=cache_dir)
        table.append({**entry, "config": result.config, "ms": result.ms,
                      "source": result.source})
    return table


def format_table(table: list[dict]) -> str:
    lines = [f"{'M x K x N':>18} {'epilogue':>22} {'config':>28} {'ms':>8} {'source':>8} layers"]
    for e in table:
        ms = f"{e['ms']:.4f}" if e.get("ms") else "-"
        lines.append(f"{e['m']}x{e['k']}x{e['n']:<6} {e['epilogue'].signature():>22} "
                     f"{str(e['config']):>28} {ms:>8} {e['source']:>8} {len(e['layers'])}")
    return "\n".join(lines)
