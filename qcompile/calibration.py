"""`with qcompile.calibrate(compiled_model): ...` — collect activation statistics.

Inside the block every graph of the model runs with its observers; leaving the block
turns the observers into quantization parameters and finalizes (quantizes and lowers)
every graph. The statistics live in the model's ModelState, so graphs compiled later
for new shapes reuse them, and two models never share them.

Generic code calibrates whatever recipe it is given, so a block whose batches ran only
through graphs with nothing to calibrate (a dynamic or weight-only recipe, a static one
calibrated by an earlier block, or graphs with no activation to observe) is harmless:
the batches run as compiled and the block warns once (NothingToCalibrateWarning). It is
an error only when no batch ran at all, or none ran through the compiled model the block
names (its graphs may still be waiting for calibration while the batches went through the
same model compiled with other options).

Threads: a block belongs to the thread that entered it, and only that thread's calls are
calibration batches. Another thread entering a block for the same model is refused
(CalibrationError), and so is another thread's call into a graph that still waits for
calibration, rather than mixing its batch into the statistics; its calls into graphs with
nothing to calibrate run as usual and are no batch of the block. Once the block has
ended, every thread runs the calibrated model.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from contextlib import contextmanager

from qcompile.state import ModelState, compile_fingerprint, state_for_model


class CalibrationError(RuntimeError):
    pass


class NothingToCalibrateWarning(UserWarning):
    """A calibrate block whose batches all ran through graphs with nothing to calibrate."""


class _Progress:
    """One self-overwriting line on stderr, at most every half second."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()

    def update(self, batches: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last > 0.5:
            self.last = now
            print(f"\rqcompile: calibrating, {batches} batches, {now - self.t0:.1f} s",
                  end="", file=sys.stderr, flush=True)

    def close(self, batches: int) -> None:
        if self.enabled:
            print(f"\rqcompile: calibrated on {batches} batches in "
                  f"{time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)


@contextmanager
def calibrate(model, *, progress: bool | None = None):
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"qcompile.calibrate: progress must be True, False or None (a "
                        f"progress line when stderr is a terminal), got {progress!r}")
    state: ModelState = state_for_model(model)
    me = threading.get_ident()
    with state.lock:  # one check-and-set: two threads never both enter
        if state.calibrating_thread == me:
            raise CalibrationError("qcompile.calibrate blocks do not nest for one model")
        if state.calibrating_thread is not None:
            raise CalibrationError(
                "qcompile.calibrate: this model is being calibrated in another thread "
                f"(thread {state.calibrating_thread}); calibrate a model from one thread, "
                "then call it from any")
        # counts are per block: batches of an earlier (or aborted) block calibrate nothing
        state.batches = 0
        for artifact in state.artifacts:
            artifact.calls_calibrating = 0
        state.calibrating_thread = me
        state.progress = _Progress(sys.stderr.isatty() if progress is None else progress)
    ok = False
    try:
        yield state
        ok = True
    finally:
        with state.lock:  # leaving and marking calibrated at once: see _before_unfinalized_call
            artifacts = sorted(state.artifacts, key=lambda a: a.name)
            ran = [a for a in artifacts if a.calls_calibrating]
            observed = {a.options.fingerprint() for a in ran if not a.finalized}
            if ok:
                state.calibrated |= observed
            state.calibrating_thread = None
    if ok:
        if not observed:
            _nothing_calibrated(model, ran)
            return
        state.progress.close(state.batches)
        # the graph that can replay the most calibration batches (a dynamic variant, not the
        # static one the first batch compiled) learns and quantizes first; the others of the
        # model reuse what it found (learn-transforms, sequential GPTQ)
        for artifact in sorted(artifacts, key=lambda a: -a.replayable()):
            if artifact.options.fingerprint() in state.calibrated:
                artifact.finalize()


def _nothing_calibrated(model, ran: list) -> None:
    """No graph that waits for calibration ran in the block: an error if no batch ran
    through the named compiled model, else a warning that the batches calibrated nothing."""
    if not ran:
        raise CalibrationError(
            "qcompile.calibrate: no batch ran through the compiled model inside the "
            "block; call compiled_model(batch) for a few representative batches"
        )
    batches = max(a.calls_calibrating for a in ran)
    fingerprint = compile_fingerprint(model)
    if fingerprint is not None and all(a.options.fingerprint() != fingerprint for a in ran):
        recipes = sorted({a.options.recipe for a in ran})
        raise CalibrationError(
            "qcompile.calibrate: no batch ran through the compiled model inside the block; "
            f"its {batches} batch(es) ran through the same model compiled with other "
            f"options (recipe {', '.join(map(repr, recipes))}). Call the compiled model "
            "given to qcompile.calibrate inside the block"
        )
    reasons = sorted({_why_finalized(a) for a in ran})
    warnings.warn(
        f"qcompile.calibrate: nothing to calibrate ({'; '.join(reasons)}); the block's "
        f"{batches} batch(es) ran as compiled",
        NothingToCalibrateWarning,
        stacklevel=4,  # _nothing_calibrated, calibrate, contextlib's __exit__, the block
    )


def _why_finalized(artifact) -> str:
    options = artifact.options
    if not options.needs_calibration:
        return f"recipe {options.recipe!r} needs no calibration"
    if options.stop_after is not None:
        return f"stop_after={options.stop_after!r} runs the graph as it stands"
    if not artifact.sites:
        return f"{artifact.name} has no activation that needs calibration data"
    return f"recipe {options.recipe!r} was calibrated by an earlier block"
