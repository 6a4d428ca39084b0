"""The calibration API: `with qcompile.calibrate(compiled_model)`."""

import pytest
import torch

import qcompile
from qcompile.artifact import CalibrationRequiredError
from qcompile.calibration import CalibrationError
from qcompile.state import state_for_model
from tests.helpers import TinyMLP

STATIC = {"recipe": "w8a8-static"}


def _calibrated(model, batches, **options):
    cm = torch.compile(model, backend="qcompile", options={**STATIC, **options}, dynamic=True)
    with torch.no_grad(), qcompile.calibrate(cm):
        for x in batches:
            cm(x)
    return cm


def test_needs_calibration_error_says_how():
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)
    with pytest.raises(CalibrationRequiredError, match="with qcompile.calibrate"):
        with torch.no_grad():
            cm(torch.randn(4, 16))


def test_no_batches_is_an_error():
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)
    with pytest.raises(CalibrationError, match="no batch"):
        with qcompile.calibrate(cm):
            pass


def test_calibration_survives_recompile_for_new_shapes():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    cm = _calibrated(m, [torch.randn(4, 16) for _ in range(3)])
    state = state_for_model(cm)
    n_obs = len(state.observers)
    with torch.no_grad():
        y = cm(torch.randn(2, 7, 16))  # a new rank: Dynamo recompiles, no new calibration
    assert y.shape == (2, 7, 16)
    assert len(state.observers) == n_obs  # the same statistics were reused
    assert all(a.finalized for a in state.artifacts)


def test_calibration_does_not_leak_between_models():
    torch.manual_seed(0)
    a, b = TinyMLP().eval(), TinyMLP().eval()
    ca = _calibrated(a, [torch.randn(4, 16) * 10])
    cb = torch.compile(b, backend="qcompile", options=STATIC)
    assert state_for_model(ca) is not state_for_model(cb)
    with pytest.raises(CalibrationRequiredError):
        with torch.no_grad():
            cb(torch.randn(4, 16))  # b was never calibrated: a's statistics must not apply


def test_different_options_do_not_share_calibration():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    _calibrated(m, [torch.randn(4, 16)])
    other = torch.compile(m, backend="qcompile", options={**STATIC, "observer": "mse"})
    with pytest.raises(CalibrationRequiredError):
        with torch.no_grad():
            other(torch.randn(4, 16))


def test_scales_come_from_the_calibration_data():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    small = _calibrated(m, [torch.randn(8, 16)])
    s_small = [a.ctx.analysis["calib"] for a in state_for_model(small).artifacts][0]
    m2 = TinyMLP().eval()
    m2.load_state_dict(m.state_dict())
    big = _calibrated(m2, [torch.randn(8, 16) * 8])
    s_big = [a.ctx.analysis["calib"] for a in state_for_model(big).artifacts][0]
    site = "in:fc1"
    assert s_big[site].scale > 4 * s_small[site].scale


def test_progress_display(capsys):
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)
    with torch.no_grad(), qcompile.calibrate(cm, progress=True):
        for _ in range(2):
            cm(torch.randn(4, 16))
    assert "calibrated on 2 batches" in capsys.readouterr().err
