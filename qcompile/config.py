"""Options and recipes: the one configuration object, read once per compile.

`Options.from_user(mode, options)` validates what torch.compile hands the backend. Unknown
options, recipes, modes or values are errors that list what is known. The only
environment variables qcompile reads are read here, when an Options is built (never at
import time): QCOMPILE_DEBUG_DIR (same as options["debug_dir"]), QCOMPILE_KERNELS (the
default of options["kernels"]: the test suite sets "cpu" to exercise the CPU integer path
on models too small to run faster than float) and QCOMPILE_VERIFY=1
(run the stage verifier after every pass, as the tests do).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class QCompileConfigError(ValueError):
    """A bad option, recipe or mode given to the qcompile backend."""


@dataclass(frozen=True)
class WeightQuant:
    bits: int  # 8 or 4
    group_size: int | None = None  # None: per output channel


@dataclass(frozen=True)
class ActQuant:
    bits: int  # 8 or 4
    dynamic: bool  # True: per-token scales computed at run time; False: static per-tensor


@dataclass(frozen=True)
class Recipe:
    """A whole quantization configuration; every transform is switchable in options."""

    name: str
    weight: WeightQuant | None
    act: ActQuant | None
    requant: str | None  # "float" epilogue, "dyadic" integer-only, or None (nothing)
    smooth: bool = False
    rotate: bool = False
    online_hadamard: bool = False
    gptq: bool = False
    integer_nonlinear: bool = False
    bias_correction: bool = False
    weight_clip: bool = False
    learn: bool = False
    sequential: bool = True  # wherever GPTQ runs
    observer: str = "minmax"  # activation ranges; MSE clipping matters at 4 bits
    # per-token dynamic int4 activations: the range is this fraction of each row's absmax
    # (QuaRot); None where the recipe has no such activations
    activation_clip: float | None = None
    # per-token dynamic int4 activations with a zero point per token (the row's [min, max]
    # onto [-8, 7]) rather than symmetric (absmax / 7); only where per_token_int4
    activation_symmetric: bool = True
    description: str = ""

    @property
    def per_token_int4(self) -> bool:
        """Whether the activations are quantized per token at run time to int4 (what
        activation_clip applies to)."""
        return self.act is not None and self.act.dynamic and self.act.bits == 4

    @property
    def quantizes(self) -> bool:
        return self.weight is not None

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales and GPTQ Hessians both come from calibration batches."""
        return (self.act is not None and not self.act.dynamic) or self.gptq or self.smooth


