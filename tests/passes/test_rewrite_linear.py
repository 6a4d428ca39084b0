"""rewrite-linear: Before/Expected on Chain (tests/passes/quantized_graphs.py): static
recipes put quantize / linear_int8 / dequantize at each linear with the calibrated
parameters, the dynamic recipes one linear_dynamic (w8a8) or linear_a4w4_dynamic (w4a4)
op; the float round trips this leaves between integer ops are integer-dataflow's
(tests/passes/test_integer_dataflow.py)."""

import pytest
import torch

import qcompile
from qcompile import annotations as ann
from qcompile.numerics.specs import pack_int4
from qcompile.state import state_for_model
from tests.helpers import expect
from tests.passes.quantized_graphs import walked

BEFORE = """
    # CHECK: h = torch._C._nn.linear(l_x_, fc1_weight, fc1_bias)
    # CHECK-NEXT: relu = h.relu()
    # CHECK-NEXT: linear_1 = torch._C._nn.linear(relu, fc2_weight, fc2_bias)
    # CHECK-NEXT: h_1 = h + linear_1
    # CHECK-NEXT: reshape = h_1.reshape(-1, 16)
    # CHECK-NEXT: linear_2 = torch._C._nn.linear(reshape, fc3_weight, fc3_bias)
    # CHECK-NEXT: return (linear_2,)
"""


def test_static_linear_becomes_quantize_linear_int8_dequantize():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["rewrite-linear"]
    expect(before, BEFORE)
    calib = cap.ctx.analysis["calib"]

    def qp(site):  # a site's scale and zero point, as the graph prints them
        return f"{calib[site].scale}, {calib[site].zero_point}"

    # Expected, per linear: x quantized with its input site's parameters; the int8 op with
    # the integer weight, int32 bias, zero-point term, requantization (q, shift: filled by
    # compute-dyadic) and its output's zero point; its output dequantized with the output
    # site's parameters. Float ops (relu, the add) stay between them.
    expect(after, f"""
        # CHECK-NOT: torch._C._nn.linear
        # CHECK: quantize_default = torch.ops.qcompile.quantize.default(l_x_, {qp("in:fc1")},
        # CHECK-SAME: -128, 127)
        # CHECK: = torch.ops.qcompile.linear_int8.default(quantize_default, fc1_wq,
        # CHECK-SAME: fc1_bias_i32, fc1_zp_term, fc1_q, fc1_shift, {calib["out:fc1"].zero_point},
        # CHECK-NEXT: dequantize_default = torch.ops.qcompile.dequantize.default(
        # CHECK-SAME: {qp("out:fc1")}, torch.float32)
        # CHECK-NEXT: relu = dequantize_default.relu()
        # CHECK-NEXT: = torch.ops.qcompile.quantize.default(relu, {qp("in:fc2")},
        # CHECK: = torch.ops.qcompile.linear_int8.default(quantize_default_1, fc2_wq,
        # CHECK-NEXT: dequantize_default_1 = torch.ops.qcompile.dequantize.default(
        # CHECK-SAME: {qp("out:fc2")}, torch.float32)
        # CHECK-NEXT: h_1 = dequantize_default + dequantize_default_1
        # CHECK-NEXT: reshape = h_1.reshape(-1, 16)
        # CHECK-NEXT: = torch.ops.qcompile.quantize.default(reshape, {qp("in:fc3")},
        # CHECK: = torch.ops.qcompile.linear_int8.default(quantize_default_2, fc3_wq,
        # CHECK-NEXT: = torch.ops.qcompile.dequantize.default(
        # CHECK-SAME: {qp("out:fc3")}, torch.float32)
        # CHECK-NEXT: return (dequantize_default_2,)
    """)
    assert next(r for r in cap.ctx.history if r.name == "rewrite-linear").counters == {
        "linear_int8": 3}
    # the int32 bias: round(b / (s_x * s_w[c])), computed here at compile time
    fc1 = next(n for n in cap.gm.graph.nodes if n.name == "linear_int8_default")
    s_w = ann.get(fc1, ann.Layer).qweight.scale.double().reshape(-1)
    b = cap.ctx.analysis["float_gm"].fc1_bias.double()
    expected = torch.round(b / (calib["in:fc1"].scale * s_w)).to(torch.int32)
    assert torch.equal(cap.gm.fc1_bias_i32, expected)


def test_dynamic_linear_becomes_one_op():
    cap, graphs = walked("chain", "w8a8")
    before, after = graphs["rewrite-linear"]
    expect(before, BEFORE)
    # Expected: activations quantized inside the op at run time: no quantize / dequantize
    expect(after, """
        # CHECK-NOT: quantize
        # CHECK: = torch.ops.qcompile.linear_dynamic.default(l_x_, fc1_wq, fc1_wscale, fc1_bias)
        # CHECK-NEXT: relu = linear_dynamic_default.relu()
        # CHECK: = torch.ops.qcompile.linear_dynamic.default(relu, fc2_wq, fc2_wscale, fc2_bias)
        # CHECK-NEXT: h_1 = linear_dynamic_default + linear_dynamic_default_1
        # CHECK-NEXT: reshape = h_1.reshape(-1, 16)
        # CHECK: = torch.ops.qcompile.linear_dynamic.default(reshape, fc3_wq, fc3_wscale,
        # CHECK-NEXT: return (linear_dynamic_default_2,)
        # CHECK-NOT: quantize
    """)


