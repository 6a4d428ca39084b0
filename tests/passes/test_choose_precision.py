"""choose-precision: the budget option, the sensitivities, the integer program, and the
widths it writes for the later passes (recipe "mixed")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qcompile.config import Options, QCompileConfigError
from qcompile.passes import _sensitivity as sens
from qcompile.passes.choose_precision import BudgetError, _Program

# ------------------------------------------------------------------ the option


@pytest.mark.parametrize("options, match", [
    ({"recipe": "mixed"}, "needs options\\['budget'\\]"),
    ({"recipe": "mixed", "budget": {}}, "needs options\\['budget'\\]"),
    ({"recipe": "mixed", "budget": 0.5}, "needs options\\['budget'\\]"),
    ({"recipe": "mixed", "budget": {"bits": 5}}, "unknown budget key"),
    ({"recipe": "mixed", "budget": {"a16": 1.5}}, "must be in \\[0, 1\\]"),
    ({"recipe": "mixed", "budget": {"weight_bits": 3}}, "must be in \\[4, 8\\]"),
    ({"recipe": "mixed", "budget": {"size": 0}}, "fraction of the int8 size"),
    ({"recipe": "mixed", "budget": {"a16": True}}, "must be a number"),
    ({"recipe": "mixed", "budget": {"a16": "0.1"}}, "must be a number"),
    ({"recipe": "mixed", "budget": {"a16": float("nan")}}, "must be a number"),
    ({"recipe": "w8a8-static", "budget": {"a16": 0.1}}, "belongs to recipe 'mixed'"),
    ({"recipe": "mixed", "budget": {"a16": 0.1}, "sensitivity": "exact"}, "sensitivity"),
])
def test_bad_budgets_are_errors_that_say_what_to_give(options, match):
    with pytest.raises(QCompileConfigError, match=match):
        Options.from_user(None, options)


def test_budget_is_part_of_the_calibration_fingerprint():
    a = Options.from_user(None, {"recipe": "mixed", "budget": {"a16": 0.1}})
    b = Options.from_user(None, {"recipe": "mixed", "budget": {"a16": 0.2}})
    assert a.fingerprint() != b.fingerprint()
    assert a.needs_calibration


# ------------------------------------------------------------------ the integer program


def _site(name, kind, candidates, numel=1, layers=()):
    return sens.Site(name, kind, None, candidates, numel, layers or (name.split(":")[-1],))


def _program(omega, weights=(), acts=(), layers=None, act_numel=None):
    sites = [_site(f"w:{n}", "weight", (8, 4), numel) for n, numel in weights]
    sites += [_site(f"in:{n}", "act", (8, 16)) for n in acts]
    layers = layers or {n: (f"w:{n}", f"in:{n}" if n in acts else None, 4) for n, _ in weights}
    return _Program(sites, omega, layers, act_numel or {f"in:{n}": 10 for n in acts})


def test_a16_cap_widens_the_most_sensitive_activations():
    acts = [f"l{i}" for i in range(10)]
    gain = {f"l{i}": 1e-3 * (i + 1) for i in range(10)}  # l9 gains most
    omega = {}
    for n in acts:
        omega[(f"in:{n}", 8)] = gain[n]
        omega[(f"in:{n}", 16)] = 1e-7
    prog = _program(omega, acts=acts, layers={})
    bits = prog.solve({"a16": 0.2})
    assert sorted(n for n, b in bits.items() if b == 16) == ["in:l8", "in:l9"]
    assert prog.cost(bits, {"a16": 0.2})["a16"] == (0.2, 0.2)
    assert sum(b == 16 for b in prog.solve({"a16": 0.0}).values()) == 0


def test_weight_bits_budget_is_met_where_int4_costs_least():
    weights = [("a", 100), ("b", 100), ("c", 200)]
    omega = {("w:a", 8): 0.0, ("w:a", 4): 1.0, ("w:b", 8): 0.0, ("w:b", 4): 0.1,
             ("w:c", 8): 0.0, ("w:c", 4): 0.2}
    prog = _program(omega, weights=weights)
    # 400 weights at 5.5 bits: 1000 of 3200 bits saved; int4 saves 4 bits a weight
    bits = prog.solve({"weight_bits": 5.5})
    assert bits == {"w:a": 8, "w:b": 4, "w:c": 4}
    used, limit = prog.cost(bits, {"weight_bits": 5.5})["weight_bits"]
    assert used <= limit
    assert prog.predicted(bits) == pytest.approx(0.3)
    # the same as a size fraction, and as bytes
    assert prog.solve({"size": 5.5 / 8}) == bits
    assert prog.solve({"size": 275}) == bits  # 275 bytes = 2200 bits
    assert prog.solve({"size": 399}) == {"w:a": 8, "w:b": 4, "w:c": 8}


def test_an_unreachable_budget_says_what_is_reachable():
    prog = _program({("w:a", 8): 0.0, ("w:a", 4): 1.0}, weights=[("a", 10)])
    with pytest.raises(BudgetError, match="narrowest weights average 4 bits"):
        prog.solve({"size": 0.25})


def test_bops_tie_a_layers_weight_and_input_widths():
    # one layer: w4a16 costs 64 per MAC, like w8a8; w8a16 costs 128
    omega = {("w:l", 8): 0.0, ("w:l", 4): 0.5, ("in:l", 8): 1.0, ("in:l", 16): 0.0}
    prog = _program(omega, weights=[("l", 16)], acts=["l"])
    assert prog.solve({"bops": 2.0}) == {"w:l": 8, "in:l": 16}
    assert prog.solve({"bops": 1.0}) == {"w:l": 4, "in:l": 16}
    assert prog.solve({"bops": 0.5}) == {"w:l": 4, "in:l": 8}
    assert prog.cost({"w:l": 4, "in:l": 16}, {"bops": 1.0})["bops"] == (1.0, 1.0)


def test_fixed_sites_keep_their_width():
    omega = {("in:a", 8): 1.0, ("in:a", 16): 0.0, ("in:b", 8): 2.0, ("in:b", 16): 0.0}
    prog = _program(omega, acts=["a", "b"], layers={})
    assert prog.solve({"a16": 0.5}) == {"in:a": 8, "in:b": 16}
    assert prog.solve({"a16": 0.5}, fixed={"in:a": 16}) == {"in:a": 16, "in:b": 8}


# ------------------------------------------------------------------ sensitivities


def test_spearman():
    assert sens.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sens.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert sens.spearman([1, 2], [1, 2]) is None


def test_hutchinson_trace_of_a_linear_map():
    """y = x @ A^T: the Gauss-Newton Hessian with respect to x is A^T A per row, so the
    trace over the whole activation is rows * ||A||_F^2; with respect to A it is
    ||x||_F^2 * (output features)."""
    torch.manual_seed(0)
    a = torch.randn(6, 5)
    x = torch.randn(40, 5)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(a.clone())

        def forward(self, x):
            return F.linear(x, self.a)

    gm = torch.fx.symbolic_trace(M())
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = [sens.Site("x", "act", nodes["x"], (8,), x.numel(), ("m",)),
             sens.Site("w", "weight", nodes["a"], (8,), a.numel(), ("m",))]
    y = x @ a.T
    metric = sens.Distortion([y])
    traces, values = sens.hessian_traces(gm, [x], sites, metric, probes=400)
    # D weighs row r by 1 / (R |y_r|^2): the traces are those of the weighted rows
    w = 1 / (40 * y.pow(2).sum(-1))
    assert traces["x"] == pytest.approx((w.sum() * a.pow(2).sum()).item(), rel=0.1)
    assert traces["w"] == pytest.approx(6 * (w[:, None] * x.pow(2)).sum().item(), rel=0.1)
    assert torch.equal(values["x"], x)


def test_distortion_counts_rows_alike_and_leaves_out_unstable_ones():
    ref = [torch.tensor([[3.0, 4.0], [30.0, 40.0], [1.0, 0.0]])]
    test = [torch.tensor([[3.0, 4.5], [30.0, 40.5], [1.0, 0.0]])]
    d = sens.Distortion(ref)
    assert d(test) == pytest.approx((0.25 / 25 + 0.25 / 2500) / 3)
    # a row a small perturbation changes wholesale (a padded position) is left out
    d.leave_out_unstable(d.relative([torch.tensor([[3.0, 4.0], [30.0, 40.0], [-1.0, 0.0]])]))
    assert (d.rows, d.all_rows) == (2, 3)
    assert d([torch.tensor([[3.0, 4.5], [30.0, 40.0], [5.0, 5.0]])]) == pytest.approx(
        0.25 / 25 / 2)
    # never every row
    d.leave_out_unstable(torch.ones(3))
    assert d.rows == 2
    with pytest.raises(ValueError, match="other rows"):
        d([torch.zeros(2, 2)])


def test_measured_and_hessian_agree_on_a_linear_map():
    """For a linear model the Hessian estimate of one site's distortion is the measured one
    in expectation (isotropic error): their ranking over sites agrees."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32),
                                torch.nn.Linear(32, 8))
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.mul_(1 + 3 * i)
    x = torch.randn(64, 32)
    from qcompile.numerics.specs import QuantSpec
    from qcompile.numerics.weights import quantize_weight_rtn

    weights = {}
    for layer_i, layer in enumerate(model):
        for b in (8, 4):
            qw = quantize_weight_rtn(layer.weight.detach(), QuantSpec(bits=b, axis=0,
                                                                      granularity="per_channel"))
            weights[(f"w:{layer_i}", b)] = qw.dequantize()
    # a flat graph whose weights are get_attr nodes
    flat = torch.fx.GraphModule({f"w{i}": l.weight for i, l in enumerate(model)} |
                                {f"b{i}": l.bias for i, l in enumerate(model)}, _flat_graph(3))
    nodes = {n.target: n for n in flat.graph.nodes if n.op == "get_attr"}
    sites = [sens.Site(f"w:{i}", "weight", nodes[f"w{i}"], (8, 4), 0, (str(i),))
             for i in range(3)]
    fake = sens.FakeQuant(weights, None)
    metric = sens.Distortion(sens.run(flat, [x]))
    measured = {k: metric.mean(e) for k, e in sens.measured(flat, [x], sites, fake,
                                                            metric).items()}
    hessian = sens.hessian(flat, [x], sites, fake, metric, probes=64)
    keys = list(measured)
    assert sens.spearman([measured[k] for k in keys], [hessian[k] for k in keys]) > 0.7
    for k in keys:
        assert hessian[k] == pytest.approx(measured[k], rel=0.6)
    assert all(measured[(s.name, 4)] > measured[(s.name, 8)] for s in sites)


def _flat_graph(n_layers: int) -> torch.fx.Graph:
    g = torch.fx.Graph()
    h = g.placeholder("x")
    for i in range(n_layers):
        w, b = g.get_attr(f"w{i}"), g.get_attr(f"b{i}")
        h = g.call_function(F.linear, (h, w, b))
    g.output(h)
    return g


def test_latency_budget_spends_measured_milliseconds():
    # one layer; int4 weights save nothing, a 16-bit input costs twice the time
    omega = {("w:l", 8): 0.0, ("w:l", 4): 0.5, ("in:l", 8): 1.0, ("in:l", 16): 0.0}
    lat = {"l": {(8, 8): 1.0, (4, 8): 1.0, (8, 16): 2.0, (4, 16): 2.0}}
    prog = _program(omega, weights=[("l", 16)], acts=["l"])
    prog.latency = lat
    assert prog.solve({"latency": 2.0}) == {"w:l": 8, "in:l": 16}
    assert prog.solve({"latency": 1.5}) == {"w:l": 8, "in:l": 8}
    assert prog.cost({"w:l": 8, "in:l": 16}, {"latency": 2.0})["latency"] == (2.0, 2.0)
