"""`with qcompile.calibrate(compiled_model): ...` — collect activation statistics.

Inside the block every graph of the model runs with its observers; leaving the block
turns the observers into quantization parameters and finalizes (quantizes and lowers)
every graph. The statistics live in the model's ModelState, so graphs compiled later
for new shapes reuse them, and two models never share them.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from qcompile.state import ModelState, state_for_model


class CalibrationError(RuntimeError):
    pass


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
    state: ModelState = state_for_model(model)
    if state.calibrating:
        raise CalibrationError("qcompile.calibrate blocks do not nest for one model")
    state.calibrating = True
    state.progress = _Progress(sys.stderr.isatty() if progress is None else progress)
    ok = False
    try:
        yield state
        ok = True
    finally:
        state.calibrating = False
    if ok:
        if state.batches == 0:
            raise CalibrationError(
                "qcompile.calibrate: no batch ran through the compiled model inside the "
                "block; call compiled_model(batch) for a few representative batches"
            )
        state.progress.close(state.batches)
        artifacts = sorted(state.artifacts, key=lambda a: a.name)
        state.calibrated |= {a.options.fingerprint() for a in artifacts if a.calls_calibrating}
        for artifact in artifacts:
            if artifact.options.fingerprint() in state.calibrated:
                artifact.finalize()
