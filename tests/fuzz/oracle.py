"""What must hold for every random model under every recipe: `check_case(case, recipe)`.

1. No crash. Any exception fails the case, except the documented refusals in
   ACCEPTED_ERRORS, each a clear error for something qcompile refuses on purpose (the
   grammar never builds those situations; the list says what a fuzzer that did may see).
2. The outputs have the float model's structure, shapes and dtypes.
3. Nothing falls back to float silently: every linear the model computes and every
   attention it runs appears in `qcompile.report(model)`, quantized or with a reason.
4. The output is close to the float model's (the eager model in the same dtype): cosine
   similarity of the whole first output >= CLOSE[recipe][dtype]. The bounds come from
   tests/models/test_quantized_models.py (w8a8 0.999, w8a8-static 0.995, w4a16 and w4a8
   0.97, w4a4 0.85 per output row of 2-layer transformers), loosened because a fuzz model
   chains up to about a dozen quantized linears with nothing to condition them (the
   equivalence transforms of the 4-bit recipes have little structure to work with), and
   again for bfloat16 / float16, whose own rounding is 2**-8 / 2**-11 per op. A case whose
   float output is (nearly) zero compares by absolute error instead.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import qcompile
from qcompile.artifact import InferenceOnlyError
from qcompile.calibration import CalibrationError
from qcompile.config import Options
from qcompile.passes.freeze_params import TrainingModeError
from tests.fuzz.grammar import Case, build_model, count_attention, make_input, model_linears

# Errors qcompile raises on purpose, with a substring of the message that says what to do.
ACCEPTED_ERRORS = (
    # a model in training mode (dropout / batch norm with training=True): call model.eval()
    (TrainingModeError, "model.eval()"),
    # an input that requires grad under grad mode: inference only
    (InferenceOnlyError, "torch.no_grad()"),
    # a calibrate block through which no batch ran (e.g. only 0-row batches)
    (CalibrationError, "no batch ran"),
)

_FP32 = {"float": 0.9999, "w8a8": 0.99, "w8a8-static": 0.98, "w4a16": 0.93, "w4a8": 0.85,
         "w4a4": 0.6, "w4a4-static": 0.6}
_LOW = {"float": 0.995, "w8a8": 0.98, "w8a8-static": 0.97, "w4a16": 0.92, "w4a8": 0.83,
        "w4a4": 0.6, "w4a4-static": 0.6}
CLOSE = {recipe: {"float32": _FP32[recipe], "bfloat16": _LOW[recipe], "float16": _LOW[recipe]}
         for recipe in _FP32}

CALIBRATION_SEEDS = (101, 102)
CALIBRATION_BATCH = 8
EVAL_SEED = 7


class FuzzFailure(AssertionError):
    pass


def options_for(case: Case, recipe: str) -> dict:
    return {"recipe": recipe, "kernels": case.kernels, **dict(case.options)}


def compile_and_run(case: Case, recipe: str):
    """(eager model, compiled model, input, eager output, compiled output)."""
    torch._dynamo.reset()
    model = build_model(case)
    options = options_for(case, recipe)
    cm = torch.compile(model, backend="qcompile", options=options, dynamic=case.dynamic)
    x = make_input(case, case.batch, case.seq, EVAL_SEED)
    with torch.no_grad():
        try:
            ref = model(x)
        except Exception as exc:  # a mistake of the grammar, not of qcompile
            raise FuzzFailure(f"the float model itself fails: {exc!r}") from exc
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if Options.from_user(None, options).needs_calibration:
            with qcompile.calibrate(cm, progress=False):
                for seed in CALIBRATION_SEEDS:
                    cm(make_input(case, CALIBRATION_BATCH, case.calib_seq, seed))
        out = cm(x)
    return model, cm, x, ref, out


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_structure(ref, out) -> None:
    refs, outs = _flat(ref), _flat(out)
    if len(refs) != len(outs):
        raise FuzzFailure(f"compiled model returns {len(outs)} outputs, float {len(refs)}")
    for i, (r, o) in enumerate(zip(refs, outs)):
        if not isinstance(o, torch.Tensor):
            raise FuzzFailure(f"output {i} is {type(o).__name__}, not a tensor")
        if o.shape != r.shape or o.dtype != r.dtype:
            raise FuzzFailure(f"output {i}: {tuple(o.shape)} {o.dtype}, float model gives "
                              f"{tuple(r.shape)} {r.dtype}")


def check_report(case: Case, model, cm, recipe: str) -> None:
    rep = qcompile.report(cm)
    layers = {layer.name: layer for layer in rep.layers}
    silent = [layer.name for layer in layers.values() if not layer.quantized and not layer.reason]
    if silent:
        raise FuzzFailure(f"layers left float without a reason: {silent}\n{rep}")
    missing = [name for name in model_linears(model) if name not in layers]
    if missing:
        raise FuzzFailure(f"linears missing from the report (float, silently): {missing}\n{rep}")
    attention = [layer for layer in layers.values() if layer.kind == "attention"]
    want = count_attention(case.blocks)
    if len(attention) != want:
        raise FuzzFailure(f"the model runs {want} attention(s), the report names "
                          f"{len(attention)}: {[a.name for a in attention]}\n{rep}")


def check_close(case: Case, recipe: str, ref, out) -> float | None:
    """The cosine of the first output against float (None for an empty output)."""
    r, o = _flat(ref)[0].double(), _flat(out)[0].double()
    if r.numel() == 0:
        return None
    if not torch.isfinite(o).all() and torch.isfinite(r).all():
        raise FuzzFailure(f"non-finite output where float is finite: {o}")
    scale = float(r.norm()) / r.numel() ** 0.5
    if scale < 1e-4:  # (nearly) zero float output: the cosine says nothing
        err = float((o - r).abs().max())
        if err > 1e-2:
            raise FuzzFailure(f"float output is ~0, compiled differs by {err}")
        return None
    cos = float(F.cosine_similarity(r.flatten(), o.flatten(), dim=0))
    bound = CLOSE[recipe][case.dtype]
    if not cos >= bound:
        raise FuzzFailure(f"cosine to float {cos:.5f} < {bound} for {recipe} ({case.dtype})")
    return cos


def check_case(case: Case, recipe: str) -> dict:
    """Run one case; raise FuzzFailure (or the unexpected exception) when a property fails.
    Returns what was measured: {"cosine": ..., "refused": error or None}."""
    try:
        model, cm, x, ref, out = compile_and_run(case, recipe)
    except Exception as exc:
        for kind, text in ACCEPTED_ERRORS:
            if isinstance(exc, kind) and text in str(exc):
                return {"cosine": None, "refused": exc}
        raise
    check_structure(ref, out)
    check_report(case, model, cm, recipe)
    return {"cosine": check_close(case, recipe, ref, out), "refused": None}
