"""integer-dataflow: Before/Expected on Chain and on the attention
(tests/passes/quantized_graphs.py) under w8a8-static: int8 values go from integer op to
integer op, through layout ops, without dequantize / quantize between."""

import torch

from tests.helpers import expect
from tests.passes.quantized_graphs import Attention, walked


def test_residual_add_in_int8_and_a_float_output():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["integer-dataflow"]
    expect(before, """
        # CHECK: linear_int8_default = torch.ops.qcompile.linear_int8.default(quantize_default,
        # CHECK-NEXT: dequantize_default = torch.ops.qcompile.dequantize.default(
        # CHECK-NEXT: relu = dequantize_default.relu()
        # CHECK: linear_int8_default_1 = torch.ops.qcompile.linear_int8.default(
        # CHECK-NEXT: dequantize_default_1 = torch.ops.qcompile.dequantize.default(
        # CHECK-NEXT: h_1 = dequantize_default + dequantize_default_1
        # CHECK-NEXT: reshape = h_1.reshape(-1, 16)
        # CHECK-NEXT: quantize_default_2 = torch.ops.qcompile.quantize.default(reshape,
        # CHECK: linear_int8_default_2 = torch.ops.qcompile.linear_int8.default(quantize_default_2,
        # CHECK-NEXT: dequantize_default_2 = torch.ops.qcompile.dequantize.default(
        # CHECK-NEXT: return (dequantize_default_2,)
    """)
    # Expected: relu (a float island) still dequantizes fc1's output; the residual add reads
    # both int8 outputs (add_int8: each side rescaled to the sum's scale, (q, shift) from
    # compute-dyadic); the reshape runs on int8 and feeds fc3 with no quantize (the same
    # parameters: the identity); fc3's output only leaves in float, so fc3 dequantizes its
    # accumulator directly (linear_int8_dq) instead of requantizing it
    zp = {site: q.zero_point for site, q in cap.ctx.analysis["calib"].items()}
    expect(after, f"""
        # CHECK: linear_int8_default = torch.ops.qcompile.linear_int8.default(quantize_default,
        # CHECK-NEXT: dequantize_default = torch.ops.qcompile.dequantize.default(
        # CHECK-SAME: linear_int8_default,
        # CHECK-NEXT: relu = dequantize_default.relu()
        # CHECK: linear_int8_default_1 = torch.ops.qcompile.linear_int8.default(
        # CHECK-NEXT: add_int8_default = torch.ops.qcompile.add_int8.default(linear_int8_default,
        # CHECK-SAME: linear_int8_default_1, {zp["out:fc1"]}, {zp["out:fc2"]}, 0, 1, 0, 1,
        # CHECK-SAME: {zp["add:fc1"]}, -128, 127)
        # CHECK-NEXT: reshape_1 = add_int8_default.reshape(-1, 16)
        # CHECK-NOT: quantize
        # CHECK: = torch.ops.qcompile.linear_int8_dq.default(reshape_1, fc3_wq, fc3_bias_f,
        # CHECK-NEXT: return (linear_int8_dq_default,)
    """)
    expect(after, """
        # CHECK-COUNT-1: qcompile.dequantize.default
        # CHECK-NOT: qcompile.dequantize.default
    """)
    rec = next(r for r in cap.ctx.history if r.name == "integer-dataflow")
    assert rec.counters == {"residual_adds": 1, "round_trips_removed": 1, "rescales_folded": 0,
                            "float_outputs": 1, "attention_outputs_quantized": 0}


