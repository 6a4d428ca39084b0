"""bias-correct: the option, and Before/Expected on a model whose inputs have a large mean
(an offset on x, a ReLU's output), where rounding the weights shifts every output channel:
with the option the calibration data's mean output error is ~0 and the shift sits in the
integer bias; without it the biases are the float ones."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile import annotations as ann
from qcompile.config import RECIPES, Options, QCompileConfigError
from qcompile.lowering import cpu_routes, ops
from qcompile.lowering.registry import arg
from qcompile.numerics.specs import QuantSpec, fake_quantize
from qcompile.pipeline import steps
from qcompile.serialize import read
from tests.helpers import stage
from tests.passes.quantized_graphs import PLAIN_CPU

# 4-bit weights without rotations: a weight error large enough to see in the mean
# the recipe's other data-driven transforms off: bias correction measured alone
W4A8 = {"recipe": "w4a8", "rotate": False, "online_hadamard": False, "smooth": False,
        "weight_clip": False, "kernels": "cpu"}


class Offset(torch.nn.Module):
    """fc1 (with a bias) reads x, fc2 (without one) reads relu(fc1(x)): both inputs have a
    mean far from 0."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):  # x [B, S, 64]
        return self.fc2(F.relu(self.fc1(x)))


def _model_and_batch():
    torch.manual_seed(0)
    return Offset().eval(), torch.randn(4, 16, 64) + 4.0  # the calibration batch


def _rewritten(bias_correction: bool):
    """The graph right after rewrite-linear (bias-correct before it where on), calibrated on
    the batch; `cap.run()` finishes the pipeline."""
    model, x = _model_and_batch()
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap = stage(model, x, before="integer-dataflow",
                    options={**W4A8, "bias_correction": bias_correction})
    return model, x, cap


def _linears(cap) -> dict:
    """layer name -> the quantized op node standing for it."""
    return {ann.get(n, ann.Layer).name: n for n in cap.gm.graph.nodes
            if n.target in (ops.LINEAR_INT8, ops.LINEAR_W4A8)}


def test_option_validated_off_by_default_and_in_the_fingerprint():
    with pytest.raises(QCompileConfigError, match="True/False"):
        Options.from_user(None, {"recipe": "w8a8-static", "bias_correction": "yes"})
    with pytest.raises(QCompileConfigError, match="bias_correction"):
        Options.from_user(None, {"recipe": "float", "bias_correction": True})
    for recipe in set(RECIPES) - {"float"}:
        kw = {"budget": {"weight_bits": 6}} if recipe == "mixed" else {}
        off = Options.from_user(None, {"recipe": recipe, **kw})
        on = Options.from_user(None, {"recipe": recipe, "bias_correction": True, **kw})
        assert not off.transform_on("bias_correction") and on.transform_on("bias_correction")
        assert off.fingerprint() != on.fingerprint()
        # the input means come from calibration, whatever the recipe's activations
        assert on.needs_calibration
        assert ("bias-correct" in [s.name for s in steps(on)]
                and "bias-correct" not in [s.name for s in steps(off)])


