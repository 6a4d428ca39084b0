"""The whole compiler, top to bottom. Reading this file should tell a newcomer what
qcompile does to a graph and why each pass sits where it does.

Two phases, because static quantization needs data:
  compile phase:  runs when Dynamo hands over a graph;
  finalize phase: runs once quantization parameters exist (at once for dynamic and
                  weight-only recipes, when `qcompile.calibrate` ends for static ones).
Passes are imported lazily per phase, so `import qcompile` stays cheap.
"""

from __future__ import annotations

from qcompile.config import Options
from qcompile.pass_manager import PassFn


def compile_phase(options: Options) -> list[PassFn]:
    from qcompile.passes.canonicalize_attention import canonicalize_attention
    from qcompile.passes.canonicalize_linear import canonicalize_linear
    from qcompile.passes.canonicalize_norm import canonicalize_norm
    from qcompile.passes.freeze_params import freeze_params

    passes: list[PassFn] = [
        # capture: weights become constants first; every later pass reads their values
        freeze_params,
        # canonicalize: one spelling per op, so analysis and rewrites match one pattern
        canonicalize_linear,
        canonicalize_attention,
        canonicalize_norm,
    ]
    passes += _optional(options, "compile")
    return passes


def finalize_phase(options: Options) -> list[PassFn]:
    return _optional(options, "finalize")


def _optional(options: Options, phase: str) -> list[PassFn]:
    """Stages that later issues add (analysis, transforms, observers, rewrite, lowering)
    register themselves in qcompile.stages; none are required for float capture."""
    try:
        from qcompile import stages
    except ImportError:
        return []
    return stages.passes_for(options, phase)


def all_passes(options: Options) -> list[PassFn]:
    return compile_phase(options) + finalize_phase(options)
