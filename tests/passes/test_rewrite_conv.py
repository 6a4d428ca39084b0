"""rewrite-conv: Before/Expected on ConvBlock (tests/passes/quantized_graphs.py): static
recipes put quantize / conv2d_int8 / dequantize at each convolution with the calibrated
parameters, a ReLU reading only the convolution becomes its clamp; the dynamic recipe
one conv2d_dynamic op per convolution. integer-dataflow then leaves int8 from the image
to the classifier."""

from tests.helpers import expect
from tests.passes.quantized_graphs import walked


def test_static_conv_becomes_quantize_conv2d_int8_dequantize_with_relu_as_clamp():
    cap, graphs = walked("conv", "w8a8-static")
    before, after = graphs["rewrite-conv"]
    expect(before, """
        # CHECK: conv2d = torch.conv2d(l_x_, conv1_weight, conv1_bias, (1, 1), (1, 1), (1, 1), 1)
        # CHECK-NEXT: y = torch.nn.functional.relu(conv2d)
        # CHECK-NEXT: conv2d_1 = torch.conv2d(y, conv2_weight, conv2_bias, (1, 1), (1, 1),
    """)
    calib = cap.ctx.analysis["calib"]

    def qp(site):
        return f"{calib[site].scale}, {calib[site].zero_point}"

    out1 = calib["out:conv1"]
    # Expected: conv1's ReLU is gone, its clamp [zp, 127] in conv2d_int8 (out:conv1 was
    # observed after the ReLU); the input zero point is an argument (padding holds it);
    # (q, shift) wait for compute-dyadic
    expect(after, f"""
        # CHECK-NOT: torch.conv2d
        # CHECK: quantize_default_1 = torch.ops.qcompile.quantize.default(l_x_, {qp("in:conv1")},
        # CHECK: conv2d_int8_default = torch.ops.qcompile.conv2d_int8.default(quantize_default_1,
        # CHECK-SAME: conv1_wq, conv1_bias_i32, {calib["in:conv1"].zero_point}, conv1_q,
        # CHECK-SAME: conv1_shift, {out1.zero_point}, {out1.zero_point}, 127, [1, 1], [1, 1],
        # CHECK-SAME: [1, 1], 1)
        # CHECK-NEXT: dequantize_default_1 = torch.ops.qcompile.dequantize.default(
        # CHECK-SAME: {qp("out:conv1")}, torch.float32)
        # CHECK-NOT: relu(
        # CHECK: quantize.default(dequantize_default_1, {qp("in:conv2")},
        # CHECK: conv2d_int8.default(
        # CHECK-SAME: conv2_wq, conv2_bias_i32,
    """)
    assert next(r for r in cap.ctx.history if r.name == "rewrite-conv").counters == {
        "conv2d_int8": 2}


def test_static_block_is_integer_after_integer_dataflow():
    cap, graphs = walked("conv", "w8a8-static")
    _, after = graphs["integer-dataflow"]
    expect(after, """
        # CHECK: quantize.default(l_x_,
        # CHECK-NOT: dequantize.default
        # CHECK: conv2d_int8.default(quantize_default_1,
        # CHECK: conv2d_int8.default(conv2d_int8_default,
        # CHECK: add_int8.default(
        # CHECK: avg_pool2d_int8.default(add_int8_default,
        # CHECK: linear_int8_dq.default(
        # CHECK-NOT: dequantize.default
    """)


def test_dynamic_conv_is_one_op():
    cap, graphs = walked("conv", "w8a8")
    _, after = graphs["rewrite-conv"]
    expect(after, """
        # CHECK-NOT: torch.conv2d
        # CHECK: conv2d_dynamic.default(l_x_, conv1_wq, conv1_wscale, conv1_bias,
        # CHECK-SAME: [1, 1], [1, 1], [1, 1], 1)
        # CHECK-NEXT: y = torch.nn.functional.relu(
    """)
    assert next(r for r in cap.ctx.history if r.name == "rewrite-conv").counters == {
        "conv2d_dynamic": 2}


def test_weight_only_recipe_leaves_convs_unchanged():
    cap, graphs = walked("conv", "w4a16")
    before, after = graphs["rewrite-conv"]
    assert before == after and after.count("torch.conv2d(") == 2
    reasons = {name: rec.reason for name, rec in cap.ctx.layers.items() if rec.kind == "conv"}
    assert set(reasons) == {"conv1", "conv2"}
    assert all("weight-only" in r for r in reasons.values())
