"""measure-sqnr: per-layer SQNR on a probe of a few leading rows of the sample inputs,
sized consistently with the graph's symbolic sizes, and the same figures the full batch
gives (the statistics of a few hundred tokens are the report's)."""

import warnings

import pytest
import torch

import qcompile
from qcompile.passes.measure_sqnr import PROBE_ROWS, probe_inputs
from qcompile.state import state_for_model
from tests.helpers import TinyMLP
from tests.passes.quantized_graphs import walked


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.fc = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16)

    def forward(self, ids):
        return self.fc(self.e(ids))


def _captured(x, dynamic, model=None):
    """The graph as measure-sqnr sees it (weights frozen) and its live sample inputs,
    symbolic sizes at their values (as the compiled artifact passes them)."""
    cap = qcompile.capture((model or TinyMLP()).eval(), x, options={"recipe": "float"},
                           dynamic=dynamic)
    cap.run(until="freeze-params")
    inputs = [int(x.node.hint) if isinstance(x, torch.SymInt) else x for x in cap.inputs()]
    return cap, inputs


def test_graph_unchanged_and_each_layer_measured():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["measure-sqnr"]
    assert after == before  # it runs the graph and the float graph side by side, no more
    rec = next(r for r in cap.ctx.history if r.name == "measure-sqnr")
    assert not rec.modified and rec.counters == {"layers": 3}
    for name in ("fc1", "fc2", "fc3"):
        assert cap.ctx.layers[name].sqnr_db > 20, name


def test_probe_cuts_the_batch_and_the_size_symbols_that_follow_it():
    x = torch.randn(64, 20, 16)  # 20 rows per batch item: 26 items reach PROBE_ROWS
    cap, inputs = _captured(x, dynamic=True)
    probe = probe_inputs(cap.gm, inputs)
    (t,) = [p for p in probe if isinstance(p, torch.Tensor)]
    assert t.shape == (-(-PROBE_ROWS // 20), 20, 16) and torch.equal(t, x[: t.shape[0]])
    sizes = [p for p in probe if not isinstance(p, torch.Tensor)]
    assert t.shape[0] in sizes and 64 not in sizes  # the batch symbol follows the cut
    with torch.no_grad():
        assert cap.gm(*probe)[0].shape[0] == t.shape[0]  # the graph runs on the probe


def test_probe_keeps_inputs_it_cannot_cut_consistently():
    x = torch.randn(3, 16)
    cap, inputs = _captured(x, dynamic=False)
    assert probe_inputs(cap.gm, inputs) is inputs  # already small
    # duck sizing: Dynamo gives a 600 x 600 batch one size symbol for both dims
    ids = torch.randint(0, 100, (600, 600))
    cap, inputs = _captured(ids, dynamic=True, model=Embed())
    assert probe_inputs(cap.gm, inputs) is inputs


def test_report_from_the_probe_matches_the_full_batch(monkeypatch):
    from qcompile.passes import measure_sqnr

    def sqnr_per_layer():
        torch._dynamo.reset()
        torch.manual_seed(0)
        cm = torch.compile(TinyMLP().eval(), backend="qcompile", options={"recipe": "w8a8"})
        with torch.no_grad():
            cm(torch.randn(256, 8, 16))
        (art,) = [a for a in state_for_model(cm).artifacts if a.finalized]
        return {name: rec.sqnr_db for name, rec in art.ctx.layers.items()}

    probed = sqnr_per_layer()  # 64 of 256 items
    monkeypatch.setattr(measure_sqnr, "PROBE_ROWS", 1 << 30)
    full = sqnr_per_layer()
    assert probed.keys() == full.keys() == {"fc1", "fc2"}
    for name in full:
        assert probed[name] > 20 and abs(probed[name] - full[name]) < 1.0, (probed, full)


class _Swamped(torch.nn.Module):
    """A linear whose int8 weight grid is set by one huge weight on an input channel that is
    always 0: every other weight rounds to 0, so the quantized output is all zeros."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            self.fc.weight[:, 0] = 1e6

    def forward(self, x):
        return self.fc(torch.cat([torch.zeros_like(x[..., :1]), x[..., 1:]], dim=-1))


def _run(model, recipe="w8a8"):
    cm = torch.compile(model.eval(), backend="qcompile", options={"recipe": recipe})
    with torch.no_grad():
        cm(torch.randn(32, 16))
    return qcompile.report(cm)


def test_outputs_no_closer_to_float_than_zeros_warn_and_name_the_layer():
    torch._dynamo.reset()
    with pytest.warns(qcompile.QuantizationAccuracyWarning, match=r"values are wrong") as rec:
        rep = _run(_Swamped())
    assert "['fc']" in str(rec[0].message)  # the first layer at or below 10 dB
    assert any("values are wrong" in n for g in rep.graphs for n in g.notes)


def test_a_well_quantized_model_does_not_warn():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", qcompile.QuantizationAccuracyWarning)
        rep = _run(TinyMLP())
    assert not any("values are wrong" in n for g in rep.graphs for n in g.notes)


class _Folded(torch.nn.Module):
    """fc2 reads fc1's output directly, with a few channels 30x the rest: smoothing folds
    its divisor into fc1's output rows, so fc1's float output changes by a per-channel
    scale (the equivalence holds for fc2's output, not for fc1's)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        with torch.no_grad():
            self.fc1.weight[:4] *= 30
            self.fc1.bias[:4] *= 30

    def forward(self, x):
        return self.fc2(self.fc1(x))


def test_layers_smoothing_rescaled_are_compared_with_the_smoothed_float_graph():
    """A layer whose output rows smoothing divided is measured against the float graph
    after smoothing: its SQNR is its quantization error, not the rescaling (which read
    about 0 dB against the graph from before smoothing)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _Folded().eval().requires_grad_(False)
    cm = torch.compile(model, backend="qcompile",
                       options={"recipe": "w8a8-static", "kernels": "cpu", "smooth_alpha": 0.5})
    with torch.no_grad(), qcompile.calibrate(cm):
        cm(torch.randn(64, 16))
    layers = {r.name: r for r in qcompile.report(cm).layers}
    assert "into=linear" in " ".join(layers["fc2"].transforms)  # fc2's input, by fc1's rows
    # measured: fc1 12 dB, fc2 19 dB; against the graph before smoothing fc1 read 0.6 dB
    assert layers["fc1"].sqnr_db > 8 and layers["fc2"].sqnr_db > 8
