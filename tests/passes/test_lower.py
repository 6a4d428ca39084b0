"""lower: Before/Expected on Chain and on the attention (tests/passes/quantized_graphs.py),
kernels="cpu" on a CPU without int8 extensions: every qcompile op is bound to an
implementation by name, the linears to the route select-layers planned."""

import torch

from tests.helpers import expect
from tests.passes.quantized_graphs import walked


def _qcompile_calls(code: str) -> list[str]:
    return [line for line in code.splitlines() if "torch.ops.qcompile." in line]


def test_every_op_names_its_implementation():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["lower"]
    assert not any("impl = " in line for line in _qcompile_calls(before))
    # Expected: the same calls with impl= (the registry's choice) and origin= (the graph
    # and node, and the layer, that generated kernels and errors name)
    expect(after, """
        # CHECK: = torch.ops.qcompile.quantize.default(l_x_,
        # CHECK-SAME: impl = 'cpu', origin = 'captured_000:quantize_default')
        # CHECK: = torch.ops.qcompile.linear_int8.default(quantize_default, fc1_wq,
        # CHECK-SAME: impl = 'cpu-fp32-exact', origin = 'captured_000:linear_int8_default (fc1)')
        # CHECK-NEXT: = torch.ops.qcompile.dequantize.default(linear_int8_default,
        # CHECK-SAME: impl = 'reference', origin = 'captured_000:dequantize_default')
        # CHECK: = torch.ops.qcompile.quantize.default(relu,
        # CHECK-SAME: impl = 'cpu',
        # CHECK: = torch.ops.qcompile.linear_int8.default(quantize_default_1, fc2_wq,
        # CHECK-SAME: impl = 'cpu-fp32-exact', origin = 'captured_000:linear_int8_default_1 (fc2)')
        # CHECK-NEXT: = torch.ops.qcompile.add_int8.default(
        # CHECK-SAME: impl = 'cpu', origin = 'captured_000:add_int8_default')
        # CHECK: = torch.ops.qcompile.linear_int8_dq.default(reshape_1, fc3_wq,
        # CHECK-SAME: impl = 'cpu-fp32-exact', origin = 'captured_000:linear_int8_dq_default (fc3)')
    """)
    calls = _qcompile_calls(after)
    assert len(calls) == len(_qcompile_calls(before)) == 7
    assert all("impl = '" in line for line in calls)
    # bound, the graph runs: int8 error against the float graph, nothing worse
    with torch.no_grad():
        ref = cap.ctx.analysis["float_gm"](*cap.inputs())[0]
        out = cap()[0]
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


def test_attention_and_run_time_quantization_are_bound():
    _, graphs = walked("attention", "w8a8")
    after = graphs["lower"][1]
    expect(after, """
        # CHECK: quantize_absmax.default(q, 127, impl = 'cpu',
        # CHECK: attention_int8.default(getitem, getitem_2, getitem_4, getitem_1, getitem_3,
        # CHECK-SAME: impl = 'cpu-sdpa', origin = 'captured_000:attention_int8_default (attn:v)')
        # CHECK: linear_dynamic.default(reshape, o_wq, o_wscale, o_bias,
        # CHECK-SAME: impl = 'cpu-fp32-exact', origin = 'captured_000:linear_dynamic_default_3 (o)')
    """)
    assert all("impl = '" in line for line in _qcompile_calls(after))
