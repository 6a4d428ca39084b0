"""Every public entry point refuses bad input with an error that names the argument.

qcompile.numerics.*, calibrate, capture, capture_all, report, save, load, export,
load_repro and the CLI: a wrong dtype, shape, range, device or type is an exception of the
stated type whose message names the argument, never a wrong number or an error from deep
inside PyTorch.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import qcompile
from qcompile import numerics as qn
from qcompile.numerics import QuantSpec
from tests.helpers import TinyMLP

PT = QuantSpec()  # int8 symmetric per-tensor
ASYM = QuantSpec(symmetric=False)
PC = QuantSpec(granularity="per_channel", axis=0)
PG = QuantSpec(granularity="per_group", group_size=4)
X = torch.randn(4, 8)
S1, Z1 = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
SC, ZC = torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int32)
META = torch.empty(4, 8, device="meta")
ACC = torch.randint(-1000, 1000, (4, 8), dtype=torch.int32)
QM, SH = 1 << 30, 31


def _case(id_, fn, exc, arg):
    return pytest.param(fn, exc, arg, id=id_)


NUMERICS = [
    # QuantSpec / weight_spec
    _case("spec-bits-0", lambda: QuantSpec(bits=0), ValueError, "bits"),
    _case("spec-bits-17", lambda: QuantSpec(bits=17), ValueError, "bits"),
    _case("spec-bits-float", lambda: QuantSpec(bits=8.0), TypeError, "bits"),
    _case("spec-bits-bool", lambda: QuantSpec(bits=True), TypeError, "bits"),
    _case("spec-symmetric-str", lambda: QuantSpec(symmetric="no"), TypeError, "symmetric"),
    _case("spec-axis-float", lambda: QuantSpec(granularity="per_channel", axis=0.0), TypeError,
          "axis"),
    _case("spec-group-float", lambda: QuantSpec(granularity="per_group", group_size=4.0),
          TypeError, "group_size"),
    _case("spec-granularity", lambda: QuantSpec(granularity="per_row"), ValueError,
          "granularity"),
    _case("weight_spec-bits-17", lambda: qn.weight_spec(17), ValueError, "bits"),
    _case("weight_spec-group-0", lambda: qn.weight_spec(4, group_size=0), ValueError,
          "group_size"),
    # compute_qparams / choose_qparams / reduce_min_max / dynamic_per_token_qparams
    _case("compute-nan", lambda: qn.compute_qparams(float("nan"), 1.0, PT), ValueError,
          "min_val"),
    _case("compute-inf", lambda: qn.compute_qparams(-1.0, math.inf, PT), ValueError,
          "max_val"),
    _case("compute-min>max", lambda: qn.compute_qparams(1.0, -1.0, PT), ValueError, "min_val"),
    _case("compute-complex", lambda: qn.compute_qparams(torch.tensor(-1 + 1j), 1.0, PT),
          TypeError, "min_val"),
    _case("compute-bool", lambda: qn.compute_qparams(torch.tensor(False), torch.tensor(True),
                                                     PT), TypeError, "min_val"),
    _case("compute-shapes", lambda: qn.compute_qparams(torch.zeros(3), torch.ones(4), PC),
          ValueError, "max_val"),
    _case("compute-meta", lambda: qn.compute_qparams(torch.zeros(3, device="meta"),
                                                     torch.ones(3), PC), ValueError, "min_val"),
    _case("compute-spec", lambda: qn.compute_qparams(-1.0, 1.0, "int8"), TypeError, "spec"),
    _case("choose-int", lambda: qn.choose_qparams(torch.arange(8), PT), TypeError, "x"),
    _case("choose-complex", lambda: qn.choose_qparams(torch.randn(8, dtype=torch.cfloat), PT),
          TypeError, "x"),
    _case("choose-bool", lambda: qn.choose_qparams(torch.ones(8, dtype=torch.bool), PT),
          TypeError, "x"),
    _case("choose-meta", lambda: qn.choose_qparams(META, PT), ValueError, "x"),
    _case("choose-list", lambda: qn.choose_qparams([1.0, 2.0], PT), TypeError, "x"),
    _case("choose-axis", lambda: qn.choose_qparams(X, QuantSpec(granularity="per_channel",
                                                                axis=2)), ValueError, "axis"),
    _case("choose-group", lambda: qn.choose_qparams(torch.randn(4, 6), PG), ValueError,
          "group_size"),
    _case("reduce-int", lambda: qn.reduce_min_max(torch.arange(8), PT), TypeError, "x"),
    _case("per-token-int", lambda: qn.dynamic_per_token_qparams(torch.arange(8)), TypeError,
          "x"),
    _case("per-token-spec", lambda: qn.dynamic_per_token_qparams(X, PT), ValueError, "spec"),
    # expand_qparam / quantize / dequantize / fake_quantize
    _case("expand-shape", lambda: qn.expand_qparam(torch.ones(3), (4, 8), PC), ValueError,
          "t must"),
    _case("quantize-scale-len", lambda: qn.quantize(X, torch.full((3,), 0.1), ZC, PC),
          ValueError, "scale"),
    _case("quantize-zp-len", lambda: qn.quantize(X, SC, torch.zeros(3, dtype=torch.int32), PC),
          ValueError, "zero_point"),
    _case("quantize-scale-rank", lambda: qn.quantize(X, torch.full((4, 1), 0.1), ZC, PC),
          ValueError, "scale"),
    _case("quantize-scale-neg", lambda: qn.quantize(X, torch.tensor(-0.1), Z1, PT), ValueError,
          "scale"),
    _case("quantize-scale-zero", lambda: qn.quantize(X, torch.tensor(0.0), Z1, PT), ValueError,
          "scale"),
    _case("quantize-scale-nan", lambda: qn.quantize(X, torch.tensor(math.nan), Z1, PT),
          ValueError, "scale"),
    _case("quantize-scale-inf", lambda: qn.quantize(X, torch.tensor(math.inf), Z1, PT),
          ValueError, "scale"),
    _case("quantize-scale-nan-channel",
          lambda: qn.quantize(X, torch.tensor([0.1, math.nan, 0.1, 0.1]), ZC, PC), ValueError,
          "scale"),
    _case("quantize-scale-complex", lambda: qn.quantize(X, torch.tensor(0.1 + 0j), Z1, PT),
          TypeError, "scale"),
    _case("quantize-scale-bool", lambda: qn.quantize(X, torch.tensor(True), Z1, PT), TypeError,
          "scale"),
    _case("quantize-scale-meta", lambda: qn.quantize(X, torch.tensor(0.1, device="meta"), Z1,
                                                     PT), ValueError, "scale"),
    _case("quantize-zp-float", lambda: qn.quantize(X, S1, torch.tensor(0.5), ASYM), TypeError,
          "zero_point"),
    _case("quantize-zp-range", lambda: qn.quantize(X, S1, torch.tensor(200), ASYM), ValueError,
          "zero_point"),
    _case("quantize-zp-range-int4",
          lambda: qn.quantize(X, S1, torch.tensor(8), QuantSpec(bits=4, symmetric=False)),
          ValueError, "zero_point"),
    _case("quantize-x-int", lambda: qn.quantize(torch.arange(8), S1, Z1, PT), TypeError, "x"),
    _case("quantize-x-complex", lambda: qn.quantize(X.to(torch.cfloat), S1, Z1, PT), TypeError,
          "x"),
    _case("quantize-x-list", lambda: qn.quantize([0.5], S1, Z1, PT), TypeError, "x"),
    _case("quantize-spec", lambda: qn.quantize(X, S1, Z1, None), TypeError, "spec"),
    _case("dequantize-q-float", lambda: qn.dequantize(X, S1, Z1, PT), TypeError, "q"),
    _case("dequantize-q-bool", lambda: qn.dequantize(X > 0, S1, Z1, PT), TypeError, "q"),
    _case("dequantize-dtype-int",
          lambda: qn.dequantize(torch.zeros(4, dtype=torch.int8), S1, Z1, PT, torch.int32),
          TypeError, "dtype"),
    _case("dequantize-scale-neg",
          lambda: qn.dequantize(torch.zeros(4, dtype=torch.int8), torch.tensor(-1.0), Z1, PT),
          ValueError, "scale"),
    _case("fake-quantize-x-int", lambda: qn.fake_quantize(torch.arange(8), S1, Z1, PT),
          TypeError, "x"),
    _case("fake-quantize-scale-nan",
          lambda: qn.fake_quantize(X, torch.tensor(math.nan), Z1, PT), ValueError, "scale"),
    # int4 packing
    _case("pack-int64", lambda: qn.pack_int4(torch.zeros(4, dtype=torch.int64)), TypeError,
          "x"),
    _case("pack-range", lambda: qn.pack_int4(torch.full((4,), 9, dtype=torch.int8)),
          ValueError, "x"),
    _case("pack-odd", lambda: qn.pack_int4(torch.zeros(3, dtype=torch.int8)), ValueError, "x"),
    _case("pack-meta", lambda: qn.pack_int4(torch.zeros(4, dtype=torch.int8, device="meta")),
          ValueError, "x"),
    _case("unpack-int8", lambda: qn.unpack_int4(torch.zeros(4, dtype=torch.int8)), TypeError,
          "p"),
    # dyadic arithmetic
    _case("multiplier-zero", lambda: qn.quantize_multiplier(0.0), ValueError, "multiplier"),
    _case("multiplier-neg", lambda: qn.quantize_multiplier(-0.5), ValueError, "multiplier"),
    _case("multiplier-nan", lambda: qn.quantize_multiplier(math.nan), ValueError, "multiplier"),
    _case("multiplier-big", lambda: qn.quantize_multiplier(2.0**31), ValueError, "multiplier"),
    _case("multiplier-small", lambda: qn.quantize_multiplier(2.0**-40), ValueError,
          "multiplier"),
    _case("multiplier-str", lambda: qn.quantize_multiplier("0.5"), TypeError, "multiplier"),
    _case("multiplier-bool", lambda: qn.quantize_multiplier(True), TypeError, "multiplier"),
    _case("multiplier-complex-t",
          lambda: qn.quantize_multiplier(torch.tensor([0.5 + 1j])), TypeError, "multiplier"),
    _case("multiplier-bool-t", lambda: qn.quantize_multiplier(torch.tensor([True])), TypeError,
          "multiplier"),
    _case("multiplier-meta-t",
          lambda: qn.quantize_multiplier(torch.ones(3, device="meta")), ValueError,
          "multiplier"),
    _case("multiplier-underflow", lambda: qn.quantize_multiplier(0.5, underflow="clamp"),
          ValueError, "underflow"),
    _case("requant-acc-float", lambda: qn.requantize(ACC.float(), QM, SH), TypeError, "acc"),
    _case("requant-acc-bool", lambda: qn.requantize(ACC > 0, QM, SH), TypeError, "acc"),
    _case("requant-acc-list", lambda: qn.requantize([1, 2], QM, SH), TypeError, "acc"),
    _case("requant-q-range", lambda: qn.requantize(ACC, 1 << 31, SH), ValueError, "q"),
    _case("requant-q-neg", lambda: qn.requantize(ACC, -1, SH), ValueError, "q"),
    _case("requant-q-float", lambda: qn.requantize(ACC, 0.5, SH), TypeError, "q"),
    _case("requant-shift-0", lambda: qn.requantize(ACC, QM, 0), ValueError, "shift"),
    _case("requant-shift-63", lambda: qn.requantize(ACC, QM, 63), ValueError, "shift"),
    _case("requant-shift-neg-t", lambda: qn.requantize(ACC, QM, torch.tensor([-1] * 8)),
          ValueError, "shift"),
    _case("requant-qmin>qmax", lambda: qn.requantize(ACC, QM, SH, 0, 10, -10), ValueError,
          "qmin"),
    _case("requant-out-dtype", lambda: qn.requantize(ACC, QM, SH, 0, -200, 200,
                                                     out_dtype=torch.int8), ValueError,
          "out_dtype"),
    _case("requant-out-dtype-float",
          lambda: qn.requantize(ACC, QM, SH, out_dtype=torch.float32), TypeError, "out_dtype"),
    _case("requant-zp-float", lambda: qn.requantize(ACC, QM, SH, 0.5), TypeError, "zero_point"),
    _case("requant-zp-float-t", lambda: qn.requantize(ACC, QM, SH, torch.full((8,), 0.5)),
          TypeError, "zero_point"),
    _case("requant-q-len", lambda: qn.requantize(ACC, torch.full((3,), QM), SH), ValueError,
          "q"),
    _case("requant-shift-rank", lambda: qn.requantize(ACC, QM, torch.full((2, 4, 8), SH)),
          ValueError, "shift"),
    _case("requant-q-meta", lambda: qn.requantize(ACC, torch.full((8,), QM, device="meta"), SH),
          ValueError, "q"),
    _case("requant-acc-int64-range",
          lambda: qn.requantize(torch.tensor([1 << 40]), QM, SH), ValueError, "acc"),
    _case("shift-p-float", lambda: qn.rounding_shift(torch.ones(3), 2), TypeError, "p"),
    _case("shift-p-int32", lambda: qn.rounding_shift(torch.ones(3, dtype=torch.int32), 2),
          TypeError, "p"),
    _case("shift-0", lambda: qn.rounding_shift(torch.ones(3, dtype=torch.int64), 0),
          ValueError, "shift"),
    _case("shift-63", lambda: qn.rounding_shift(torch.ones(3, dtype=torch.int64), 63),
          ValueError, "shift"),
    _case("shift-neg-t", lambda: qn.rounding_shift(torch.ones(3, dtype=torch.int64),
                                                   torch.tensor([1, -1, 2])), ValueError,
          "shift"),
    _case("shift-float", lambda: qn.rounding_shift(torch.ones(3, dtype=torch.int64), 2.0),
          TypeError, "shift"),
    # observers
    _case("observer-int", lambda: qn.MinMaxObserver().update(torch.arange(8)), TypeError, "x"),
    _case("observer-complex",
          lambda: qn.MinMaxObserver().update(torch.randn(8, dtype=torch.cfloat)), TypeError,
          "x"),
    _case("observer-meta", lambda: qn.MinMaxObserver().update(META), ValueError, "x"),
    _case("observer-list", lambda: qn.MSEObserver().update([1.0]), TypeError, "x"),
    _case("hessian-int", lambda: qn.HessianObserver().update(torch.arange(8)), TypeError, "x"),
    _case("hessian-meta", lambda: qn.HessianObserver().update(META), ValueError, "x"),
    _case("mean-int", lambda: qn.MeanObserver().update(torch.arange(8)), TypeError, "x"),
    _case("mean-meta", lambda: qn.MeanObserver().update(META), ValueError, "x"),
    _case("mean-channels", lambda: _twice(qn.MeanObserver(), X, X[:, :4]), ValueError,
          "channel"),
    _case("mean-axis", lambda: qn.MeanObserver(axis=3).update(X), ValueError, "axis"),
    _case("sample-int", lambda: qn.RowSampleObserver().update(torch.arange(8)), TypeError,
          "x"),
    _case("sample-meta", lambda: qn.RowSampleObserver().update(META), ValueError, "x"),
    _case("sample-0d", lambda: qn.RowSampleObserver().update(torch.tensor(1.0)), ValueError,
          "x"),
    _case("sample-features", lambda: _twice(qn.RowSampleObserver(), X, X[:, :4]), ValueError,
          "features"),
    _case("sample-rows", lambda: qn.RowSampleObserver(rows=0), ValueError, "rows"),
    _case("observer-channels", lambda: _twice(qn.PerChannelMinMaxObserver(), X, X[:, :4]),
          ValueError, "channel"),
    _case("observer-axis", lambda: qn.PerChannelMinMaxObserver(axis=3).update(X), ValueError,
          "axis"),
    _case("observer-axis-type", lambda: qn.PerChannelAbsMaxObserver(axis="last"), TypeError,
          "axis"),
    _case("moving-average-nan", lambda: qn.MovingAverageMinMaxObserver(math.nan), ValueError,
          "averaging_constant"),
    _case("moving-average-str", lambda: qn.MovingAverageMinMaxObserver("0.1"), TypeError,
          "averaging_constant"),
    _case("percentile-0", lambda: qn.PercentileObserver(0.0), ValueError, "percentile"),
    _case("percentile-101", lambda: qn.PercentileObserver(101.0), ValueError, "percentile"),
    _case("percentile-bins-float", lambda: qn.PercentileObserver(bins=4096.0), TypeError,
          "bins"),
    _case("percentile-bins-odd", lambda: qn.PercentileObserver(bins=7), ValueError, "bins"),
    _case("mse-grid-0", lambda: qn.MSEObserver(grid=0), ValueError, "grid"),
    _case("mse-grid-float", lambda: qn.MSEObserver(grid=10.0), TypeError, "grid"),
    _case("mse-ratio", lambda: qn.MSEObserver(min_ratio=1.5), ValueError, "min_ratio"),
    _case("mse-sample", lambda: qn.MSEObserver(sample_size=0), ValueError, "sample_size"),
    _case("mse-seed", lambda: qn.MSEObserver(seed=0.5), TypeError, "seed"),
    _case("observer-name", lambda: qn.observer_for("max"), ValueError, "observer"),
    _case("observer-no-data", lambda: qn.MinMaxObserver().qparams(PT), RuntimeError,
          "no data"),
    _case("observer-spec", lambda: _seen(qn.MinMaxObserver()).qparams("int8"), TypeError,
          "spec"),
    # weights
    _case("rtn-int", lambda: qn.quantize_weight_rtn(torch.ones(4, 8, dtype=torch.int8)),
          TypeError, "w"),
    _case("rtn-rank", lambda: qn.quantize_weight_rtn(torch.ones(8)), ValueError, "w"),
    _case("rtn-meta", lambda: qn.quantize_weight_rtn(META), ValueError, "w"),
    _case("rtn-nan", lambda: qn.quantize_weight_rtn(torch.full((4, 8), math.nan)), ValueError,
          "w"),
    _case("rtn-per-token", lambda: qn.quantize_weight_rtn(X, QuantSpec(granularity="per_token")),
          ValueError, "spec"),
    _case("rtn-group", lambda: qn.quantize_weight_rtn(torch.randn(4, 6), PG), ValueError,
          "group_size"),
    _case("gptq-h-shape", lambda: qn.gptq_quantize(X, torch.eye(4)), ValueError, "H"),
    _case("gptq-h-nan", lambda: qn.gptq_quantize(X, torch.full((8, 8), math.nan)), ValueError,
          "H"),
    _case("gptq-h-complex",
          lambda: qn.gptq_quantize(X, torch.eye(8, dtype=torch.cfloat)), TypeError, "H"),
    _case("gptq-h-meta", lambda: qn.gptq_quantize(X, torch.eye(8, device="meta")), ValueError,
          "H"),
    _case("gptq-damp-neg", lambda: qn.gptq_quantize(X, torch.eye(8), damp=-1.0), ValueError,
          "damp"),
    _case("gptq-damp-nan", lambda: qn.gptq_quantize(X, torch.eye(8), damp=math.nan), ValueError,
          "damp"),
    _case("gptq-block-0", lambda: qn.gptq_quantize(X, torch.eye(8), block_size=0), ValueError,
          "block_size"),
    _case("gptq-block-float", lambda: qn.gptq_quantize(X, torch.eye(8), block_size=2.5),
          TypeError, "block_size"),
    _case("qweight-float", lambda: qn.QuantizedWeight(X, SC, ZC, PC), TypeError, "qweight"),
    _case("qweight-scale-len",
          lambda: qn.QuantizedWeight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), ZC, PC),
          ValueError, "scale"),
    _case("qweight-zp-float",
          lambda: qn.QuantizedWeight(torch.zeros(4, 8, dtype=torch.int8), SC, SC, PC),
          TypeError, "zero_point"),
]


def _twice(obs, a, b):
    obs.update(a)
    obs.update(b)


def _seen(obs):
    obs.update(X)
    return obs


def _check(fn, exc, arg):
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert _names(arg, message), f"the message does not name {arg!r}: {message}"


def _names(arg: str, text: str) -> bool:
    end = r"\b" if arg[-1].isalnum() or arg[-1] == "_" else ""
    return re.search(rf"(?<![\w-]){re.escape(arg)}{end}", text) is not None


@pytest.mark.parametrize("fn,exc,arg", NUMERICS)
def test_numerics_refuse_bad_input(fn, exc, arg):
    _check(fn, exc, arg)


def test_every_numerics_name_is_audited():
    """A new public name in qcompile.numerics gets cases here (or a reason it takes no
    input: constants, exception classes, base classes)."""
    no_input = {"OBSERVERS", "SCALE_EPS", "MultiplierRangeError", "Observer", "RangeObserver"}
    audited = {"HessianObserver", "MeanObserver", "MinMaxObserver",
               "MovingAverageMinMaxObserver", "MSEObserver", "PercentileObserver",
               "PerChannelAbsMaxObserver", "PerChannelMinMaxObserver", "RowSampleObserver",
               "observer_for", "QuantSpec", "choose_qparams", "compute_qparams",
               "dequantize", "dynamic_per_token_qparams", "expand_qparam",
               "fake_quantize", "pack_int4", "quantize", "quantize_multiplier",
               "reduce_min_max", "requantize", "rounding_shift", "unpack_int4", "weight_spec",
               "QuantizedWeight", "gptq_quantize", "quantize_weight_rtn"}
    assert set(qn.__all__) == no_input | audited


def test_valid_input_still_gives_the_same_numbers():
    """The checks refuse; they never change what valid input gives."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    scale, zp = qn.choose_qparams(x, PC)
    q = qn.quantize(x, scale, zp, PC)
    expect = torch.round(x / scale[:, None]).clamp(-128, 127).to(torch.int8)
    assert torch.equal(q, expect)
    assert torch.equal(qn.dequantize(q, scale, zp, PC), q.float() * scale[:, None])
    # a Python float scale and int zero point, as before
    assert torch.equal(qn.quantize(x, 0.1, 0, PT), torch.round(x / 0.1).clamp(-128, 127)
                       .to(torch.int8))
    acc = torch.tensor([[-7, 7, 100]], dtype=torch.int32)
    assert qn.requantize(acc, QM, 33).tolist() == [[-1, 1, 13]]  # /8, ties away from zero
    assert qn.rounding_shift(torch.tensor([-12, 12, 13]), 3).tolist() == [-2, 2, 2]


