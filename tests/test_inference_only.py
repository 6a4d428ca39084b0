"""Inference only: a call that would need gradients is refused before any compile work,
whether the model is in train() mode or an input requires grad; a model in train() mode
runs, as in eval mode, where no gradient is wanted and no op depends on the mode; a graph
traced with training-only ops (dropout, batch norm with training=True) is refused."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed

from qcompile.artifact import InferenceOnlyError
from qcompile.passes.freeze_params import TrainingModeError
from qcompile.state import state_for_model
from tests.helpers import TinyMLP

RECIPES = ["w8a8", "float"]


def _compiled(model, recipe="w8a8"):
    return torch.compile(model, backend="qcompile", options={"recipe": recipe})


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("input_grad", [False, True])
def test_train_mode_with_grad_is_refused_before_compiling(recipe, input_grad):
    torch.manual_seed(0)
    model = TinyMLP().train()
    cm = _compiled(model, recipe)
    x = torch.randn(2, 16, requires_grad=input_grad)
    with pytest.raises(InferenceOnlyError, match=r"would need gradients.*model\.eval\(\)"):
        cm(x)
    with pytest.raises(InferenceOnlyError, match="requires grad"):
        cm(x)  # every such call, not only the first
    # nothing was quantized or compiled for a call that was refused
    assert not list(state_for_model(cm).artifacts)


def test_the_error_names_the_parameter_or_the_input():
    cm = _compiled(TinyMLP().train())
    with pytest.raises(InferenceOnlyError, match="parameter 'fc1.weight' requires grad"):
        cm(torch.randn(2, 16))
    frozen = _compiled(TinyMLP().requires_grad_(False))
    with pytest.raises(InferenceOnlyError, match="input 'x' requires grad"):
        frozen(torch.randn(2, 16, requires_grad=True))


def test_eval_mode_with_grad_enabled_is_refused_too():
    """Eager PyTorch would give these outputs autograd history (fine-tuning in eval mode
    does this): the quantized ones have none, so the call is refused, not silently
    detached."""
    cm = _compiled(TinyMLP().eval())
    with pytest.raises(InferenceOnlyError, match=r"torch\.no_grad\(\)"):
        cm(torch.randn(2, 16))


@pytest.mark.parametrize("recipe", RECIPES)
def test_train_mode_without_gradients_runs_as_in_eval_mode(recipe):
    """No op of the graph reads the mode, so train() computes the same function; under
    no_grad / inference_mode no gradient is wanted: the call runs, bit for bit as eval."""
    torch.manual_seed(0)
    model = TinyMLP()
    twin = TinyMLP()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = _compiled(twin.eval(), recipe)(x)
        got = _compiled(model.train(), recipe)(x)
    assert torch.equal(got, want) and not got.requires_grad
    with torch.inference_mode():
        assert torch.equal(_compiled(model.train(), recipe)(x), want)


def test_an_input_requiring_grad_runs_under_no_grad():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    cm = _compiled(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = cm(x)
        got = cm(x.clone().requires_grad_(True))
    assert torch.equal(got, want) and not got.requires_grad


def test_frozen_weights_run_with_grad_enabled():
    """With every parameter frozen and no input requiring grad, eager would record no
    autograd history either: nothing is lost, the call runs (also for a graph whose first
    call was refused: it is compiled by the first call it serves)."""
    torch.manual_seed(0)
    model = TinyMLP().train()
    cm = _compiled(model)
    x = torch.randn(3, 16)
    with pytest.raises(InferenceOnlyError):
        cm(x)
    model.requires_grad_(False)
    got = cm(x)
    assert not got.requires_grad
    with torch.no_grad():
        assert torch.equal(got, cm(x))


class _Dropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.fc(x))


class _BatchNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return F.relu(self.bn(self.fc(x)))


@pytest.mark.parametrize("module", [_Dropout, _BatchNorm])
def test_training_only_ops_are_refused_under_no_grad(module):
    """dropout and batch norm in training mode compute something else than in eval mode
    (random masks, batch statistics and running-stat updates): even without gradients,
    such a graph is refused at compile time, asking for model.eval()."""
    cm = _compiled(module().train(), "float")
    with pytest.raises(BackendCompilerFailed, match=r"model\.eval\(\)") as info:
        with torch.no_grad():
            cm(torch.randn(4, 8))
    # Dynamo wraps the backend's error, the pass manager the pass's
    cause = info.value.inner_exception.__cause__
    assert isinstance(cause, TrainingModeError) and "training=True" in str(cause)


@pytest.mark.parametrize("module", [_Dropout, _BatchNorm])
def test_training_only_ops_with_grad_are_refused_at_the_call(module):
    cm = _compiled(module().train(), "float")
    with pytest.raises(InferenceOnlyError, match=r"model\.eval\(\)"):
        cm(torch.randn(4, 8))
