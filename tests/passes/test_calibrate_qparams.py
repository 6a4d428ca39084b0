"""calibrate-qparams: Before/Expected on Chain (tests/passes/quantized_graphs.py) under
w8a8-static, calibrated on its example input: the observers leave parameters behind."""

from tests.helpers import expect
from tests.passes.quantized_graphs import walked


def test_observers_become_parameters_and_leave():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["calibrate-qparams"]
    expect(before, """
        # CHECK: observe_in_fc1 = self.observe_in_fc1(l_x_)
        # CHECK: h = torch._C._nn.linear(observe_in_fc1, fc1_weight, fc1_bias)
        # CHECK-NEXT: observe_out_fc1 = self.observe_out_fc1(h)
    """)
    # Expected: the graph insert-observers was given, and one (scale, zero point) per site
    assert after == graphs["insert-observers"][0]
    expect(after, "# CHECK-NOT: observe_")
    calib = cap.ctx.analysis["calib"]
    assert sorted(calib) == ["add:fc1", "in:fc1", "in:fc2", "in:fc3", "out:fc1", "out:fc2",
                             "out:fc3"]
    for site in calib.values():
        assert site.seen and site.scale > 0 and -128 <= site.zero_point <= 127
    # fc3 reads the residual sum reshaped: one tensor, two sites, the same parameters
    assert (calib["in:fc3"].scale, calib["in:fc3"].zero_point) == (
        calib["add:fc1"].scale, calib["add:fc1"].zero_point)
    # relu's output is >= 0: asymmetric parameters put its zero at the bottom of the range
    assert calib["in:fc2"].zero_point == -128
    rec = next(r for r in cap.ctx.history if r.name == "calibrate-qparams")
    assert rec.counters == {"sites": 7, "no_data": 0}
