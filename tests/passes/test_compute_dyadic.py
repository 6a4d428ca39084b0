"""compute-dyadic: Before/Expected on Chain and on the attention
(tests/passes/quantized_graphs.py) under w8a8-static: every real requantization
multiplier M becomes integers (q, shift), M ~= q / 2**shift, computed once, here."""

import re

import torch

from qcompile import annotations as ann
from qcompile.numerics.dyadic import quantize_multiplier
from tests.helpers import expect
from tests.passes.quantized_graphs import walked


def test_add_int8_and_linear_int8_get_their_multipliers():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["compute-dyadic"]
    calib = cap.ctx.analysis["calib"]
    zp = {site: q.zero_point for site, q in calib.items()}
    # Before: add_int8's (qa, sa, qb, sb) are placeholders (0, 1, 0, 1)
    expect(before, f"""
        # CHECK: add_int8.default(linear_int8_default, linear_int8_default_1,
        # CHECK-SAME: {zp["out:fc1"]}, {zp["out:fc2"]}, 0, 1, 0, 1, {zp["add:fc1"]}, -128, 127)
    """)
    # Expected: each side's M = s_side / s_sum as (q, shift)
    qa, sa = quantize_multiplier(calib["out:fc1"].scale / calib["add:fc1"].scale)
    qb, sb = quantize_multiplier(calib["out:fc2"].scale / calib["add:fc1"].scale)
    expect(after, f"""
        # CHECK: add_int8.default(linear_int8_default, linear_int8_default_1,
        # CHECK-SAME: {zp["out:fc1"]}, {zp["out:fc2"]}, {qa}, {sa}, {qb}, {sb}, {zp["add:fc1"]},
    """)
    # linear_int8 reads (q, shift) as constants: the same graph text, values filled in with
    # M[c] = s_x * s_w[c] / s_y
    expect(after, "# CHECK: linear_int8.default(quantize_default, fc1_wq, fc1_bias_i32, "
                  "fc1_zp_term, fc1_q, fc1_shift,")
    fc1 = next(n for n in cap.gm.graph.nodes if n.name == "linear_int8_default")
    s_w = ann.get(fc1, ann.Layer).qweight.scale.double().reshape(-1)
    q, shift = quantize_multiplier(calib["in:fc1"].scale * s_w / calib["out:fc1"].scale)
    assert torch.equal(cap.gm.fc1_q, q) and torch.equal(cap.gm.fc1_shift, shift)
    assert ((2 ** 30 <= q) & (q < 2 ** 31)).all()
    assert not any(ann.get(n, ann.PendingRequant) for n in cap.gm.graph.nodes)
    assert next(r for r in cap.ctx.history if r.name == "compute-dyadic").counters == {
        "linear": 2, "add": 1}


def test_requant_int8_gets_its_multiplier():
    # the projection's int8 output is also read in float (a residual), so the attention's
    # read of it keeps its rescale to the attention's symmetric grid (one requant_int8 for
    # q = k = v); a projection only the attention reads requantizes to that grid itself
    # (test_integer_dataflow)
    cap, graphs = walked("shared-qkv", "w8a8-static")
    before, after = graphs["compute-dyadic"]
    zp = cap.ctx.analysis["calib"]["out:p"].zero_point
    expect(before, f"# CHECK: requant_int8.default(transpose, {zp}, 0, 1, 0, -128, 127)")
    # Expected: M = s_in / s_out, from the projection's output to the scale rewrite-attention
    # quantized the attention's inputs with
    s_out = re.search(r"quantize\.default\(h, ([0-9.e-]+), 0,", graphs["rewrite-attention"][1])
    q, shift = quantize_multiplier(cap.ctx.analysis["calib"]["out:p"].scale / float(s_out[1]))
    expect(after, f"""
        # CHECK: requant_int8_default = torch.ops.qcompile.requant_int8.default(transpose,
        # CHECK-SAME: {zp}, {q}, {shift}, 0, -128, 127)
        # CHECK: attention_int8.default(requant_int8_default, requant_int8_default,
        # CHECK-SAME: requant_int8_default,
        # CHECK-NOT: requant_int8.default(
    """)
    assert next(r for r in cap.ctx.history if r.name == "compute-dyadic").counters == {
        "linear": 1, "requant": 1}
