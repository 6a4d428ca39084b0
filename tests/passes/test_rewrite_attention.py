"""rewrite-attention: Before/Expected on a q / k / v / o attention
(tests/passes/quantized_graphs.py): sdpa becomes attention_int8 on int8 q, k, v, quantized
with calibrated symmetric scales (static) or at run time (dynamic)."""

from tests.helpers import expect
from tests.passes.quantized_graphs import walked

BEFORE = """
    # CHECK: q = view.transpose(1, 2)
    # CHECK: k = view_1.transpose(1, 2)
    # CHECK: v = view_2.transpose(1, 2)
    # CHECK-NEXT: a = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = None,
    # CHECK-SAME: dropout_p = 0.0, is_causal = False, scale = None, enable_gqa = False)
    # CHECK-NEXT: transpose_3 = a.transpose(1, 2)
"""


def test_static_sdpa_becomes_attention_int8():
    cap, graphs = walked("attention", "w8a8-static")
    before, after = graphs["rewrite-attention"]
    expect(before, BEFORE)
    # Expected: q, k, v quantized symmetrically (zero point 0: the kernel takes none), their
    # scales as constants, then one op (mask, causal, scale, output dtype kept)
    expect(after, """
        # CHECK-NOT: scaled_dot_product_attention
        # CHECK: quantize_default_2 = torch.ops.qcompile.quantize.default(q,
        # CHECK-SAME: , 0, -128, 127)
        # CHECK: quantize_default_3 = torch.ops.qcompile.quantize.default(k,
        # CHECK-SAME: , 0, -128, 127)
        # CHECK: quantize_default_4 = torch.ops.qcompile.quantize.default(v,
        # CHECK-SAME: , 0, -128, 127)
        # CHECK: attention_int8_default = torch.ops.qcompile.attention_int8.default(
        # CHECK-SAME: quantize_default_2, quantize_default_3, quantize_default_4, attn_v_scale,
        # CHECK-SAME: attn_v_scale_1, attn_v_scale_2, None, False, None, torch.float32)
        # CHECK-NEXT: transpose_3 = attention_int8_default.transpose(1, 2)
        # CHECK-NOT: scaled_dot_product_attention
    """)
    rec = next(r for r in cap.ctx.history if r.name == "rewrite-attention")
    assert rec.modified and rec.counters == {"static": 1}
    assert cap.ctx.layers["attn:v"].quantized


def test_dynamic_sdpa_quantizes_at_run_time():
    cap, graphs = walked("attention", "w8a8")
    before, after = graphs["rewrite-attention"]
    expect(before, BEFORE)
    # Expected: each of q, k, v -> (int8 values, scale) by its absmax at run time
    expect(after, """
        # CHECK-NOT: scaled_dot_product_attention
        # CHECK: quantize_absmax_default = torch.ops.qcompile.quantize_absmax.default(q, 127)
        # CHECK-NEXT: getitem = quantize_absmax_default[0]
        # CHECK-NEXT: getitem_1 = quantize_absmax_default[1]
        # CHECK-NEXT: = torch.ops.qcompile.quantize_absmax.default(k, 127)
        # CHECK: = torch.ops.qcompile.quantize_absmax.default(v, 127)
        # CHECK: attention_int8_default = torch.ops.qcompile.attention_int8.default(getitem,
        # CHECK-SAME: getitem_2, getitem_4, getitem_1, getitem_3, getitem_5, None, False, None,
        # CHECK-NEXT: transpose_3 = attention_int8_default.transpose(1, 2)
        # CHECK-NOT: scaled_dot_product_attention
    """)
    assert next(r for r in cap.ctx.history if r.name == "rewrite-attention").counters == {
        "dynamic": 1}


def test_4_bit_recipes_run_int8_attention():
    """A 4-bit recipe's 4 bits are its linears' inputs: q, k and v are int8 (per-tensor
    int4 took all-MiniLM-L6-v2's w4a4 with quantized attention to 0.949 mean cosine)."""
    from qcompile.lowering import ops
    from qcompile.passes.calibrate_qparams import activation_spec

    cap, graphs = walked("attention", "w4a4")
    expect(graphs["rewrite-attention"][1], """
        # CHECK: = torch.ops.qcompile.quantize_absmax.default(hadamard_transform_default, 127)
        # CHECK: = torch.ops.qcompile.quantize_absmax.default(hadamard_transform_default_1, 127)
        # CHECK: = torch.ops.qcompile.quantize_absmax.default(v, 127)
    """)
    cap, graphs = walked("attention", "w4a4-static")
    expect(graphs["rewrite-attention"][1], """
        # CHECK: = torch.ops.qcompile.quantize.default(hadamard_transform_default,
        # CHECK-SAME: , 0, -128, 127)
        # CHECK: attention_int8_default = torch.ops.qcompile.attention_int8.default(
    """)
    # the scale covers the range calibrated on the 4-bit grid, in 127 steps
    grid = activation_spec(cap.ctx)
    assert (grid.qmin, grid.qmax) == (-8, 7)
    site = cap.ctx.analysis["calib"]["attn:v:q"]
    lo = (grid.qmin - site.zero_point) * site.scale
    hi = (grid.qmax - site.zero_point) * site.scale
    (q,) = [n for n in cap.gm.graph.nodes if n.target in (ops.ATTENTION_INT8,
                                                         ops.ATTENTION_INT8_Q)]
    scale = float(getattr(cap.gm, q.args[3].target))
    assert abs(scale - max(abs(lo), abs(hi)) / 127) < 1e-6 * scale  # a float32 constant