# w4a4's activation clip ratio, measured (QuaRot uses 0.9 on LLMs): all-MiniLM-L6-v2 under
# w4a4 (rotations + GPTQ), embedding cosine to float on the held-out sentences, mean / min
# (bench/minilm_accuracy.py, 2-core AMD EPYC, AVX2):
#   clip 1.0 0.9056 / 0.8746   0.95 0.9126 / 0.8737   0.9 0.9188 / 0.8915
#        0.85 0.9244 / 0.8895   0.8 0.9253 / 0.8950   0.75 0.9264 / 0.8818   0.7 0.9243 / 0.9001
# The mean is flat within 0.002 from 0.85 down to 0.7; 0.8 sits in the middle of that
# plateau rather than at its noisiest point. Gemma 3 270M (groups of 32, text perplexity
# against float, bench/gemma_perplexity.py, AVX512-VNNI EPYC): 1.0 1.428x, 0.9 1.370x, 0.8
# 1.286x, 0.7 1.296x: the same choice.
DEFAULT_ACTIVATION_CLIP = 0.8
# ... and in groups (activation_group_size): each group's own range already leaves a few
# large values less room to stretch the step, so less clipping pays; Gemma 3 270M, float
# simulation of groups of 16 after the Hadamards, text perplexity against float (2-core
# AMD EPYC, AVX2): clip 1.0 1.155x, 0.95 1.137x, 0.9 1.127x, 0.85 1.149x, 0.8 1.174x
GROUP_ACTIVATION_CLIP = 0.9
# options["group_size"] for one int4 weight scale per output channel instead of groups
PER_CHANNEL = "channel"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w8a8", WeightQuant(8), ActQuant(8, dynamic=True), "float",
               description="int8 per-channel weights, int8 per-token dynamic activations, "
                           "float epilogue; no calibration (default)"),
        Recipe("w8a8-static", WeightQuant(8), ActQuant(8, dynamic=False), "dyadic",
               smooth=True,
               description="int8 per-channel weights, int8 per-tensor static activations, "
                           "each layer's input shifted and scaled where that cuts its output "
                           "error (smooth), integer-only dyadic requantization; needs "
                           "calibration"),
        Recipe("w4a16", WeightQuant(4, group_size=128), None, None, weight_clip=True,
               description="int4 group-wise (128) weights, each row's range clipped where "
                           "that cuts its error, float activations"),
        # smooth off: on Gemma 3 270M with int4 groups of 32 it took perplexity from 1.18x
        # float to 1.64x (each group's migration is chosen by that group's own output error,
        # blind to what follows); on all-MiniLM-L6-v2 w4a8 it moved the cosine by < 0.0001
        # groups of 32 (torchao's int8-activation int4-weight default): all-MiniLM-L6-v2
        # 0.9789 mean cosine against 0.9724 per channel; Gemma 3 270M 1.18x float
        # perplexity (no smooth) against 1.39x (per channel, smoothed); the same int8 GEMM
        # on CPU ((q - z) * mult is int8)
        # GPTQ (sequential) by default: it lifts random LLaMA / Mistral / Qwen2 / GPT-2 / OPT
        # with outlier channels from 0.9898 / 0.9898 / 0.9880 / 0.9910 / 0.9916 to 0.9949 /
        # 0.9949 / 0.9966 / 0.9953 / 0.9943 mean logit cosine and all-MiniLM-L6-v2 from
        # 0.9789 to 0.9894 (groups of 16: 0.9907). From a handful of calibration tokens
        # (fewer rows than K) its Hessians are shrunk toward their mean diagonal
        # (Ledoit-Wolf), so it stays near round-to-nearest instead of fitting those rows
        Recipe("w4a8", WeightQuant(4, group_size=32), ActQuant(8, dynamic=False), "dyadic",
               rotate=True, online_hadamard=True, weight_clip=True, gptq=True,
               description="int4 weights in groups of 32 along K, each group's scale the "
                           "row's times an integer (rows clipped by their output error; GPTQ "
                           "in the model's order on shrunk Hessians), int8 static "
                           "activations, rotations on"),
        # asymmetric per-token activations (a zero point per token, removed in the GEMM's
        # epilogue as x_zp[m] * rowsum(W)[n]): all-MiniLM-L6-v2 0.9687 -> 0.9708 mean cosine
        # with groups of 16, 0.958 -> 0.9628 per channel (bench/results/minilm-accuracy.json)
        # groups of 32 with a zero point each (the int8 GEMM of (q - z) * mult, as w4a8's):
        # all-MiniLM-L6-v2 0.9636 per channel -> 0.9713 (0.9731 on another machine), Gemma 3
        # 270M 1.403x -> 1.286x float perplexity on the text (bench/results)
        Recipe("w4a4", WeightQuant(4, group_size=32), ActQuant(4, dynamic=True), "float",
               rotate=True, online_hadamard=True, gptq=True, smooth=True, weight_clip=True,
               activation_clip=DEFAULT_ACTIVATION_CLIP, activation_symmetric=False,
               description="int4 weights in groups of 32 along K with a zero point each, "
                           "each group's scale the row's times an integer (GPTQ), int4 "
                           "per-token dynamic asymmetric activations after the online "
                           f"Hadamard, each row's range clipped to {DEFAULT_ACTIVATION_CLIP} "
                           "of itself, float epilogue; rotations on; calibration for GPTQ's "
                           "Hessians"),
        Recipe("w4a4-static", WeightQuant(4), ActQuant(4, dynamic=False), "dyadic",
               rotate=True, online_hadamard=True, gptq=True, weight_clip=True, observer="mse",
               description="int4 weights (GPTQ), int4 per-tensor static activations (MSE "
                           "ranges), integer-only dyadic requantization, rotations on"),
        Recipe("mixed", WeightQuant(8), ActQuant(8, dynamic=False), "dyadic", smooth=True,
               description="static integer-only, smoothed as w8a8-static; each layer's "
                           "weight bits (int8 / int4) and each activation's (int8 / int16) "
                           "chosen under options['budget'] by an integer program over "
                           "measured sensitivities (HAWQ-V3); needs calibration"),
        Recipe("float", None, None, None,
               description="capture and canonicalize only; nothing is quantized (debugging)"),
    )
}
DEFAULT_RECIPE = "w8a8"

