"""The stages after canonicalization, per phase and per option (see qcompile/pipeline.py).

Compile phase (data-free):  analysis, equivalence transforms, observers.
Finalize phase (needs quantization parameters): calibration-driven transforms, weight
quantization, rewrite to quantized ops, dyadic multipliers, lowering.
"""

from __future__ import annotations

from qcompile.config import Options
from qcompile.pass_manager import PassFn


def transform_passes(options: Options) -> list[PassFn]:
    """Equivalence transforms (issue 4): exact in real arithmetic, data-free.
    Each pass decides per graph whether it is valid, and records why when it is not."""
    return []


def passes_for(options: Options, phase: str) -> list[PassFn]:
    if phase == "compile":
        return transform_passes(options)
    return []