# ---------------------------------------------------------------------- qcompile.*

STATIC = {"recipe": "w8a8-static"}


def _calibrate(model):
    with torch.no_grad(), qcompile.calibrate(model):
        model(torch.randn(2, 16))


def _calibrate_progress(model):
    with qcompile.calibrate(model, progress="yes"):
        pass


def _compiled():
    return torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)


def _eager():
    return torch.compile(TinyMLP().eval(), backend="eager")


ENTRY = [
    _case("calibrate-plain", lambda: _calibrate(TinyMLP().eval()), TypeError,
          'backend="qcompile"'),
    _case("calibrate-eager", lambda: _calibrate(_eager()), TypeError, 'backend="qcompile"'),
    _case("calibrate-tensor", lambda: _calibrate(torch.ones(3)), TypeError, "model"),
    _case("calibrate-progress", lambda: _calibrate_progress(_compiled()), TypeError,
          "progress"),
    _case("calibrate-no-params", lambda: _calibrate(torch.nn.ReLU()), ValueError, "model"),
    _case("report-plain", lambda: qcompile.report(TinyMLP()), TypeError, 'backend="qcompile"'),
    _case("report-eager", lambda: qcompile.report(_eager()), TypeError, 'backend="qcompile"'),
    _case("report-tensor", lambda: qcompile.report(torch.ones(3)), TypeError, "model"),
    _case("save-plain", lambda: qcompile.save(TinyMLP(), "unused.safetensors"), TypeError,
          'backend="qcompile"'),
    _case("save-path", lambda: qcompile.save(_compiled(), 3), TypeError, "path"),
    _case("export-plain", lambda: qcompile.export(TinyMLP()), TypeError, 'backend="qcompile"'),
    _case("export-eager", lambda: qcompile.export(_eager()), TypeError, 'backend="qcompile"'),
    _case("load-plain", lambda: qcompile.load(TinyMLP(), "missing.safetensors"),
          qcompile.ArtifactMismatchError, 'backend="qcompile"'),
    _case("load-path-type", lambda: qcompile.load(_compiled(), 3), TypeError, "path"),
    _case("load-missing", lambda: qcompile.load(_compiled(), "/nonexistent/x.safetensors"),
          FileNotFoundError, "path"),
    _case("load_repro-type", lambda: qcompile.load_repro(3), TypeError, "path"),
    _case("load_repro-missing", lambda: qcompile.load_repro("/nonexistent/repro"),
          FileNotFoundError, "path"),
    _case("capture-not-callable", lambda: qcompile.capture(3, X), TypeError, "model"),
    _case("capture-no-tensor", lambda: qcompile.capture(TinyMLP(), [[1.0] * 16]), TypeError,
          "example_inputs"),
    _case("capture-meta", lambda: qcompile.capture(TinyMLP(), torch.ones(2, 16, device="meta")),
          ValueError, "example_inputs"),
    _case("capture-options", lambda: qcompile.capture(TinyMLP(), X, options={"recipe": "int3"}),
          qcompile.QCompileConfigError, "recipe"),
    _case("capture-options-type", lambda: qcompile.capture(TinyMLP(), X, options="w8a8"),
          qcompile.QCompileConfigError, "options"),
    _case("capture-dynamic", lambda: qcompile.capture(TinyMLP(), X, dynamic="yes"), TypeError,
          "dynamic"),
    _case("capture_all-not-callable", lambda: qcompile.capture_all(None, X), TypeError,
          "model"),
    _case("capture_all-meta",
          lambda: qcompile.capture_all(TinyMLP(), x=torch.ones(2, 16, device="meta")),
          ValueError, "example_inputs"),
]