# options["budget"] of the mixed recipe: key -> what it bounds (passes/choose_precision.py)
BUDGET_KEYS = {
    "a16": "fraction (0..1) of the quantized activation sites that may run at 16 bits",
    "weight_bits": "average bits per quantized weight (4..8): int4 where it costs least",
    "size": "weight bytes: a fraction (0..1] of the all-int8 size, or a number of bytes > 1",
    "bops": "bit operations (weight bits x activation bits x MACs), as a fraction of all-int8",
    "latency": "the quantized linears' time, measured per layer with the kernels the model "
               "runs, as a fraction of all-int8",
}
SENSITIVITIES = ("measured", "hessian", "both")
OBSERVERS = ("minmax", "moving-minmax", "percentile", "mse")
KERNELS = ("auto", "triton", "cpu", "reference")
MODES = (None, "default", "max-autotune", "max-autotune-no-cudagraphs")
PRINT_AFTER = (None, "all", "change")


@dataclass
class Options:
    """Every knob the backend accepts. Field docs are what `known_options()` prints."""

    recipe: str = DEFAULT_RECIPE
    # transforms (None: the recipe's default)
    smooth: bool | None = None
    # None: each group of linears gets the shift and scale (Outlier Suppression+), the
    # SmoothQuant scales or no change, whichever gives its outputs the least error on the
    # calibration rows (passes/_migration.py); a number in [0, 1]: SmoothQuant with this
    # fixed alpha everywhere
    smooth_alpha: float | None = None
    rotate: bool | None = None
    online_hadamard: bool | None = None
    gptq: bool | None = None
    integer_nonlinear: bool | None = None
    # each quantized linear's mean output shift on the calibration data, E[x] (W - W_q)^T,
    # folded into its bias (passes/bias_correct.py); needs calibration, whatever the recipe
    bias_correction: bool | None = None
    # each weight row's range clipped to the ratio (1.0 .. 0.5) whose rounding gives the
    # layer the least output error (Hessian-weighted where calibration gathered one, else
    # the weight's own squared error): numerics.weights.clip_search; None: the recipe's
    weight_clip: bool | None = None
    # block by block, each quantized linear's weight clip ratios and each linear input's
    # per-channel scale and shift, learned (Adam, straight-through rounding) to cut the
    # block's output error against float on the calibration batches, then folded into the
    # weights (OmniQuant's LWC and LET; passes/learn_transforms.py); needs calibration
    learn: bool | None = None
    # GPTQ in the model's order, each layer's Hessian from its input in the model quantized
    # up to it (GPTQ's own procedure; passes/_sequential.py), not from the float model's;
    # the calibration batches are kept and replayed for it. None: on wherever GPTQ runs
    # (outlier LLaMA / Mistral w4a8 0.9918 -> 0.9952, Qwen2 0.9951 -> 0.9963, MiniLM w4a8
    # groups of 16 0.9892 -> 0.9899, groups of 32 0.9880 -> 0.9878: bench/results)
    sequential: bool | None = None
    learn_steps: int = 40  # Adam steps per block (each on one calibration batch)
    # a cap on the whole pass's seconds: blocks share it equally, the report says where it
    # cut steps short; None: no cap
    learn_time_s: float | None = None
    observer: str | None = None  # None: the recipe's (min-max; MSE search for w4a4-static)
    # int4 weights in groups of this many input columns, one scale per group (w4a16: float
    # scales; w4a8 / w4a4 / w4a4-static / mixed's int4 layers: each group's scale its row's
    # times an integer in 1..8 with a zero point per group, 1..4 where the CPU's int8 route
    # needs 7-bit weights (16 and 8 with weight_symmetric), so the GEMM stays one int8 GEMM
    # with one scale per row); a K it does not divide: per channel, said in the report;
    # "channel": one scale per output channel (w4a16: one group per row); None: the
    # recipe's (w4a16 128, w4a8 and w4a4 32, w4a4-static and mixed per channel)
    group_size: int | str | None = None
    # group-wise int4 weights with a zero point per group (False: each group's [min, max]
    # onto [-8, 7]; with integer activations the multipliers then go up to 8, 4 for 7-bit
    # weights, so (q - zero point) * multiplier stays int8) or symmetric (True: no zero
    # point, multipliers up to 16); None: asymmetric, 18-20% less output error on Gemma 3
    # 270M's layers at groups of 16 (bench/results)
    weight_symmetric: bool | None = None
    # per-token dynamic int4 activations (recipe w4a4) are quantized with the range at this
    # fraction of each row's absmax, in (0, 1]; 1.0: no clipping; None: the recipe's
    activation_clip: float | None = None
    # ... with a zero point per token (False: the row's [min, max] onto [-8, 7]) or
    # symmetric (True: absmax / 7, QuaRot's); None: the recipe's (w4a4: asymmetric)
    activation_symmetric: bool | None = None
    # ... or in groups of this many along K, each group's scale the token's
    # times an integer in 1..15 (symmetric: activation_symmetric does not apply), so their
    # values q * m are int8s and the GEMM is the same int8 GEMM; Gemma 3 270M's int4
    # activations after the Hadamards cost 1.21x perplexity per token, 1.13x in groups of
    # 16 (bench/results/gemma3-270m-w4a4-budget.json); a K it does not divide: per token,
    # said in the report; None: per token (QuaRot's W4A4)
    activation_group_size: int | None = None
    skip: tuple[str, ...] = ()  # fnmatch patterns of layer names left in float
    # mixed precision (recipe "mixed"): what the choice may spend (BUDGET_KEYS), and how
    # each site's sensitivity is found: one site quantized at a time ("measured"), the
    # Hessian trace (HAWQ-V2, "hessian"), or both side by side (the choice uses measured)
    budget: dict[str, float] | None = None
    sensitivity: str = "both"
    # debugging
    debug_dir: str | None = None
    print_after: str | None = None
    verify: bool = False
    stop_after: str | None = None  # run the pipeline up to this pass only
    # lowering
    # hand the float remainder of the graph to Inductor; None: on CPU graphs with quantized
    # layers under kernels="auto" (their float islands run 3-4x faster fused: MiniLM)
    inductor: bool | None = None
    autotune: bool = False  # set by mode="max-autotune"
    kernels: str = "auto"  # "auto" | "triton" | "cpu" | "reference"
    # CPU graphs: 7-bit int8 weights where this CPU's fast exact int8 kernel needs them
    # (oneDNN's u8 x s8 without VNNI); None: when it does, False: never, True: always
    narrow_weights: bool | None = None
    # int8 attention (rewrite-attention): None: wherever activations are quantized, except on
    # CPU under kernels="auto" where it is no faster (without AVX512-VNNI its int8 attention
    # is float SDPA on dequantized inputs; with it, under online Hadamards, which would
    # rotate q and k: rewrite_attention.float_attention_reason) unless integer_nonlinear asks
    # for the integer softmax; True: there too; False: attention stays float everywhere
    quantize_attention: bool | None = None
    seed: int = 0  # random Hadamard signs and orthogonal fallbacks

    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def recipe_obj(self) -> Recipe:
        return RECIPES[self.recipe]

    @property
    def observer_name(self) -> str:
        return self.observer or self.recipe_obj.observer

    def transform_on(self, name: str) -> bool:
        """A transform's switch: the option where given, else the recipe's default."""
        value = getattr(self, name)
        return getattr(self.recipe_obj, name) if value is None else bool(value)

    @property
    def smooth_search(self) -> bool:
        """Smoothing is on and chooses each group's shift and scale by measurement (it needs
        a sample of each linear input's rows from calibration)."""
        return self.transform_on("smooth") and self.smooth_alpha is None

    @property
    def needs_calibration(self) -> bool:
        r = self.recipe_obj
        static_act = r.act is not None and not r.act.dynamic
        return static_act or any(self.transform_on(t) for t in ("gptq", "smooth",
                                                                 "bias_correction", "learn"))

    @property
    def replays_calibration(self) -> bool:
        """Whether finalizing replays the calibration batches (learn-transforms, sequential
        GPTQ), so the compiled graph keeps their inputs."""
        return self.recipe_obj.quantizes and (self.transform_on("learn") or (
            self.transform_on("gptq") and self.transform_on("sequential")))

    @property
    def act_clip(self) -> float:
        """The clip ratio of the per-token int4 activations: the option, else the recipe's;
        1.0 (no clipping) for recipes without such activations."""
        if self.activation_clip is not None:
            return float(self.activation_clip)
        if self.act_group:
            return GROUP_ACTIVATION_CLIP
        return self.recipe_obj.activation_clip or 1.0

    @property
    def act_group(self) -> int:
        """The per-token int4 activations' group size along K; 0: one scale per token."""
        return self.activation_group_size or 0

    @property
    def act_symmetric(self) -> bool:
        """Whether the per-token int4 activations are symmetric: the option, else the
        recipe's; True for recipes without such activations (int8 dynamic ones are)."""
        if self.act_group:  # groups: symmetric (a multiplier each, no zero point)
            return True
        if self.activation_symmetric is not None:
            return self.activation_symmetric
        return self.recipe_obj.activation_symmetric

    @property
    def group_weights_symmetric(self) -> bool:
        """Whether group-wise int4 weights are symmetric: the option, else asymmetric (a
        zero point per group)."""
        return bool(self.weight_symmetric)

    @property
    def weight_group_size(self) -> int | None:
        """The group size of the recipe's int4 weights: the option, else the recipe's; None:
        per output channel."""
        if self.group_size == PER_CHANNEL:
            return None
        if self.group_size is not None:
            return self.group_size
        w = self.recipe_obj.weight
        return w.group_size if w is not None else None

    @property
    def group_wise_weights(self) -> bool:
        """Whether the recipe's int4 weights come in groups: where a group size applies, and
        always for weight-only int4 (w4a16: with group_size "channel", one group per row)."""
        w = self.recipe_obj.weight
        return self.weight_group_size is not None or (
            w is not None and w.bits == 4 and self.recipe_obj.act is None)

    @property
    def budget_key(self) -> tuple | None:
        return tuple(sorted(self.budget.items())) if self.budget else None

    def fingerprint(self) -> str:
        """What calibration and the quantized graph depend on: two compiles of one model with
        the same fingerprint share calibration statistics (and a saved quantization), with
        different ones never do."""
        keys = ("recipe", "smooth", "smooth_alpha", "rotate", "online_hadamard", "gptq",
                "integer_nonlinear", "bias_correction", "weight_clip", "observer_name", "skip",
                "seed",
                "budget_key", "sensitivity")
        if self.recipe_obj.per_token_int4:  # only where it applies: no other recipe names it
            keys += ("act_clip", "act_symmetric")
            if self.activation_group_size is not None:
                keys += ("activation_group_size",)
        if self.group_size is not None:  # likewise: fingerprints without it stay as they were
            keys += ("group_size",)
        if self.weight_symmetric is not None:
            keys += ("weight_symmetric",)
        if self.learn:
            keys += ("learn", "learn_steps", "learn_time_s")
        if self.sequential is not None:
            keys += ("sequential",)
        if self.quantize_attention is not None:
            keys += ("quantize_attention",)
        return ";".join(f"{k}={getattr(self, k)!r}" for k in keys)

    @classmethod
    def from_user(cls, mode: str | None = None, options: dict[str, Any] | None = None) -> Options:
        if options is not None and not isinstance(options, Mapping):
            raise QCompileConfigError(
                f"options must be a dict of option names to values, got "
                f"{type(options).__name__}; known options: {sorted(known_options())}")
        options = dict(options or {})
        known = known_options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise QCompileConfigError(
                f"unknown qcompile option(s) {unknown}; known options: {sorted(known)}"
            )
        if mode not in MODES:
            raise QCompileConfigError(
                f"unsupported mode {mode!r} for backend 'qcompile'; supported: "
                f"{[m for m in MODES if m]}"
            )
        recipe = options.get("recipe", DEFAULT_RECIPE)
        if recipe not in RECIPES:
            raise QCompileConfigError(
                f"unknown recipe {recipe!r}; known recipes: {sorted(RECIPES)}"
            )
        if "skip" in options:
            skip = options["skip"]
            options["skip"] = (skip,) if isinstance(skip, str) else tuple(skip)
        if "kernels" not in options and os.environ.get("QCOMPILE_KERNELS"):
            options["kernels"] = os.environ["QCOMPILE_KERNELS"]
        tuning = sorted(k for k in ("learn_steps", "learn_time_s") if k in options)
        if tuning and not options.get("learn"):
            raise QCompileConfigError(
                f"option(s) {tuning} tune the learned transforms, which are off: add "
                f"'learn': True (e.g. {{'recipe': 'w4a8', 'learn': True, 'learn_steps': 40}})")
        opts = cls(**options)
        if mode and mode.startswith("max-autotune"):
            opts.autotune = True
        if opts.debug_dir is None:
            opts.debug_dir = os.environ.get("QCOMPILE_DEBUG_DIR") or None
        if os.environ.get("QCOMPILE_VERIFY") == "1":
            opts.verify = True
        opts._validate()
        return opts

    def _validate(self) -> None:
        if self.observer is not None and self.observer not in OBSERVERS:
            raise QCompileConfigError(
                f"unknown observer {self.observer!r}; known observers: {list(OBSERVERS)}"
            )
        if self.kernels not in KERNELS:
            raise QCompileConfigError(
                f"kernels must be one of {list(KERNELS)}, got {self.kernels!r}"
            )
        if self.print_after not in PRINT_AFTER:
            raise QCompileConfigError(
                f"print_after must be one of {list(PRINT_AFTER)}, got {self.print_after!r}"
            )
        alpha = self.smooth_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0.0 <= alpha <= 1.0):
            raise QCompileConfigError(
                f"smooth_alpha must be None (each layer's shift and scale chosen by its output "
                f"error) or SmoothQuant's alpha, a number in [0, 1]; got {alpha!r}")
        for name in ("smooth", "rotate", "online_hadamard", "gptq", "integer_nonlinear",
                     "bias_correction", "weight_clip", "narrow_weights", "inductor", "learn",
                     "sequential", "quantize_attention"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise QCompileConfigError(f"option {name!r} takes True/False, got {value!r}")
        if self.quantize_attention and self.recipe_obj.act is None:
            raise QCompileConfigError(
                f"quantize_attention=True needs quantized activations; recipe "
                f"{self.recipe!r} keeps them float (use w8a8, w8a8-static, w4a8 or w4a4)")
        self._validate_budget()
        self._validate_activation_clip()
        self._validate_activation_symmetric()
        self._validate_activation_group_size()
        self._validate_group_size()
        self._validate_weight_symmetric()
        self._validate_learn()
        if not self.recipe_obj.quantizes:
            on = [n for n in ("smooth", "rotate", "gptq", "bias_correction", "weight_clip",
                              "learn")
                  if getattr(self, n)]
            if on:
                raise QCompileConfigError(
                    f"recipe 'float' quantizes nothing; options {on} need a quantizing recipe"
                )


    def _validate_learn(self) -> None:
        steps, cap = self.learn_steps, self.learn_time_s
        example = "e.g. {'recipe': 'w4a8', 'learn': True, 'learn_steps': 40}"
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise QCompileConfigError(
                f"learn_steps must be an int >= 1, the Adam steps per block ({example}), got "
                f"{steps!r}")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                or not cap > 0):
            raise QCompileConfigError(
                f"learn_time_s must be None (no cap) or a number of seconds > 0 for the whole "
                f"learning pass, got {cap!r}")

    def _validate_group_size(self) -> None:
        g = self.group_size
        if g is None:
            return
        grouped = sorted(n for n, r in RECIPES.items() if r.weight is not None and
                         (r.weight.bits == 4 or n == "mixed"))
        example = "e.g. {'recipe': 'w4a8', 'group_size': 64}"
        r = self.recipe_obj
        if r.name not in grouped:
            why = "its weights are not int4"
            raise QCompileConfigError(
                f"option 'group_size' groups int4 weights (recipes {grouped}); recipe "
                f"{self.recipe!r} takes none: {why} ({example})")
        if g == PER_CHANNEL:
            return
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise QCompileConfigError(
                f"group_size must be an even int >= 2, the input columns sharing one weight "
                f"scale ({example}), or {PER_CHANNEL!r} (one scale per output channel), got "
                f"{g!r}")

    def _validate_weight_symmetric(self) -> None:
        sym = self.weight_symmetric
        if sym is None:
            return
        example = "e.g. {'recipe': 'w4a8', 'group_size': 32, 'weight_symmetric': True}"
        if not isinstance(sym, bool):
            raise QCompileConfigError(
                f"weight_symmetric must be True (no zero point) or False (a zero point per "
                f"group) for group-wise int4 weights ({example}), got {sym!r}")
        if not self.group_wise_weights:
            given = f"with group_size {PER_CHANNEL!r}" if self.group_size == PER_CHANNEL \
                else "without option 'group_size'"
            raise QCompileConfigError(
                f"option 'weight_symmetric' chooses how group-wise int4 weights are "
                f"quantized; recipe {self.recipe!r} has none {given} (per-channel weights "
                f"are symmetric): {example}")

    def _validate_activation_clip(self) -> None:
        clip = self.activation_clip
        if clip is None:
            return
        example = f"e.g. {{'recipe': 'w4a4', 'activation_clip': {DEFAULT_ACTIVATION_CLIP}}}"
        if not self.recipe_obj.per_token_int4:
            with_int4 = sorted(n for n, r in RECIPES.items() if r.per_token_int4)
            raise QCompileConfigError(
                f"option 'activation_clip' clips per-token dynamic int4 activations (recipe "
                f"{' / '.join(map(repr, with_int4))}); recipe {self.recipe!r} has none: drop "
                f"it, or use {example}")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or \
                not 0.0 < clip <= 1.0:
            raise QCompileConfigError(
                f"activation_clip must be a number in (0, 1], the fraction of each token's "
                f"absmax the int4 range covers (1.0: no clipping; {example}), got {clip!r}")
        self.activation_clip = float(clip)

    def _validate_activation_symmetric(self) -> None:
        sym = self.activation_symmetric
        if sym is None:
            return
        if not self.recipe_obj.per_token_int4:
            raise QCompileConfigError(
                f"option 'activation_symmetric' chooses how per-token dynamic int4 activations "
                f"are quantized (recipe 'w4a4'); recipe {self.recipe!r} has none: drop it, or "
                f"use e.g. {{'recipe': 'w4a4', 'activation_symmetric': True}}")
        if not isinstance(sym, bool):
            raise QCompileConfigError(
                f"activation_symmetric must be True (absmax / 7, no zero point) or False (a "
                f"zero point per token), got {sym!r}")

    def _validate_activation_group_size(self) -> None:
        group = self.activation_group_size
        if group is None:
            return
        example = "e.g. {'recipe': 'w4a4', 'activation_group_size': 16}"
        if not self.recipe_obj.per_token_int4:
            raise QCompileConfigError(
                f"option 'activation_group_size' groups per-token dynamic int4 activations "
                f"(recipe 'w4a4'); recipe {self.recipe!r} has none: drop it, or use {example}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 2:
            raise QCompileConfigError(
                f"activation_group_size must be an int >= 2, the elements along K that share "
                f"a scale ({example}), got {group!r}")
        if self.activation_symmetric is False:
            raise QCompileConfigError(
                "activation_group_size quantizes each group symmetrically (its scale the "
                "token's times an integer, no zero point): drop activation_symmetric=False, "
                "or drop activation_group_size for per-token zero points")

    def _validate_budget(self) -> None:
        if self.sensitivity not in SENSITIVITIES:
            raise QCompileConfigError(f"sensitivity must be one of {list(SENSITIVITIES)}, "
                                      f"got {self.sensitivity!r}")
        if self.recipe != "mixed":
            if self.budget is not None:
                raise QCompileConfigError(
                    f"option 'budget' belongs to recipe 'mixed' (per-site precision under a "
                    f"budget), not {self.recipe!r}: use options={{'recipe': 'mixed', "
                    f"'budget': {{...}}}}")
            return
        example = "e.g. {'recipe': 'mixed', 'budget': {'a16': 0.1}}"
        if not isinstance(self.budget, Mapping) or not self.budget:
            raise QCompileConfigError(
                f"recipe 'mixed' needs options['budget'], a dict with one or more of "
                f"{sorted(BUDGET_KEYS)} ({example}); got {self.budget!r}. " + "; ".join(
                    f"{k}: {v}" for k, v in BUDGET_KEYS.items()))
        unknown = sorted(set(self.budget) - set(BUDGET_KEYS))
        if unknown:
            raise QCompileConfigError(f"unknown budget key(s) {unknown}; known: "
                                      f"{sorted(BUDGET_KEYS)} ({example})")
        bounds = {"a16": (0.0, 1.0), "weight_bits": (4.0, 8.0), "bops": (0.0, 4.0),
                  "latency": (0.0, 4.0)}
        for key, value in self.budget.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise QCompileConfigError(f"budget[{key!r}] must be a number, got {value!r}")
            if key == "size":
                if value <= 0:
                    raise QCompileConfigError(
                        f"budget['size'] is a fraction of the int8 size in (0, 1] or a byte "
                        f"count > 1, got {value!r}")
                continue
            lo, hi = bounds[key]
            if not lo <= value <= hi:
                raise QCompileConfigError(
                    f"budget[{key!r}] must be in [{lo:g}, {hi:g}] ({BUDGET_KEYS[key]}), "
                    f"got {value!r}")
        self.budget = dict(self.budget)


def known_options() -> list[str]:
    return [f.name for f in dataclasses.fields(Options) if f.name != "extra"]