def test_requantize_into_the_next_int8_op_through_layout_ops():
    cap, graphs = walked("attention", "w8a8-static")
    before, after = graphs["integer-dataflow"]
    expect(before, """
        # CHECK: linear_int8_default = torch.ops.qcompile.linear_int8.default(quantize_default,
        # CHECK-SAME: q_wq,
        # CHECK-NEXT: dequantize_default = torch.ops.qcompile.dequantize.default(
        # CHECK-NEXT: view = dequantize_default.view(2, 5, 2, 8)
        # CHECK-NEXT: q = view.transpose(1, 2)
        # CHECK: quantize_default_2 = torch.ops.qcompile.quantize.default(q,
        # CHECK: attention_int8.default(quantize_default_2, quantize_default_3, quantize_default_4,
    """)
    # Expected: the layout ops replayed on the int8 output, and no float between the
    # linear and the attention. q's int8 must become the attention's symmetric int8: since
    # nothing else reads the linear's output, the linear requantizes to the attention's
    # parameters itself (zero point 0, its multiplier s_x s_w / s_attention), one rounding,
    # rather than to its own calibrated grid and then by a rescale (requant_int8). The
    # output projection reads the attention's own int8 codes (attention_int8_q), with no
    # quantize between them
    expect(after, """
        # CHECK-NOT: dequantize
        # CHECK: linear_int8_default = torch.ops.qcompile.linear_int8.default(quantize_default,
        # CHECK-SAME: q_wq, q_bias_i32, q_zp_term, q_q, q_shift, 0, -128, 127)
        # CHECK: view_3 = linear_int8_default.view(2, 5, 2, 8)
        # CHECK-NEXT: transpose = view_3.transpose(1, 2)
        # CHECK-NOT: requant_int8
        # CHECK: attention_int8_q.default(transpose, transpose_4, transpose_5,
        # CHECK-NOT: dequantize
        # CHECK-NOT: quantize.default
        # CHECK: linear_int8_dq.default
    """)
    # the folded multiplier is right: q's int8 output, at the attention's scale, is the
    # float projection within a quantization step or two
    from qcompile.lowering import ops, registry

    gm = cap.gm
    lin = next(n for n in gm.graph.nodes if registry.is_op(n, ops.linear_int8)
               and n.args[1].target == "q_wq")
    attn = next(n for n in gm.graph.nodes if registry.is_op(n, ops.attention_int8_q))
    quant = lin.args[0]
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 5, 16)
    a = registry.args_of(gm, lin)
    codes = ops.linear_int8(ops.quantize(x, *quant.args[1:], impl="reference"),
                            *(a[k] for k in ops.linear_int8.params[1:]), impl="reference")
    scale = float(registry.args_of(gm, attn)["q_scale"])
    with torch.no_grad():
        err = (codes.float() * scale - model.q(x)).abs().max()
    assert err < 2 * scale, (err, scale)
    assert next(r for r in cap.ctx.history if r.name == "integer-dataflow").counters == {
        "residual_adds": 0, "round_trips_removed": 3, "rescales_folded": 3, "float_outputs": 1,
        "attention_outputs_quantized": 1}


def test_dynamic_recipe_has_no_integer_dataflow():
    cap, graphs = walked("chain", "w8a8")
    before, after = graphs["integer-dataflow"]
    assert after == before
    assert not next(r for r in cap.ctx.history if r.name == "integer-dataflow").modified


def test_identical_rescales_merge_and_fold():
    """One projection read as q, k and v (and by nothing else): the three identical
    rescales become one, which then folds into the projection."""
    import torch.nn.functional as F

    from qcompile.lowering import cpu_routes
    from tests.helpers import walk
    from tests.passes.quantized_graphs import PLAIN_CPU

    class OneProjection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Linear(16, 16)

        def forward(self, x):
            h = self.p(x).view(2, 5, 2, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(h, h, h)

    torch.manual_seed(0)
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap, graphs = walk(OneProjection().eval(), torch.randn(2, 5, 16), options={
            "recipe": "w8a8-static", "kernels": "cpu", "smooth": False})
    expect(graphs["integer-dataflow"][1], """
        # CHECK: linear_int8.default(quantize_default, p_wq, p_bias_i32, p_zp_term, p_q,
        # CHECK-SAME: p_shift, 0, -128, 127)
        # CHECK-NOT: requant_int8
        # CHECK: attention_int8.default(transpose, transpose, transpose,
    """)
    assert next(r for r in cap.ctx.history if r.name == "integer-dataflow").counters[
        "rescales_folded"] == 1