@pytest.mark.parametrize("fn,exc,arg", ENTRY)
def test_entry_points_refuse_bad_input(fn, exc, arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check(fn, exc, arg)


def test_every_top_level_name_is_audited():
    audited = {"calibrate", "capture", "capture_all", "report", "save", "load", "export",
               "load_repro"}
    no_input = {"RECIPES", "ArtifactMismatchError", "CalibrationError", "Captured",
                "QCompileConfigError", "QuantizationAccuracyWarning", "Options",
                "known_options"}  # config: test_config.py
    assert set(qcompile.__all__) == audited | no_input


def test_a_compiled_model_not_run_yet_is_accepted():
    """Compiled with qcompile but not called yet: report is empty, not an error."""
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options=STATIC)
    assert qcompile.report(cm).graphs == []
    # the nn.Module of a model compiled and run with qcompile is accepted too
    m = TinyMLP().eval()
    cm = torch.compile(m, backend="qcompile", options={"recipe": "w8a8"})
    with torch.no_grad():
        cm(torch.randn(2, 16))
    assert len(qcompile.report(m).graphs) == 1


# ---------------------------------------------------------------------- the CLI

CLI = [
    pytest.param(["tune", "--shapes", "0x64x64"], "--shapes", id="tune-shape-zero"),
    pytest.param(["tune", "--shapes", "-4x64x64"], "--shapes", id="tune-shape-negative"),
    pytest.param(["tune", "--shapes", "ax64x64"], "--shapes", id="tune-shape-not-int"),
    pytest.param(["tune", "--shapes", "64x64"], "--shapes", id="tune-shape-rank"),
    pytest.param(["tune", "--model", "minilm", "--recipe", "w3a3"], "--recipe",
                 id="tune-recipe"),
    pytest.param(["tune", "--model", "minilm", "--rows", "0"], "--rows", id="tune-rows-zero"),
    pytest.param(["tune", "--model", "minilm", "--rows", "1.5"], "--rows", id="tune-rows-float"),
    pytest.param(["tune", "--model", "bert"], "--model", id="tune-model"),
    pytest.param(["demo", "--recipe", "w3a3"], "--recipe", id="demo-recipe"),
    pytest.param(["demo", "--repeats", "0"], "--repeats", id="demo-repeats"),
    pytest.param(["frobnicate"], "command", id="unknown-command"),
    pytest.param(["sensitivity", "--budget", "a32=0.1"], "--budget", id="budget-key"),
    pytest.param(["sensitivity", "--budget", "a16=lots"], "--budget", id="budget-value"),
    pytest.param(["sensitivity", "--budget", "a16"], "--budget", id="budget-no-value"),
    pytest.param(["sensitivity", "--budget", "weight_bits=2"], "--budget",
                 id="budget-range"),
    pytest.param(["sensitivity", "--model", "bert"], "--model", id="sensitivity-model"),
]


@pytest.mark.parametrize("argv,arg", CLI)
def test_cli_refuses_bad_arguments(argv, arg, capsys):
    """argparse errors (exit status 2, usage on stderr) before any model is loaded."""
    from qcompile.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert _names(arg, err), err