def test_w4a4_linear_becomes_one_int4_op_with_a_packed_weight():
    """w4a4: per-token dynamic int4 activations inside the op (no quantize / dequantize
    around it), the int4 weight packed two a byte along K (uint8 [N, K // 2])."""
    cap, graphs = walked("chain", "w4a4", group_size="channel")
    _, after = graphs["rewrite-linear"]
    expect(after, """
        # CHECK-NOT: quantize
        # CHECK: = torch.ops.qcompile.linear_a4w4_dynamic.default(l_x_, fc1_wq4, fc1_wscale,
        # CHECK-SAME: fc1_bias, 0.8, fc1_wsum)
        # CHECK: = torch.ops.qcompile.linear_a4w4_dynamic.default(relu, fc2_wq4, fc2_wscale,
        # CHECK: = torch.ops.qcompile.linear_a4w4_dynamic.default(reshape, fc3_wq4,
        # CHECK-NOT: quantize
    """)
    assert next(r for r in cap.ctx.history if r.name == "rewrite-linear").counters == {
        "linear_a4w4_dynamic": 3}
    layer = ann.get(next(n for n in cap.gm.graph.nodes if n.name.startswith("linear_a4w4")),
                    ann.Layer)
    assert torch.equal(cap.gm.fc1_wq4, pack_int4(layer.qweight.qweight))  # [16, 8] uint8
    assert cap.gm.fc1_wq4.dtype == torch.uint8 and cap.gm.fc1_wq4.shape == (16, 8)
    # asymmetric activations (the recipe's): the weight rows' sums for the zero points' term
    assert torch.equal(cap.gm.fc1_wsum, layer.qweight.qweight.sum(1, dtype=torch.int32))
    assert {r.kernel for r in cap.ctx.layers.values()} == {"linear_a4w4_dynamic:cpu-fp32-exact"}


def test_w4a4_activations_in_groups_are_the_ops_act_group():
    """activation_group_size: each linear's op takes the group size (symmetric: no weight
    sums), the clip the groups' default; a K the group size does not divide keeps one
    scale per token, symmetric, and the report says which layer and why."""
    _, graphs = walked("chain", "w4a4", group_size="channel", activation_group_size=8)
    _, after = graphs["rewrite-linear"]
    expect(after, """
        # CHECK: = torch.ops.qcompile.linear_a4w4_dynamic.default(l_x_, fc1_wq4, fc1_wscale,
        # CHECK-SAME: fc1_bias, 0.9, None, 8)
        # CHECK: = torch.ops.qcompile.linear_a4w4_dynamic.default(relu, fc2_wq4, fc2_wscale,
        # CHECK-SAME: fc2_bias, 0.9, None, 8)
        # CHECK-NOT: wsum
    """)
    cap, graphs = walked("chain", "w4a4", group_size="channel", activation_group_size=32)
    _, after = graphs["rewrite-linear"]
    expect(after, """
        # CHECK: = torch.ops.qcompile.linear_a4w4_dynamic.default(l_x_, fc1_wq4, fc1_wscale,
        # CHECK-SAME: fc1_bias, 0.9)
        # CHECK-NOT: wsum
    """)
    notes = [n for n in cap.ctx.notes if "activation_group_size" in n]
    assert len(notes) == 3 and "fc1's K = 16 is not a multiple of activation_group_size 32" \
        in notes[0] and "one scale per token" in notes[0]


class _Direct(torch.nn.Module):
    """fc2 reads fc1's output with nothing between them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize("recipe", ["w8a8-static", "w4a8"])
def test_a_linear_reading_a_linear_directly_is_quantized(recipe):
    """One value, two sites (fc1's output, fc2's input): both survive the observers' removal
    and fc1's rewrite, so fc2 is quantized too and reads fc1's integers requantized (it once
    stayed float, reported as 'no calibration data')."""
    torch.manual_seed(0)
    model = _Direct().eval()
    cm = torch.compile(model, backend="qcompile", options={"recipe": recipe, "kernels": "cpu"})
    x = torch.randn(8, 16)
    with torch.no_grad():
        with qcompile.calibrate(cm):
            cm(x)
        out, ref = cm(x), model(x)
    layers = {r.name: r for r in qcompile.report(cm).layers}
    assert [(n, layers[n].quantized, layers[n].reason) for n in ("fc1", "fc2")] == [
        ("fc1", True, ""), ("fc2", True, "")]
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.97
    (artifact,) = state_for_model(cm).artifacts
    expect(artifact.gm, """
        # CHECK: = torch.ops.qcompile.linear_
        # CHECK-NOT: torch.ops.qcompile.dequantize
        # CHECK: = torch.ops.qcompile.linear_
    """)
