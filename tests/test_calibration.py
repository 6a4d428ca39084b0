"""The calibration API: `with qcompile.calibrate(compiled_model)`."""

import warnings

import pytest
import torch

import qcompile
from qcompile.artifact import CalibrationRequiredError
from qcompile.calibration import CalibrationError, NothingToCalibrateWarning
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


def _nothing_to_calibrate(cm, batches):
    """Runs the batches in a calibrate block; the outputs and the block's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), qcompile.calibrate(cm):
            outs = [cm(x) for x in batches]
    return outs, [w for w in caught if issubclass(w.category, NothingToCalibrateWarning)]


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "float"])
def test_calibrating_a_recipe_that_needs_none_runs_the_batches_and_warns_once(recipe):
    torch.manual_seed(0)
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options={"recipe": recipe})
    batches = [torch.randn(4, 16) for _ in range(3)]
    outs, caught = _nothing_to_calibrate(cm, batches)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"qcompile.calibrate: nothing to calibrate (recipe {recipe!r} needs no calibration); "
        "the block's 3 batch(es) ran as compiled"
    )
    assert caught[0].filename == __file__  # points at the user's block
    state = state_for_model(cm)
    assert state.observers == {} and state.calibrated == set()
    assert all(a.finalized for a in state.artifacts)
    with torch.no_grad():
        for x, y in zip(batches, outs):
            assert torch.equal(cm(x), y)  # the block ran the model as it runs outside


def test_calibrating_twice_warns_and_keeps_the_first_calibration():
    torch.manual_seed(0)
    cm = _calibrated(TinyMLP().eval(), [torch.randn(4, 16)])
    state = state_for_model(cm)
    calib = [a.ctx.analysis["calib"]["in:fc1"].scale for a in state.artifacts]
    _, caught = _nothing_to_calibrate(cm, [torch.randn(4, 16) * 100])
    assert [str(w.message) for w in caught] == [
        "qcompile.calibrate: nothing to calibrate (recipe 'w8a8-static' was calibrated by "
        "an earlier block); the block's 1 batch(es) ran as compiled"
    ]
    assert [a.ctx.analysis["calib"]["in:fc1"].scale for a in state.artifacts] == calib


def test_an_empty_block_is_an_error_even_after_an_earlier_block():
    torch.manual_seed(0)
    cm = _calibrated(TinyMLP().eval(), [torch.randn(4, 16)])
    with pytest.raises(CalibrationError, match="no batch ran through the compiled model"):
        with qcompile.calibrate(cm):
            pass


def test_an_aborted_block_does_not_count_towards_the_next():
    torch.manual_seed(0)
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), qcompile.calibrate(cm):
        cm(torch.randn(4, 16))
        raise KeyboardInterrupt
    with pytest.raises(CalibrationError, match="no batch ran"):
        with qcompile.calibrate(cm):
            pass
    assert not any(a.finalized for a in state_for_model(cm).artifacts)


def test_one_model_compiled_static_and_dynamic():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    static = torch.compile(m, backend="qcompile", options=STATIC)
    dynamic = torch.compile(m, backend="qcompile", options={"recipe": "w8a8"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        dynamic(x)
        with pytest.raises(CalibrationRequiredError):
            static(x)
    state = state_for_model(m)
    by_recipe = {a.options.recipe: a for a in state.artifacts}
    assert set(by_recipe) == {"w8a8", "w8a8-static"}

    # only the dynamic model ran in a block that names the static one: the static graphs
    # still wait for calibration, so this is the error, not a warning
    with pytest.raises(CalibrationError, match=r"ran through the same model compiled with "
                                               r"other options \(recipe 'w8a8'\)"):
        with torch.no_grad(), qcompile.calibrate(static):
            dynamic(x)
    assert not by_recipe["w8a8-static"].finalized

    # a block naming the dynamic model, which needs nothing: a warning
    _, caught = _nothing_to_calibrate(dynamic, [x])
    assert [str(w.message) for w in caught] == [
        "qcompile.calibrate: nothing to calibrate (recipe 'w8a8' needs no calibration); "
        "the block's 1 batch(es) ran as compiled"
    ]
    assert not by_recipe["w8a8-static"].finalized

    # both run in one block: the static graphs calibrate, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingToCalibrateWarning)
        with torch.no_grad(), qcompile.calibrate(static):
            static(x)
            dynamic(x)
    assert by_recipe["w8a8-static"].finalized
    assert state.calibrated == {by_recipe["w8a8-static"].options.fingerprint()}
    with torch.no_grad():
        assert static(x).shape == dynamic(x).shape == (4, 16)


def test_needs_calibration_error_names_the_graph_and_fits_the_options():
    cm = torch.compile(TinyMLP().eval(), backend="qcompile",
                       options={"recipe": "w8a8", "smooth": True})
    with pytest.raises(CalibrationRequiredError) as info, torch.no_grad():
        cm(torch.randn(4, 16))
    message = str(info.value)
    assert message.startswith("qcompile (graph_")
    assert "option 'smooth' needs activation statistics" in message
    assert "'in:fc1'" in message  # the site that has none
    assert message.endswith("or turn off what needs data: options {'smooth': False}.")

    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)
    with pytest.raises(CalibrationRequiredError) as info, torch.no_grad():
        cm(torch.randn(4, 16))
    assert "recipe 'w8a8-static' quantizes activations with static scales" in str(info.value)
    assert str(info.value).endswith("or choose the dynamic recipe 'w8a8', which needs none.")


def test_a_graph_with_nothing_to_calibrate_runs_at_once():
    """No activation to observe (no linear, no attention): nothing for calibration to do,
    so the graph runs without a calibrate block, and a block through it warns so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.GELU()).eval()
    cm = torch.compile(model, backend="qcompile", options=STATIC)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(cm(x), model(x))
    _, caught = _nothing_to_calibrate(cm, [x])
    assert len(caught) == 1
    assert "has no activation that needs calibration data" in str(caught[0].message)


def test_states_merged_at_a_graph_break_keep_what_finalizing_measured():
    """Two graphs of one model start with their own states (a graph break gives each only
    its parameters); the lookup that sees both merges them, and nothing measured in the
    one merged away is lost: smooth's migrations, what learn-transforms learned, the
    replayed calibration batches and the precision decided would otherwise be measured or
    chosen again, differently, for a graph compiled later."""
    from qcompile.state import state_for_tensors

    a, b = torch.zeros(3), torch.zeros(4)
    first, second = state_for_tensors([a]), state_for_tensors([b])
    assert first is not second
    batch = {"x": torch.ones(2)}
    second.migrations["fp|in:b"] = ("migration", "why")
    second.learned["fp|clip|b"] = torch.ones(4)
    second.calib_batches.append(batch)
    second.precision["fp"] = {"bits": {"in:b": 8}}
    second.batches = 2
    first.precision["fp"] = {"bits": {"in:a": 4}}
    merged = state_for_tensors([a, b])
    assert merged is first and state_for_tensors([b]) is first
    assert merged.migrations == {"fp|in:b": ("migration", "why")}
    assert merged.learned["fp|clip|b"] is second.learned["fp|clip|b"]
    assert merged.calib_batches == [batch]
    assert merged.precision["fp"] == {"bits": {"in:a": 4}}  # the first decision stands
    assert merged.batches == 2
