"""Sequential GPTQ (quantize-weights with options["sequential"]): with nothing quantized
yet its Hessians are calibration's, its target weight is the regularized least-squares
one, and end to end every linear is quantized in order, once per model: a graph compiled
for another shape reuses the same integers; calibration batches are kept per model and
each graph replays those its inputs fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile import annotations as ann
from qcompile.passes._sequential import DAMP, sequential_gptq, target_weight
from qcompile.state import state_for_model
from tests.helpers import stage
from tests.models.zoo import MODELS


def test_target_weight_is_the_regularized_least_squares_fit():
    gen = torch.Generator().manual_seed(0)
    xf = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    xq = xf + 0.1 * torch.randn(200, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    a, b = xq.T @ xq, xq.T @ xf
    got = target_weight(w, a, b)
    lam = DAMP * float(a.diagonal().mean())
    # min ||X_q W*^T - X_f W^T||^2 + lam ||W* - W||^2 as one stacked least-squares problem
    lhs = torch.cat([xq, lam ** 0.5 * torch.eye(12, dtype=torch.float64)])
    rhs = torch.cat([xf @ w.T, lam ** 0.5 * w.T])
    want = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(got, want)
    # same inputs: the float weight itself
    torch.testing.assert_close(target_weight(w, a, a), w)
    # moments shrunk all the way (rows too few to say anything): W rescaled by the ratio of
    # the mean diagonals, nothing fitted to the rows; halfway: the fit on the shrunk moments
    mu_a, mu_b = float(a.diagonal().mean()), float(b.diagonal().mean())
    torch.testing.assert_close(target_weight(w, a, b, 1.0),
                               w * (mu_b + lam) / (mu_a + lam))
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(target_weight(w, a, b, 0.5),
                               target_weight(w, (a + mu_a * eye) / 2, (b + mu_b * eye) / 2))


def _model():
    build, make, key = MODELS["llama"]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight[:3] *= 20
    return model, make, key


def test_hessians_with_nothing_quantized_are_calibrations():
    """w4a16 (no activation rounding) and a callback that keeps every weight float: the
    replay must see exactly what the calibration observers saw."""
    model, make, key = _model()
    torch.manual_seed(1)
    cap = stage(model, *make(2, 8), before="quantize-weights",
                options={"recipe": "w4a16", "gptq": True, "sequential": True})
    calib = cap.ctx.analysis["calib"]
    seen = {}

    def keep_float(lin, hessian, shrinkage, weight):
        seen[lin] = hessian, shrinkage
        return weight

    eligible = {n for n in cap.gm.graph.nodes
                if n.op == "call_function" and n.target is F.linear and ann.selected(n)}
    assert len(eligible) == 15
    assert sequential_gptq(cap.gm, cap.ctx, [cap.inputs()], eligible, keep_float) == 15
    for lin, (hessian, shrinkage) in seen.items():
        site = calib[ann.site(lin.args[0], "input")]
        torch.testing.assert_close(hessian, site.hessian.float(), rtol=1e-4, atol=1e-5)
        assert shrinkage == pytest.approx(site.hessian_shrinkage, rel=1e-6, abs=1e-9)
        assert 0 < shrinkage < 1  # 16 rows for inputs of 32 and more: some, not all


def test_end_to_end_in_order_and_reused_by_a_new_shape():
    model, make, key = _model()
    cm = torch.compile(model, backend="qcompile",
                       options={"recipe": "w4a8", "gptq": True, "sequential": True},
                       dynamic=False)
    torch.manual_seed(1)
    with torch.no_grad(), qcompile.calibrate(cm):
        for _ in range(3):
            cm(*make(2, 8))
    torch.manual_seed(2)
    with torch.no_grad():
        x = make(2, 8)
        cos = F.cosine_similarity(getattr(model(*x), key).flatten(1),
                                  getattr(cm(*x), key).flatten(1)).mean()
        cm(*make(2, 11))  # a new static graph, compiled after calibration
    assert cos > 0.95
    arts = sorted(state_for_model(model).artifacts, key=lambda a: a.name)
    assert len(arts) == 2
    first, second = (a.ctx.counters for a in arts)
    assert first["quantize-weights.sequential"] == 15  # 2 layers x 7 linears + lm_head
    assert second["quantize-weights.sequential_reused"] == 15
    weights = [{ann.selected(n).name: ann.selected(n).qweight for n in a.gm.graph.nodes
                if ann.selected(n) is not None and ann.selected(n).qweight is not None}
               for a in arts]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k].qweight, weights[1][k].qweight) for k in weights[0])
    details = [r.detail.get("gptq", "") for r in qcompile.report(cm).layers]
    assert any(d.startswith("sequential") for d in details)
    # 48 calibration rows against inputs 64 and 128 wide: the report names the shortfall
    assert any(n.startswith("gptq:") and "48 rows, K = 128" in n
               for g in qcompile.report(cm).graphs for n in g.notes)


def test_replay_takes_the_batches_a_graph_can_run():
    """A dynamic graph replays every batch; the static one the first batch compiled only
    those of its shapes; a graph whose sizes share one symbol only batches where they
    agree."""
    build, make, key = MODELS["bert"]
    torch.manual_seed(0)
    model = build().eval()
    cm = torch.compile(model, backend="qcompile",
                       options={"recipe": "w8a8-static", "gptq": True, "sequential": True})
    torch.manual_seed(1)
    with torch.no_grad(), qcompile.calibrate(cm):
        for seq in (8, 8, 10, 12):
            cm(*make(2, seq))
    arts = sorted(state_for_model(model).artifacts, key=lambda a: a.name)
    assert len(state_for_model(model).calib_batches) == 4
    counts = [len(a.replay.batches(a.state.calib_batches)) for a in arts]
    assert counts == [2, 4]  # static [2, 8]; then dynamic in the sequence length
    assert arts[1].replayable() == 4


def test_few_calibration_tokens_do_not_overfit():
    """w4a8 runs GPTQ by default: calibrated on 8 tokens (fewer rows than any layer's
    inputs) it must stay as close to float as round-to-nearest. Unshrunk, sequential GPTQ
    fits those 8 rows: 0.9800 mean cosine against round-to-nearest's 0.9877."""
    build, make, key = MODELS["llama"]
    cos = {}
    for gptq in (False, True):
        torch.manual_seed(0)
        model = build().eval()
        cm = torch.compile(model, backend="qcompile",
                           options={"recipe": "w4a8", "gptq": gptq}, dynamic=False)
        torch.manual_seed(1)
        with torch.no_grad(), qcompile.calibrate(cm):
            cm(*make(1, 8))
        torch.manual_seed(2)
        with torch.no_grad():
            x = make(1, 8)
            cos[gptq] = float(F.cosine_similarity(getattr(model(*x), key).flatten(1),
                                                  getattr(cm(*x), key).flatten(1)).mean())
        if gptq:
            details = [r.detail.get("gptq", "") for r in qcompile.report(cm).layers]
            shrunk = [float(d.split("shrunk ")[1].split()[0]) for d in details if d]
            assert shrunk and sorted(shrunk)[len(shrunk) // 2] > 0.3  # 8 rows: much shrunk
            # and the report says why, and what to do: LLaMA's MLP down input is 128 wide
            [note] = [n for g in qcompile.report(cm).graphs for n in g.notes
                      if n.startswith("gptq:")]
            assert "mlp.down_proj: 8 rows, K = 128" in note and "more tokens" in note
    assert cos[True] > cos[False] - 0.006


def test_few_rows_are_reported_for_calibration_hessians_too():
    """GPTQ on the float model's Hessians (sequential off) names the shortfall as well."""
    build, make, _ = MODELS["llama"]
    torch.manual_seed(0)
    cm = torch.compile(build().eval(), backend="qcompile",
                       options={"recipe": "w4a8", "sequential": False}, dynamic=False)
    with torch.no_grad(), qcompile.calibrate(cm):
        cm(*make(1, 8))
    with torch.no_grad():
        cm(*make(1, 8))
    notes = [n for g in qcompile.report(cm).graphs for n in g.notes if n.startswith("gptq:")]
    assert len(notes) == 1 and "mlp.down_proj: 8 rows, K = 128" in notes[0], notes
