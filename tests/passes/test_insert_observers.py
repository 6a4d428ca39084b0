"""insert-observers: Before/Expected on Chain (tests/passes/quantized_graphs.py) under
w8a8-static; dynamic recipes do not run it."""

from qcompile.config import Options
from qcompile.pipeline import steps
from tests.helpers import expect
from tests.passes.quantized_graphs import walked


def test_identity_observers_on_every_quantized_activation():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["insert-observers"]
    expect(before, """
        # CHECK: h = torch._C._nn.linear(l_x_, fc1_weight, fc1_bias)
        # CHECK-NEXT: relu = h.relu()
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(relu, fc2_weight, fc2_bias)
        # CHECK-NEXT: h_1 = h + linear_1
        # CHECK-NEXT: reshape = h_1.reshape(-1, 16)
        # CHECK-NEXT: linear_2 = torch._C._nn.linear(reshape, fc3_weight, fc3_bias)
        # CHECK-NEXT: return (linear_2,)
    """)
    # Expected: each linear's input ("in:<layer>") and output ("out:<layer>") observed, and
    # the residual sum of two quantized values ("add:<layer>", after the first side a
    # quantized linear writes); every reader reads the observer
    expect(after, """
        # CHECK: observe_in_fc1 = self.observe_in_fc1(l_x_)
        # CHECK: h = torch._C._nn.linear(observe_in_fc1, fc1_weight, fc1_bias)
        # CHECK-NEXT: observe_out_fc1 = self.observe_out_fc1(h)
        # CHECK-NEXT: relu = observe_out_fc1.relu()
        # CHECK-NEXT: observe_in_fc2 = self.observe_in_fc2(relu)
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(observe_in_fc2, fc2_weight, fc2_bias)
        # CHECK-NEXT: observe_out_fc2 = self.observe_out_fc2(linear_1)
        # CHECK-NEXT: h_1 = observe_out_fc1 + observe_out_fc2
        # CHECK-NEXT: observe_add_fc1 = self.observe_add_fc1(h_1)
        # CHECK-NEXT: reshape = observe_add_fc1.reshape(-1, 16)
        # CHECK-NEXT: observe_in_fc3 = self.observe_in_fc3(reshape)
        # CHECK-NEXT: linear_2 = torch._C._nn.linear(observe_in_fc3, fc3_weight, fc3_bias)
        # CHECK-NEXT: observe_out_fc3 = self.observe_out_fc3(linear_2)
        # CHECK-NEXT: return (observe_out_fc3,)
    """)
    rec = next(r for r in cap.ctx.history if r.name == "insert-observers")
    assert rec.counters == {"inputs": 3, "outputs": 3, "attention": 0, "residual_adds": 1}


def test_dynamic_recipes_observe_nothing():
    assert "insert-observers" not in [s.name for s in steps(Options.from_user(None, {
        "recipe": "w8a8"}))]
    _, graphs = walked("chain", "w8a8")
    assert "insert-observers" not in graphs
