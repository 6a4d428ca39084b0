"""Recipe "mixed" end to end: a budget buys 16-bit activations and int4 weights where they
cost least, the compiled graph runs them as integer ops (linear_a16w8, linear_w4a8), the
report shows the plan, and the choice survives recompiles and save / load."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import qcompile
from qcompile import annotations
from qcompile.lowering import ops
from qcompile.state import state_for_model
from tests.models.zoo import MODELS


def _calibrated(options, name="llama", seed=0):
    build, make, key = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():  # outlier channels in the norms' outputs, as trained LLMs have
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight[:3] *= 20
    cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
    torch.manual_seed(1)
    with torch.no_grad(), qcompile.calibrate(cm):
        for seq in (8, 9, 10):
            cm(*make(2, seq))
    return model, cm, make, key


def _targets(model) -> list:
    return [n.target for a in state_for_model(model).artifacts for n in a.gm.graph.nodes]


def _plans(cm):
    return [g.precision for g in qcompile.report(cm).graphs if g.precision is not None]


@pytest.mark.slow  # 19 s; the fast tier's a16 candidates: the smoothed-inputs test
def test_a16_budget_widens_the_costliest_activations_and_runs_them_as_integers():
    model, cm, make, key = _calibrated({"recipe": "mixed", "budget": {"a16": 0.25}})
    torch.manual_seed(2)
    x = make(2, 12)
    with torch.no_grad():
        ref, out = getattr(model(*x), key), getattr(cm(*x), key)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean()
    assert cos > 0.97
    (plan,) = _plans(cm)[:1]
    acts = [s for s in plan.sites if s["kind"] == "act"]
    wide = [s["name"] for s in acts if plan.bits[s["name"]] == 16]
    assert len(wide) == math.floor(0.25 * len(acts)) > 0
    # the widened sites are the ones whose 8-bit distortion was largest
    by_cost = sorted(acts, key=lambda s: plan.measured[(s["name"], 8)]
                     - plan.measured[(s["name"], 16)], reverse=True)
    assert set(wide) == {s["name"] for s in by_cost[:len(wide)]}
    targets = _targets(cm)
    assert ops.QUANTIZE_INT16 in targets
    assert {ops.LINEAR_A16W8, ops.LINEAR_A16W8_DQ} & set(targets)
    # the choice helps, as predicted and as run in integers
    assert plan.fake_measured < plan.all8_measured
    assert plan.real_measured is not None
    assert 1 / 3 < plan.real_measured / plan.predicted < 3
    assert plan.rank_correlation is not None and plan.rank_correlation > 0.5
    text = str(qcompile.report(cm))
    assert "mixed precision (budget {'a16': 0.25}" in text and "rank correlation" in text


def test_smoothed_inputs_are_16_bit_candidates_too():
    """With smooth on, the inputs it transformed (sites "in:...@smooth") keep a 16-bit scale,
    so the a16 budget can widen them (before, a smoothed input was silently no candidate)."""
    model, cm, make, key = _calibrated({"recipe": "mixed", "budget": {"a16": 0.25},
                                        "smooth": True, "smooth_alpha": 0.5,
                                        "sensitivity": "hessian"})
    with torch.no_grad():
        cm(*make(1, 7))
    (plan,) = _plans(cm)[:1]
    acts = [s["name"] for s in plan.sites if s["kind"] == "act"]
    assert any(name.endswith("@smooth") for name in acts)
    wide = [name for name in acts if plan.bits[name] == 16]
    assert len(wide) == math.floor(0.25 * len(acts)) > 0
    assert ops.QUANTIZE_INT16 in _targets(cm)


@pytest.mark.slow
def test_weight_bits_budget_runs_int4_weights_and_meets_it():
    model, cm, make, key = _calibrated({"recipe": "mixed", "budget": {"weight_bits": 6},
                                        "sensitivity": "hessian"})
    with torch.no_grad():
        cm(*make(1, 7))
    plan = _plans(cm)[0]
    assert plan.method == "hessian" and plan.measured is None
    used, limit = plan.costs["weight_bits"]
    assert used <= limit == 6 and used < 8
    # the int4 weights are what the graph runs: their Layer's quantized weight is 4-bit
    four = {n.removeprefix("w:") for n, b in plan.bits.items() if b == 4}
    assert four
    for a in state_for_model(model).artifacts:
        for node in a.gm.graph.nodes:
            layer = annotations.get(node, annotations.Layer)
            if layer is not None and layer.qweight is not None:
                assert (layer.qweight.spec.bits == 4) == (layer.name in four), layer.name
    assert not any(b == 16 for b in plan.bits.values())  # no a16 in this budget


def test_group_size_puts_the_int4_layers_in_groups_and_counts_their_multipliers():
    """With options group_size the int4 layers the budget buys are group-wise on the row's
    integer grid (linear_w4a8_grouped, or the int8 GEMM of their q * mult values), the
    8-bit ones stay per channel, and each int4 weight costs 4 + 8 / g bits in the budget."""
    model, cm, make, key = _calibrated({"recipe": "mixed", "budget": {"weight_bits": 6},
                                        "sensitivity": "hessian", "group_size": 16})
    torch.manual_seed(2)
    x = make(2, 12)
    with torch.no_grad():
        ref, out = getattr(model(*x), key), getattr(cm(*x), key)
    assert torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean() > 0.95
    plan = _plans(cm)[0]
    used, limit = plan.costs["weight_bits"]
    assert used <= limit == 6
    four = {n.removeprefix("w:") for n, b in plan.bits.items() if b == 4}
    assert four
    sizes = {s["name"]: s["numel"] for s in plan.sites if s["kind"] == "weight"}
    expected = sum((4 + 8 / 16 if plan.bits[n] == 4 else 8) * k for n, k in sizes.items())
    assert used == pytest.approx(expected / sum(sizes.values()))
    seen = set()
    for a in state_for_model(model).artifacts:
        for node in a.gm.graph.nodes:
            layer = annotations.get(node, annotations.Layer)
            if layer is None or layer.qweight is None:
                continue
            spec = layer.qweight.spec
            if layer.name in four:
                assert spec.granularity == "per_group" and spec.group_size == 16
                assert spec.group_levels is not None
                seen.add(layer.name)
            else:
                # 8 bits, or 7 where this CPU's int8 route needs them (oneDNN without VNNI)
                assert spec.granularity == "per_channel"
                assert spec.bits == layer.weight_bits and spec.bits in (7, 8)
    assert seen == four


@pytest.mark.slow
def test_bops_budget_and_the_pareto_picture(tmp_path):
    pytest.importorskip("matplotlib")
    _, cm, make, _ = _calibrated({"recipe": "mixed", "budget": {"bops": 1.0},
                                  "sensitivity": "measured"})
    plan = _plans(cm)[0]
    used, limit = plan.costs["bops"]
    assert used <= limit + 1e-9
    assert len(plan.frontier) >= 3
    path = qcompile.report(cm).plot_precision(str(tmp_path / "pareto.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_new_shape_keeps_the_widths_and_save_load_restores_them(tmp_path):
    options = {"recipe": "mixed", "budget": {"a16": 0.25}, "sensitivity": "measured"}
    model, cm, make, key = _calibrated(options)
    torch.manual_seed(3)
    shapes = [make(3, 11), make(1, 5)]
    with torch.no_grad():
        want = [getattr(cm(*x), key) for x in shapes]
    plans = _plans(cm)
    assert len({tuple(sorted(p.bits.items())) for p in plans}) == 1
    path = qcompile.save(cm, tmp_path / "mixed.qc.safetensors")
    fresh = torch.compile(copy.deepcopy(model), backend="qcompile", options=options,
                          dynamic=True)
    qcompile.load(fresh, path)
    with torch.no_grad():
        got = [getattr(fresh(*x), key) for x in shapes]
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert ops.QUANTIZE_INT16 in _targets(fresh)


@pytest.mark.slow
def test_an_impossible_budget_is_an_error_that_says_what_is_reachable():
    with pytest.raises(Exception, match="narrowest weights average"):
        _calibrated({"recipe": "mixed", "budget": {"size": 0.3}, "sensitivity": "hessian"})


class _Mlp(torch.nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def test_a_16_bit_input_slower_than_float_on_this_cpu_runs_its_layer_in_float():
    """kernels="auto" on an AVX2 CPU without VNNI: int8 layers of 256 rows beat sgemm, but a
    16-bit input (the int8 GEMM on 512 rows) would not; that layer runs in float32."""
    from qcompile.lowering import cpu_routes

    avx2 = cpu_routes.CpuCapabilities(arch="x86_64", isa="AVX2", avx2=True, onednn=True)
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(1, 256, 256)
    options = {"recipe": "mixed", "budget": {"a16": 0.5}, "kernels": "auto",
               "inductor": False}
    with cpu_routes.override_capabilities(avx2):
        cm = torch.compile(model, backend="qcompile", options=options)
        with torch.no_grad(), qcompile.calibrate(cm):
            cm(x)
        with torch.no_grad():
            y = cm(x)
    assert torch.nn.functional.cosine_similarity(y.flatten(), model(x).flatten(), 0) > 0.99
    rep = qcompile.report(cm)
    (plan,) = _plans(cm)
    (wide,) = [s for s in plan.sites if plan.bits[s["name"]] == 16]
    (layer,) = wide["layers"]
    rec = next(r for r in rep.layers if r.name == layer)
    assert not rec.quantized and "runs in float32" in rec.reason
    assert rec.detail["precision"] == "w8afloat"
    others = [r for r in rep.layers if r.kind == "linear" and r.name != layer]
    assert others and all(r.quantized for r in others)
    assert ops.QUANTIZE_INT16 not in _targets(cm)


@pytest.mark.slow
def test_latency_budget_times_each_shape_once_and_meets_the_budget(tmp_path, monkeypatch):
    from qcompile.lowering import latency

    monkeypatch.setattr(latency, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(latency, "_MEMO", {})
    before = latency.TIMED
    options = {"recipe": "mixed", "budget": {"latency": 1.2}, "sensitivity": "hessian"}
    _, cm, make, _ = _calibrated(options)
    plan = _plans(cm)[0]
    used, limit = plan.costs["latency"]
    assert used <= limit + 1e-9
    timed = latency.TIMED - before
    assert timed > 0 and (tmp_path / "latency.json").exists()
    # another process (an empty memo) finds every shape in the file
    monkeypatch.setattr(latency, "_MEMO", {})
    torch._dynamo.reset()
    _calibrated(options)
    assert latency.TIMED - before == timed