def test_corrections_are_the_mean_output_error_on_the_calibration_data():
    model, x, cap = _rewritten(True)
    rec = next(r for r in cap.ctx.history if r.name == "bias-correct")
    assert not rec.modified
    assert rec.counters == {"corrected": 2, "activation_part": 2, "bias_added": 1,
                            "no_mean": 0, "convolutions": 0}
    calib = cap.ctx.analysis["calib"]
    inputs = {"fc1": x, "fc2": F.relu(model.fc1(x))}
    for name, node in _linears(cap).items():
        layer, site = ann.get(node, ann.Layer), calib[f"in:{name}"]
        xin = inputs[name].detach().reshape(-1, inputs[name].shape[-1])  # [n, K]
        # the batch's 64 rows are fewer than the sample's: every row is in it
        xq = fake_quantize(xin, torch.tensor(site.scale), torch.tensor(site.zero_point),
                           QuantSpec(bits=8, symmetric=False))  # the quantize op's x
        xin, xq = xin.double(), xq.double()
        torch.testing.assert_close(site.mean, xin.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(site.act_error, (xin - xq).mean(0), rtol=1e-12,
                                   atol=1e-12)
        w = getattr(model, name).weight.detach().double()
        wq = layer.qweight.dequantize(torch.float64)
        # Expected: the layer's mean output error over the calibration data; without the
        # correction that is the shift itself, with it ~0
        err = xin @ w.T - xq @ wq.T  # [n, N]
        assert err.mean(0).abs().max() > 0.05
        torch.testing.assert_close(layer.bias_correction, err.mean(0), rtol=1e-9, atol=1e-12)
        assert (err - layer.bias_correction).mean(0).abs().max() < 1e-10
        # the report: which layers, and by how much against their bias
        top = float(err.mean(0).abs().max())
        assert cap.ctx.layers[name].detail["bias_correction"].startswith(
            f"max |correction| {top:.3g}")
        assert f"bias-correct(max {top:.2g}" in cap.ctx.layers[name].transforms[-1]
    assert "no bias: one added" in cap.ctx.layers["fc2"].detail["bias_correction"]
    assert cap.ctx.layers["fc2"].transforms[-1].endswith(", bias added)")


@pytest.mark.parametrize("on", [True, False])
def test_int32_bias_holds_the_correction_only_when_on(on):
    model, x, cap = _rewritten(on)
    for name, node in _linears(cap).items():
        layer = ann.get(node, ann.Layer)
        s_x = ann.get(arg(node, "x"), ann.QParams).scale
        s_w = layer.qweight.scale.double().reshape(-1)
        b = getattr(model, name).bias
        b = torch.zeros(s_w.shape, dtype=torch.float64) if b is None else b.detach().double()
        c = layer.bias_correction if on else torch.zeros_like(b)
        bias_node = arg(node, "bias")
        if not on and name == "fc2":  # no bias, no correction: no bias argument at all
            assert bias_node is None and layer.bias_correction is None
            continue
        expected = torch.round((b + c) / (s_x * s_w)).to(torch.int32)
        assert torch.equal(getattr(cap.gm, bias_node.target), expected)


def test_mean_output_error_of_the_quantized_model_shrinks():
    """Through the whole integer pipeline (activation rounding, requantization and all):
    the mean error per output channel on the calibration batch."""
    errors = {}
    for on in (False, True):
        model, x, cap = _rewritten(on)
        with cpu_routes.override_capabilities(PLAIN_CPU):
            cap.run()
        with torch.no_grad():
            err = (model(x) - cap()[0]).reshape(-1, 16)
        errors[on] = float(err.mean(0).abs().mean())
    assert errors[True] < errors[False] / 5, errors


def test_smoothed_inputs_carry_their_mean_divided_by_s():
    """SmoothQuant (after calibration) divides a linear's input by s: smooth-qparams gives
    the new site E[x] / s, and the correction uses it with the smoothed weight."""
    model, x = _model_and_batch()
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap = stage(model, x, before="integer-dataflow",
                    options={"recipe": "w8a8-static", "smooth": True, "smooth_alpha": 0.5,
                             "bias_correction": True, "kernels": "cpu"})
    calib = cap.ctx.analysis["calib"]
    smoothed = {ann.site(n, "input"): ann.get(n, ann.Smoothed).divisor.double()
                for n in cap.gm.graph.nodes if ann.get(n, ann.Smoothed) is not None}
    assert sorted(smoothed) == ["in:fc1@smooth", "in:fc2@smooth"]
    for site, s in smoothed.items():
        torch.testing.assert_close(calib[site].mean, calib[site.removesuffix("@smooth")].mean / s)
    fc1 = ann.get(_linears(cap)["fc1"], ann.Layer)
    w_smoothed = model.fc1.weight.detach().double() * smoothed["in:fc1@smooth"]
    expected = (w_smoothed - fc1.qweight.dequantize(torch.float64)) @ calib[
        "in:fc1@smooth"].mean
    # (the graph holds the smoothed weight in float32)
    torch.testing.assert_close(fc1.bias_correction, expected, rtol=1e-4, atol=1e-6)
    # the rows were sampled before smoothing, under other parameters: no activation part
    assert "activation part none (no row sample" in cap.ctx.layers["fc1"].detail[
        "bias_correction"]


def test_searched_shift_and_scale_keep_both_parts():
    """smooth's searched migration x~ = (x - z) / s: the new site's mean is (E[x] - z) / s,
    and its rounding error is measured again on the transformed row sample, under the new
    parameters (the row sample is kept for the search), so both parts stay."""
    model, x = _model_and_batch()
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap = stage(model, x, before="integer-dataflow",
                    options={"recipe": "w8a8-static", "smooth": True, "bias_correction": True,
                             "kernels": "cpu"})
    calib = cap.ctx.analysis["calib"]
    smoothed = {ann.site(n, "input"): ann.get(n, ann.Smoothed) for n in cap.gm.graph.nodes
                if ann.get(n, ann.Smoothed) is not None and ann.site(n, "input")}
    assert smoothed, "the batch's off-centre channels should make the search move something"
    for site, sm in smoothed.items():
        old = calib[site.removesuffix("@smooth")]
        z = sm.shift if sm.shift is not None else 0
        torch.testing.assert_close(calib[site].mean, (old.mean - z) / sm.divisor.double())
        assert calib[site].act_error is not None
        assert old.rows is None and old.migration is not None  # dropped; the choice kept
    for name in ("fc1", "fc2"):
        detail = cap.ctx.layers[name].detail["bias_correction"]
        assert "no row sample" not in detail


def test_float_epilogue_ops_take_the_corrected_bias():
    """Recipes whose linears add the bias in float (w8a8, w4a4, w4a16) get b + c there."""
    model, x = _model_and_batch()
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap = stage(model, x, before="lower",
                    options={"recipe": "w8a8", "bias_correction": True, "kernels": "cpu"})
    nodes = {ann.get(n, ann.Layer).name: n for n in cap.gm.graph.nodes
             if n.target is ops.LINEAR_DYNAMIC}
    for name, node in nodes.items():
        b = getattr(model, name).bias
        c = ann.get(node, ann.Layer).bias_correction
        expected = (c if b is None else b.detach().double() + c).float()
        assert torch.equal(getattr(cap.gm, arg(node, "bias").target), expected)


def test_saved_quantization_keeps_the_means(tmp_path):
    """qcompile.save keeps each site's mean and rounding error, so a loaded model corrects its
    biases the same way without calibration: bit-identical outputs."""
    options = {**W4A8, "bias_correction": True}
    outs = []
    for load in (False, True):
        model, x = _model_and_batch()
        torch._dynamo.reset()
        cm = torch.compile(model, backend="qcompile", options=options)
        with torch.no_grad():
            if load:
                qcompile.load(cm, tmp_path / "offset.qc.safetensors")
            else:
                with qcompile.calibrate(cm):
                    cm(x)
                qcompile.save(cm, tmp_path / "offset.qc.safetensors")
            outs.append(cm(x[:2]))
    assert torch.equal(*outs)
    meta, tensors = read(tmp_path / "offset.qc.safetensors")
    for key in ("mean", "act_error"):
        assert meta["sites"]["in:fc1"][key] and tensors[f"site/in:fc1/{key}"].shape == (64,)
