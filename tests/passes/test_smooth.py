"""smooth: SmoothQuant scales from per-channel statistics, folded into a norm, a linear
or a gated product, or applied explicitly; exact function; skipped without statistics."""

import operator

import pytest
import torch
import torch.nn.functional as F

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant
from qcompile.passes.smooth import smoothing_scales
from tests.helpers import expect
from tests.passes.test_fold_norm_affine import (
    PostNorm,
    PreNorm,
    assert_close,
    linear_by_param,
    nodes,
    transformed,
)


class Gated(torch.nn.Module):
    """norm -> gate/up -> silu(gate) * up -> down: the LLaMA MLP."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.RMSNorm(d)
        self.gate = torch.nn.Linear(d, hidden, bias=False)
        self.up = torch.nn.Linear(d, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _stats(cap, scale=10.0):
    gen = torch.Generator().manual_seed(1)
    return {n.args[1].meta["qc_param_name"]: torch.rand(n.args[1].meta["val"].shape[1],
                                                        generator=gen) * scale
            for n in nodes(cap.gm, F.linear)}


def smoothed(model, x, stats=True, alpha=0.5):
    cap, before = transformed(model, x, passes=[], smooth=True, smooth_alpha=alpha)
    if stats:
        cap.ctx.analysis["smooth_stats"] = _stats(cap)
    w0 = {n.args[1].meta["qc_param_name"]: get_constant(cap.gm, n.args[1]).clone()
          for n in nodes(cap.gm, F.linear)}
    code = cap.gm.code
    cap.run_pass("smooth")
    return cap, before, w0, code


def test_scales_formula():
    ax = torch.tensor([4.0, 1.0, 0.0])
    w = [torch.tensor([[1.0, 4.0, 2.0], [-2.0, 1.0, 1.0]])]
    s = smoothing_scales(ax, w, alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0 / 2 ** 0.5, 0.5, 1.0], dtype=s.dtype))


def test_into_norm_gated_linear_and_columns():
    cap, before, w0, code = smoothed(Gated(), torch.randn(2, 5, 16))
    rec = cap.ctx.history[-1]
    assert rec.counters == {"groups": 2, "linears": 3, "into_norm": 1, "into_gated_linear": 1}
    # Expected: the same graph, every 1/s folded into a producer; the constants under the
    # same names hold new values (below)
    assert cap.gm.code == code
    expect(code, """
        # CHECK: h = torch.nn.functional.rms_norm(l_x_, (16,), norm_weight, None)
        # CHECK-NEXT: linear = torch._C._nn.linear(h, gate_weight, None)
        # CHECK-NEXT: silu = torch.nn.functional.silu(linear)
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(h, up_weight, None)
        # CHECK-NEXT: mul = silu * linear_1
        # CHECK-NEXT: linear_2 = torch._C._nn.linear(mul, down_weight, None)
    """)
    stats = cap.ctx.analysis["smooth_stats"]
    gate = linear_by_param(cap.gm, "gate.weight")
    ax = torch.maximum(stats["gate.weight"], stats["up.weight"]).double()  # one input
    s = smoothing_scales(ax, [w0["gate.weight"], w0["up.weight"]], 0.5)
    # Expected: consumers' columns * s, the norm's gamma / s
    torch.testing.assert_close(get_constant(cap.gm, gate.args[1]), w0["gate.weight"] * s)
    norm = nodes(cap.gm, F.rms_norm)[0]
    torch.testing.assert_close(get_constant(cap.gm, norm.args[2]), 1 / s)
    # the down projection's 1/s went into up's rows (silu(gate) * up is linear in up)
    s_down = smoothing_scales(stats["down.weight"].double(), [w0["down.weight"]], 0.5)
    up = linear_by_param(cap.gm, "up.weight")
    torch.testing.assert_close(get_constant(cap.gm, up.args[1]),
                               w0["up.weight"] * s[None, :] / s_down[:, None])
    assert cap.ctx.layers["down"].transforms == ["smooth(alpha=0.5, into=gated linear)"]
    assert_close(cap(), before)


def test_explicit_scale_where_no_producer_can_absorb():
    cap, before, _, code = smoothed(PostNorm(), torch.randn(2, 5, 16))
    expect(code, """
        # CHECK: linear = torch._C._nn.linear(l_x_, up_0_weight, up_0_bias)
        # CHECK-NEXT: gelu = torch._C._nn.gelu(linear)
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(gelu, down_0_weight, down_0_bias)
        # CHECK: x = torch.nn.functional.layer_norm(add, (16,), norms_0_weight, norms_0_bias,
        # CHECK-NEXT: linear_2 = torch._C._nn.linear(x, up_1_weight, up_1_bias)
    """)
    # Expected: x * (1/s) in front of every linear whose input's producer has other readers
    # (the graph input, the norm output: residual adds) or cannot absorb it (gelu)
    expect(cap.gm, """
        # CHECK: mul = l_x_ * smooth_inv_scale_l_x
        # CHECK-NEXT: linear = torch._C._nn.linear(mul, up_0_weight, up_0_bias)
        # CHECK-NEXT: gelu = torch._C._nn.gelu(linear)
        # CHECK: mul_1 = gelu * smooth_inv_scale_gelu
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(mul_1, down_0_weight, down_0_bias)
        # CHECK-NEXT: add = l_x_ + linear_1
        # CHECK-NEXT: x = torch.nn.functional.layer_norm(add, (16,), norms_0_weight, norms_0_bias,
        # CHECK: mul_2 = x * smooth_inv_scale_x
        # CHECK-NEXT: linear_2 = torch._C._nn.linear(mul_2, up_1_weight, up_1_bias)
        # CHECK-NEXT: gelu_1 = torch._C._nn.gelu(linear_2)
        # CHECK: mul_3 = gelu_1 * smooth_inv_scale_gelu_1
        # CHECK-NEXT: linear_3 = torch._C._nn.linear(mul_3, down_1_weight, down_1_bias)
        # CHECK-NEXT: add_1 = x + linear_3
    """)
    muls = [n for n in nodes(cap.gm, operator.mul)
            if getattr(ann.get(n, ann.Smoothed), "explicit", False)]
    assert len(muls) == 4  # post-norm outputs also feed residual adds; gelu outputs
    assert cap.ctx.history[-1].counters["explicit"] == 4
    assert any("scaled explicitly" in n for n in cap.ctx.notes)
    assert_close(cap(), before)


def test_layernorm_bias_and_tied_head():
    cap, before, _, _ = smoothed(PreNorm("layer"), torch.randint(0, 24, (2, 5)))
    counters = cap.ctx.history[-1].counters
    assert counters["into_norm"] == 3 and counters["explicit"] == 2  # down inputs: gelu
    assert_close(cap(), before)


@pytest.mark.parametrize("how", ["missing", "wrong-size"])
def test_skipped_without_statistics(how):
    cap, _ = transformed(Gated(), torch.randn(2, 5, 16), passes=[], smooth=True,
                         smooth_alpha=0.5)
    code = cap.gm.code
    if how == "wrong-size":
        cap.ctx.analysis["smooth_stats"] = {k: torch.ones(7) for k in _stats(cap)}
    cap.run_pass("smooth")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    reason = "no calibration statistics" if how == "missing" else "do not have the input's"
    assert any(n.startswith("smooth") and reason in n for n in cap.ctx.notes)


def test_statistics_from_observers_and_calibration_results():
    from types import SimpleNamespace

    from qcompile.numerics.observers import PerChannelAbsMaxObserver

    cap, before = transformed(Gated(), torch.randn(2, 5, 16), passes=[], smooth=True,
                              smooth_alpha=0.5)
    obs = PerChannelAbsMaxObserver()
    obs.update(torch.randn(4, 16) * 3)
    down = PerChannelAbsMaxObserver()
    down.update(torch.randn(4, 32))
    cap.ctx.state = SimpleNamespace(stats={"gate.weight": obs},
                                    observers={"fingerprint|in:down|channels": down})
    cap.run_pass("smooth")
    assert cap.ctx.history[-1].counters["groups"] == 2
    assert_close(cap(), before)

    cap, before = transformed(Gated(), torch.randn(2, 5, 16), passes=[], smooth=True,
                              smooth_alpha=0.5)
    hi = torch.rand(32) + 1
    cap.ctx.analysis["calib"] = {"in:down": SimpleNamespace(channel_range=(-hi, hi))}
    cap.run_pass("smooth")
    assert cap.ctx.history[-1].counters["groups"] == 1
    assert_close(cap(), before)


class Chain(torch.nn.Module):
    """A linear read only by another linear (v -> o_proj without the attention)."""

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(d, 24, bias=False)
        self.b = torch.nn.Linear(24, d)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("model,x,folded", [
    (PreNorm("layer"), torch.randint(0, 24, (2, 5)), {"into_norm": 3, "explicit": 2}),
    (PreNorm("rms"), torch.randint(0, 24, (2, 5)), {"explicit": 5}),  # no beta for z
    (PostNorm(), torch.randn(2, 5, 16), {"explicit": 4}),
    (Gated(), torch.randn(2, 5, 16), {"explicit": 2}),  # a gated product takes no shift
    (Chain(), torch.randn(2, 5, 16), {"into_linear": 1, "explicit": 1}),
], ids=["layernorm", "rmsnorm", "post-norm", "gated", "linear"])
def test_shift_and_scale_fold_exactly(model, x, folded):
    """A migration (as a loaded quantization brings it: no rows needed) with a shift and a
    scale on every group: folded into a LayerNorm's gamma and beta, a linear's rows and bias,
    or applied explicitly; the function is the same in float64."""
    from qcompile.passes._migration import Migration
    from qcompile.passes._structure import layer_name
    from qcompile.passes.calibrate_qparams import CalibSite

    cap, before = transformed(model, x, passes=[], smooth=True)
    gen = torch.Generator().manual_seed(3)
    cap.ctx.analysis["calib"] = {
        f"in:{layer_name(n)}": CalibSite(migration=Migration(
            "test", torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.25,
            torch.randn(k, generator=gen, dtype=torch.float64)))
        for n in nodes(cap.gm, F.linear) for k in [n.args[1].meta["val"].shape[1]]}
    cap.run_pass("smooth")
    counters = cap.ctx.history[-1].counters
    assert {k: v for k, v in counters.items() if k in ("into_norm", "into_linear",
                                                      "into_gated_linear", "explicit")} == folded
    assert counters["shifted"] == counters["groups"] == sum(folded.values())
    assert all(t.startswith("smooth(test, into=") for layer in cap.ctx.layers.values()
               for t in layer.transforms if t.startswith("smooth"))
    assert all(layer.detail["smooth"] == "test: as saved" for layer in cap.ctx.layers.values())
    shifted = [n for n in cap.gm.graph.nodes if ann.get(n, ann.Smoothed) is not None]
    assert all(ann.get(n, ann.Smoothed).shift is not None for n in shifted)
    assert_close(cap(), before, rtol=1e-11)


def test_search_needs_rows_and_keeps_what_no_candidate_beats():
    """Searching (smooth_alpha None) without calibration rows skips the group and says why;
    a group whose rows no shift or scale helps (no outliers) is left unchanged, reported."""
    from qcompile.passes.calibrate_qparams import CalibSite

    cap, _ = transformed(Chain(), torch.randn(2, 5, 16), passes=[], smooth=True)
    code = cap.gm.code
    cap.run_pass("smooth")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    assert any("no calibration rows" in n for n in cap.ctx.notes)

    cap, _ = transformed(Chain(), torch.randn(2, 5, 16), passes=[], smooth=True,
                         recipe="w8a8-static")
    code = cap.gm.code
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(128, generator=gen)
    for layer, k in (("a", 16), ("b", 24)):
        # every channel holds the values +-v (one range, centred at 0) and every weight
        # column has one magnitude: a shift is 0 and every scale is uniform, which
        # quantization does not see
        rows = torch.stack([torch.cat((v, -v))[torch.randperm(256, generator=gen)]
                            for _ in range(k)], dim=1)
        cap.ctx.analysis.setdefault("calib", {})[f"in:{layer}"] = CalibSite(
            channel_range=(rows.amin(0), rows.amax(0)), rows=rows)
    for lin in nodes(cap.gm, F.linear):
        w = get_constant(cap.gm, lin.args[1])
        w.copy_(torch.sign(torch.randn(w.shape, generator=gen, dtype=w.dtype)) * 0.1)
    cap.run_pass("smooth")
    assert cap.ctx.history[-1].counters == {"unchanged": 2}
    assert cap.gm.code == code
    assert cap.ctx.layers["a"].detail["smooth"].startswith("unchanged: no shift or scale")
    assert not any(t.startswith("smooth") for t in cap.ctx.layers["a"].transforms)


class NormMLP(torch.nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)
        with torch.no_grad():  # BERT's LayerNorm outliers: one channel off-centre, one wide
            self.norm.bias[5], self.norm.weight[9] = 30.0, 12.0

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


def test_search_through_the_pipeline_cuts_the_error_of_outlier_channels():
    """w8a8-static with outlier channels in a LayerNorm's output: the shift and scale chosen
    on the calibration rows (into the norm; explicit after GELU) make the integer model's
    outputs closer to float than no smoothing does, and the report says what was measured."""
    import qcompile

    model = NormMLP().eval()
    gen = torch.Generator().manual_seed(0)
    calib, x = torch.randn(8, 16, 32, generator=gen), torch.randn(4, 16, 32, generator=gen)
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for on in (False, True):
        torch._dynamo.reset()
        cm = torch.compile(model, backend="qcompile", options={
            "recipe": "w8a8-static", "smooth": on, "kernels": "reference"})
        with torch.no_grad():
            with qcompile.calibrate(cm):
                cm(calib)
            errors[on] = float((cm(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errors[True] < errors[False] / 2, errors
    report = qcompile.report(cm)
    up = next(layer for layer in report.layers if layer.name == "up")
    assert up.transforms == [t for t in up.transforms if "into=norm" in t] and up.transforms
    assert "output error" in up.detail["smooth"]
    notes = [n for g in report.graphs for n in g.notes if n.startswith("smooth: 2 group(s)")]
    assert notes and "2 measured here" in notes[0]  # the first graph; a recompile reuses
    assert all("unchanged" in n for n in notes)


def test_no_explicit_transform_after_an_integer_producer_and_the_report_says_so():
    """With integer GELU (integer_nonlinear), the down projection's input comes from an
    integer op that cannot absorb a shift and scale: smooth leaves the group alone, and its
    report entry says it was skipped rather than naming the migration it measured."""
    import qcompile

    model = NormMLP().eval()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(8, 16, 32, generator=gen)
    torch._dynamo.reset()
    cm = torch.compile(model, backend="qcompile", options={
        "recipe": "w8a8-static", "integer_nonlinear": True, "kernels": "reference"})
    with torch.no_grad(), qcompile.calibrate(cm):
        cm(calib)
    report = qcompile.report(cm)
    down = next(layer for layer in report.layers if layer.name == "down")
    assert down.detail["smooth"].startswith("skipped ("), down.detail["smooth"]
    assert not any(t.startswith("smooth") for t in down.transforms)
    assert any("down" in n and "comes from an integer op" in n
               for g in report.graphs for n in g.notes)
