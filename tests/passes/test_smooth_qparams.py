"""smooth-qparams: after SmoothQuant, static scales describe the smoothed activations."""

import torch

import qcompile
from qcompile.state import state_for_model
from tests.helpers import expect


class Block(torch.nn.Module):
    """A LayerNorm feeding two linears, with one outlier input channel."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
        with torch.no_grad():
            self.norm.weight[3] = 40.0  # the outlier channel SmoothQuant moves into weights

    def forward(self, x):
        h = self.norm(x)
        return self.a(h) + self.b(h)


def test_smoothed_sites_are_rescaled_from_channel_ranges():
    torch.manual_seed(0)
    m = Block().eval()
    batches = [torch.randn(4, 8, 16) for _ in range(3)]
    results = {}
    for smooth in (False, True):
        torch._dynamo.reset()
        cm = torch.compile(m, backend="qcompile",
                           options={"recipe": "w8a8-static", "smooth": smooth})
        with torch.no_grad(), qcompile.calibrate(cm):
            for x in batches:
                cm(x)
        # inside the calibrated range: a fresh batch whose outlier exceeds it clips under
        # either setting, which measures calibration coverage, not smoothing
        x = batches[0]
        with torch.no_grad():
            err = (cm(x) - m(x)).norm() / m(x).norm()
        (variant,) = [v for v in state_for_model(cm).artifacts
                      if v.options.transform_on("smooth") == smooth]
        results[smooth] = (err.item(), variant)
    err_plain, _ = results[False]
    err_smooth, variant = results[True]
    calib = variant.ctx.analysis["calib"]
    site = "in:a"
    assert f"{site}@smooth" in calib
    plain, smoothed = calib[site], calib[f"{site}@smooth"]
    assert smoothed.scale < plain.scale / 2  # the outlier's range moved into the weights
    # its max |x~| too: the symmetric 16-bit scale recipe "mixed" may widen it to
    lo, hi = smoothed.channel_range
    assert smoothed.absmax == max(-float(lo.min()), float(hi.max())) < plain.absmax / 2
    assert smoothed.scale16 == smoothed.absmax / 32767
    # Expected: the graph as smooth left it (1/s folded into the norm); the quantizer of the
    # norm's output, which rewrite-linear places later, reads the new site
    rec = next(r for r in variant.ctx.history if r.name == "smooth-qparams")
    assert not rec.modified
    expect(variant.gm, f"""
        # CHECK: h = torch.nn.functional.layer_norm(l_x_, (16,), norm_weight, norm_bias, 1e-05)
        # CHECK-NEXT: = torch.ops.qcompile.quantize.default(h, {smoothed.scale},
        # CHECK-SAME: {smoothed.zero_point}, -128, 127,
    """)
    expect(variant.gm, f"# CHECK-NOT: {plain.scale}")
    assert variant.ctx.counters["smooth-qparams.sites"] >= 1
    assert err_smooth < err_plain  # and it pays off on this outlier-dominated block


def test_a_transformed_site_keeps_what_it_does_not_transform():
    """x~ = (x - z) / s: the Hessian is transformed, its shrinkage (how much the rows say)
    is not, and the site stays seen."""
    from qcompile.numerics.specs import QuantSpec
    from qcompile.passes.calibrate_qparams import CalibSite
    from qcompile.passes.smooth_qparams import _transformed

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    old = CalibSite(scale=0.1, zero_point=0, hessian=2 / 32 * x.T @ x, hessian_shrinkage=0.25,
                    seen=True, channel_range=(x.amin(0), x.amax(0)), mean=x.mean(0))
    s = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    z = torch.tensor([0.1, 0.0, -0.2, 0.3], dtype=torch.float64)
    new = _transformed(old, s, z, QuantSpec(), None)
    xt = (x - z) / s
    torch.testing.assert_close(new.hessian, 2 / 32 * xt.T @ xt)
    assert new.hessian_shrinkage == 0.25 and new.seen and new.bits == 8
    assert new.absmax == float(xt.abs().max())
