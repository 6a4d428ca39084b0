"""The stages after canonicalization, per phase and per option (see qcompile/pipeline.py).

Compile phase (data-free):  equivalence transforms, layer selection, observers.
Finalize phase (needs quantization parameters): calibration results, weight
quantization, rewrite to quantized ops, integer dataflow, dyadic multipliers, lowering,
and the per-layer error measurement for the report.
"""

from __future__ import annotations

from qcompile.config import Options
from qcompile.pass_manager import PassFn


def transform_passes(options: Options) -> list[PassFn]:
    """Equivalence transforms (issue 4): exact in real arithmetic, data-free.
    Each pass decides per graph whether it is valid, and records why when it is not."""
    rotate = options.transform_on("rotate")
    online = options.transform_on("online_hadamard")
    if not (rotate or online or options.transform_on("smooth")):
        return []
    from qcompile.passes.analyze_structure import analyze_structure

    # norms, residual streams and their writers/readers, attention heads, MLP inputs
    passes: list[PassFn] = [analyze_structure]
    if rotate:
        from qcompile.passes.fold_norm_affine import fold_norm_affine
        from qcompile.passes.layernorm_to_rmsnorm import layernorm_to_rmsnorm
        from qcompile.passes.rotate_heads import rotate_heads
        from qcompile.passes.rotate_residual import rotate_residual

        passes += [
            fold_norm_affine,  # gamma/beta into the consumers: norms commute with rotations
            layernorm_to_rmsnorm,  # zero-mean stream: LayerNorm readers become RMSNorm
            rotate_residual,  # Q on the stream, folded into writers and readers
            rotate_heads,  # per-head Hadamard on v / o_proj, folded offline
        ]
    if online:
        from qcompile.passes.online_hadamard import online_hadamard

        # where no offline fold is valid: MLP down input, q/k, post-norm linear inputs
        passes.append(online_hadamard)
    return passes


def compile_passes(options: Options) -> list[PassFn]:
    from qcompile.passes.insert_observers import insert_observers
    from qcompile.passes.select_layers import select_layers

    passes = transform_passes(options) if options.recipe_obj.quantizes else []
    # which linears are quantized, and why not the others: every later pass agrees on it
    passes.append(select_layers)
    if options.needs_calibration:
        # identity observers on every activation to be quantized: calibration feeds them
        passes.append(insert_observers)
    return passes


def finalize_passes(options: Options) -> list[PassFn]:
    if not options.recipe_obj.quantizes:
        return []
    from qcompile.passes.calibrate_qparams import calibrate_qparams
    from qcompile.passes.compute_dyadic import compute_dyadic
    from qcompile.passes.integer_dataflow import integer_dataflow
    from qcompile.passes.lower import lower
    from qcompile.passes.measure_sqnr import measure_sqnr
    from qcompile.passes.quantize_weights import quantize_weights
    from qcompile.passes.rewrite_attention import rewrite_attention
    from qcompile.passes.rewrite_linear import rewrite_linear

    passes: list[PassFn] = []
    if options.needs_calibration:
        passes.append(calibrate_qparams)  # observers -> scales, Hessians; observers leave
    if options.transform_on("smooth"):
        from qcompile.passes.smooth import smooth
        from qcompile.passes.smooth_qparams import smooth_qparams

        # SmoothQuant needs the calibrated max|X_j|, so it runs here, not with the
        # data-free transforms; the activation scales it invalidates are recomputed
        passes += [smooth, smooth_qparams]
    passes += [
        quantize_weights,  # RTN or GPTQ, per channel / per group
        rewrite_linear,  # linear -> quantized linear; quantize/dequantize at its boundary
        rewrite_attention,  # sdpa -> int8 attention (float softmax inside the kernel)
        integer_dataflow,  # drop float round trips between integer ops; int8 residual adds
        compute_dyadic,  # float multipliers -> integer multiplier and shift
        lower,  # bind each op to Triton / CPU / reference kernels
        measure_sqnr,  # per-layer error against the float graph, for the report
    ]
    if options.transform_on("integer_nonlinear") and options.recipe_obj.requant == "dyadic":
        from qcompile.passes.integer_nonlinear import integer_nonlinear

        # GELU / LayerNorm / softmax -> I-BERT integer ops; integer-dataflow then removes
        # the float round trips they leave at their boundaries
        passes.insert(passes.index(integer_dataflow), integer_nonlinear)
    return passes


def passes_for(options: Options, phase: str) -> list[PassFn]:
    return compile_passes(options) if phase == "compile" else finalize_passes(options)
