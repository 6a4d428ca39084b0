"""The whole compiler, top to bottom: every pass in order, its phase, when it runs, and why
it sits where it does. Reading this table tells a newcomer what qcompile does to a graph.

Two phases, because static quantization needs data:
  compile:   runs when Dynamo hands over a graph (data-free);
  finalize:  runs once quantization parameters exist (at once for dynamic and weight-only
             recipes, when `qcompile.calibrate` ends for static ones).
Passes are named here and imported when a pipeline is built, so `import qcompile` stays
cheap. The pass manager checks each pass's declared prerequisites against this order; it
never reorders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qcompile.config import Options
from qcompile.pass_manager import PassFn, get_pass

Condition = Callable[[Options], bool]


def always(o: Options) -> bool:
    return True


def quantizes(o: Options) -> bool:
    return o.recipe_obj.quantizes


def data_free_transforms(o: Options) -> bool:
    return quantizes(o) and any(o.transform_on(t) for t in ("rotate", "online_hadamard",
                                                             "smooth"))


def rotate(o: Options) -> bool:
    return quantizes(o) and o.transform_on("rotate")


def online_hadamard(o: Options) -> bool:
    return quantizes(o) and o.transform_on("online_hadamard")


def calibrated(o: Options) -> bool:
    return quantizes(o) and o.needs_calibration


def smooth(o: Options) -> bool:
    return quantizes(o) and o.transform_on("smooth")


def learn(o: Options) -> bool:
    return quantizes(o) and o.transform_on("learn")


def rescaled(o: Options) -> bool:
    """smooth or the learned transforms shift and scale activations per channel."""
    return smooth(o) or learn(o)


def bias_correction(o: Options) -> bool:
    return quantizes(o) and o.transform_on("bias_correction")


def mixed(o: Options) -> bool:
    return o.recipe == "mixed"


def integer_nonlinear(o: Options) -> bool:
    return (quantizes(o) and o.recipe_obj.requant == "dyadic"
            and o.transform_on("integer_nonlinear"))


@dataclass(frozen=True)
class Step:
    name: str  # the pass's kebab-case name (passes/<name with underscores>.py)
    phase: str  # "compile" or "finalize"
    when: Condition
    why: str  # why it runs here
    snapshot: str | None = None  # keep a copy of the graph after it, under this name

    @property
    def fn(self) -> PassFn:
        return get_pass(self.name)


C, F = "compile", "finalize"
PIPELINE: tuple[Step, ...] = (
    # ---- capture and canonicalize
    Step("freeze-params", C, always,
         "weights become constants first; every later pass reads their values"),
    Step("canonicalize-linear", C, always,
         "one spelling per op, so analysis and rewrites match one pattern"),
    Step("canonicalize-conv", C, always,
         "conv1d / conv2d as one torch.conv2d with every argument positional"),
    Step("fold-batchnorm", C, quantizes,
         "eval-mode batch norm into the convolution before it: one layer to quantize, and "
         "its scale in the weights that quantization sees"),
    Step("canonicalize-attention", C, always, "sdpa with every argument by keyword"),
    Step("canonicalize-norm", C, always, "LayerNorm / RMSNorm in one form each",
         snapshot="canonical_gm"),  # the report compares ranges before the transforms
    # ---- data-free equivalence transforms (exact in real arithmetic)
    Step("analyze-structure", C, data_free_transforms,
         "norms, residual streams and their writers / readers, attention heads, MLP inputs"),
    Step("fold-norm-affine", C, rotate,
         "gamma / beta into the consumers: norms then commute with rotations"),
    Step("layernorm-to-rmsnorm", C, rotate,
         "a zero-mean stream: LayerNorm readers become RMSNorm"),
    Step("rotate-residual", C, rotate, "Q on the stream, folded into writers and readers"),
    Step("rotate-heads", C, rotate, "per-head Hadamard on v / o_proj, folded offline"),
    Step("online-hadamard", C, online_hadamard,
         "where no offline fold is valid: MLP down input, q / k, post-norm linear inputs"),
    # ---- what to quantize, and the data it needs
    Step("select-layers", C, always,
         "which linears are quantized, and why not the others: later passes agree on it"),
    Step("insert-observers", C, calibrated,
         "identity observers on every activation to be quantized: calibration feeds them"),
    # ---- finalize: quantize, rewrite, lower
    Step("calibrate-qparams", F, calibrated,
         "observers -> scales, per-channel ranges, Hessians; the observers leave"),
    Step("smooth", F, smooth,
         "SmoothQuant needs the calibrated max|X_j|, so it runs here, not with the "
         "data-free transforms"),
    Step("learn-transforms", F, learn,
         "clip ratios and shifts / scales fitted block by block to the block's output error: "
         "starts from smooth's result, and its scales change the activation ranges that "
         "smooth-qparams recomputes next"),
    Step("smooth-qparams", F, rescaled,
         "the activation scales smoothing and learning changed, recomputed",
         snapshot="float_gm"),  # measure-sqnr's float reference: both rescaled outputs
    Step("choose-precision", F, mixed,
         "each weight's and activation's width under the budget: needs the calibrated "
         "ranges and the final float weights (after smoothing), and decides what "
         "quantize-weights and the rewrites do"),
    Step("quantize-weights", F, quantizes, "RTN or GPTQ, per channel / per group"),
    Step("bias-correct", F, bias_correction,
         "the mean output shift E[x W^T - Q(x) W_q^T] needs the quantized weight and the "
         "calibrated input statistics; it joins the bias before rewrite-linear rounds that "
         "to int32"),
    Step("rewrite-linear", F, quantizes,
         "linear -> quantized linear; quantize / dequantize at its boundary"),
    Step("rewrite-conv", F, quantizes,
         "conv -> quantized conv (a ReLU it feeds becomes its clamp); the boundaries as "
         "for linears, so integer-dataflow treats both alike"),
    Step("rewrite-attention", F, quantizes,
         "sdpa -> int8 attention (float softmax inside the kernel)"),
    Step("integer-nonlinear", F, integer_nonlinear,
         "GELU / LayerNorm / softmax -> I-BERT integer ops, before integer-dataflow "
         "removes the float round trips they leave at their boundaries"),
    Step("integer-dataflow", F, quantizes,
         "drop float round trips between integer ops; int8 residual adds"),
    Step("compute-dyadic", F, quantizes, "float multipliers -> integer multiplier and shift"),
    Step("lower", F, quantizes, "bind each op to an implementation from the op registry"),
    Step("measure-sqnr", F, quantizes,
         "per-layer error against the float graph, for the report"),
)


def steps(options: Options, phase: str | None = None) -> list[Step]:
    """The steps that run for these options (in one phase, or both), in order."""
    return [s for s in PIPELINE if (phase is None or s.phase == phase) and s.when(options)]


def passes(options: Options, phase: str | None = None) -> list[PassFn]:
    return [s.fn for s in steps(options, phase)]
