"""qcompile: a quantizing compiler for PyTorch.

    model = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-static"})
    with qcompile.calibrate(model):
        for batch in calibration_batches:
            model(batch)
    y = model(x)
    print(qcompile.report(model))
"""

from qcompile.calibration import CalibrationError, calibrate
from qcompile.config import RECIPES, Options, QCompileConfigError, known_options
from qcompile.debug import Captured, capture, capture_all, load_repro
from qcompile.pass_manager import QuantizationAccuracyWarning
from qcompile.report import report
from qcompile.serialize import ArtifactMismatchError, export, load, save

__version__ = "0.1.0"
__all__ = [
    "RECIPES", "ArtifactMismatchError", "CalibrationError", "Captured", "Options",
    "QCompileConfigError", "QuantizationAccuracyWarning", "calibrate", "capture",
    "capture_all", "export", "known_options", "load", "load_repro", "report", "save",
]
