"""quantize-weights: the graph does not change; each selected linear's Layer annotation
holds its integer weight, which rewrite-linear then reads (Chain under w8a8-static,
tests/passes/quantized_graphs.py)."""

import torch

from qcompile import annotations as ann
from tests.helpers import expect
from tests.passes.quantized_graphs import walked


def test_graph_unchanged_and_weights_rounded_per_channel():
    cap, graphs = walked("chain", "w8a8-static")
    before, after = graphs["quantize-weights"]
    assert after == before
    rec = next(r for r in cap.ctx.history if r.name == "quantize-weights")
    assert not rec.modified and rec.counters == {"rtn": 3, "gptq": 0, "loaded": 0,
                                                 "clipped_rows": 0}
    # the integers appear in the graph once rewrite-linear reads them
    expect(graphs["rewrite-linear"][1], """
        # CHECK: linear_int8.default(quantize_default, fc1_wq,
        # CHECK: linear_int8.default(quantize_default_1, fc2_wq,
        # CHECK: linear_int8.default(quantize_default_2, fc3_wq,
    """)
    float_gm = cap.ctx.analysis["float_gm"]
    layers = {ann.get(n, ann.Layer).name: ann.get(n, ann.Layer) for n in cap.gm.graph.nodes
              if ann.get(n, ann.Layer) is not None}
    assert sorted(layers) == ["fc1", "fc2", "fc3"]
    for name, layer in layers.items():
        qw, w = layer.qweight, getattr(float_gm, f"{name}_weight")
        # Expected: symmetric per output channel, round to nearest: |W - q s| <= s / 2
        assert qw.qweight.dtype == torch.int8 and qw.scale.numel() == w.shape[0]
        assert (qw.zero_point == 0).all() and int(qw.qweight.abs().max()) <= 127
        err = (w - qw.dequantize()).abs()
        assert (err <= qw.scale.reshape(-1, 1) / 2 * (1 + 1e-6)).all(), name
        assert torch.equal(getattr(cap.gm, f"{name}_wq"), qw.qweight)


def test_weight_clip_option_clips_rows_by_the_calibration_hessian():
    """options["weight_clip"]: the calibrated Hessian weighs each row's clip search (a
    Hessian observer joins the inputs' even without GPTQ); the layers say how many rows
    were clipped, and every clipped row's scale is below its min-max scale."""
    cap, _ = walked("chain", "w4a8", weight_clip=True)
    rec = next(r for r in cap.ctx.history if r.name == "quantize-weights")
    assert rec.counters["clipped_rows"] > 0
    for node in cap.gm.graph.nodes:
        layer = ann.get(node, ann.Layer)
        if layer is None or layer.qweight is None:
            continue
        detail = cap.ctx.layers[layer.name].detail["weight_clip"]
        assert "Hessian-weighted" in detail
        w = getattr(cap.ctx.analysis["float_gm"], f"{layer.name}_weight")
        minmax = w.abs().amax(1) / 7
        assert bool((layer.qweight.scale <= minmax * (1 + 1e-6)).all())


def test_preview_weight_is_what_quantize_weights_makes():
    """choose-precision measures each candidate width on preview_weight: without the
    sequential replay it must be the weight quantize-weights gives the layer (GPTQ on the
    shrunk Hessian, rows clipped), integer for integer."""
    import torch.nn.functional as F

    from qcompile.fx_utils import get_constant, is_call
    from qcompile.passes.quantize_weights import preview_weight, weight_spec_for
    from tests.helpers import stage
    from tests.models.zoo import MODELS

    build, make, _ = MODELS["llama"]
    torch.manual_seed(0)
    model = build().eval()
    torch.manual_seed(1)
    cap = stage(model, *make(2, 16), before="quantize-weights",
                options={"recipe": "w4a8", "gptq": True, "sequential": False})
    calib = cap.ctx.analysis["calib"]
    linears = [n for n in cap.gm.graph.nodes if is_call(n, F.linear) and ann.selected(n)]
    previews = {}
    for n in linears:
        la = ann.selected(n)
        w = get_constant(cap.gm, n.args[1]).detach().float()
        spec = weight_spec_for(cap.ctx, w.shape[1], la.weight_bits, la.group_levels)[0]
        previews[la.name] = preview_weight(cap.ctx, w, spec,
                                           calib.get(ann.site(n.args[0], "input")), False)
    cap.run_pass("quantize-weights")
    assert cap.ctx.counters["quantize-weights.gptq"] == len(linears) > 0
    for n in linears:
        la = ann.selected(n)
        assert torch.equal(la.qweight.qweight, previews[la.name].qweight), la.name
        assert torch.equal(la.qweight.scale, previews[la.name].scale), la.name


def test_grouped_gptq_searches_each_groups_range_where_weight_clip_is_on():
    """GPTQ on group-wise int4 weights chooses each group's range by its Hessian-weighted
    error as it reaches the group (gptq_quantize's group_search), and the layer says so;
    with weight_clip off, groups keep their min-max ranges."""
    from qcompile.passes.quantize_weights import GROUP_SEARCH_DETAIL

    # symmetric: the chain's rows are one group each, whose range sets the row's grid, and
    # an asymmetric group's 8 levels leave no candidate between 1 and 7/8 of it
    on, _ = walked("chain", "w4a8", group_size=16, gptq=True, sequential=False,
                   weight_symmetric=True)
    off, _ = walked("chain", "w4a8", group_size=16, gptq=True, sequential=False,
                    weight_clip=False, weight_symmetric=True)

    def quantized(cap):
        layers = (ann.get(n, ann.Layer) for n in cap.gm.graph.nodes)
        return {la.name: la for la in layers if la is not None and la.qweight is not None}

    searched, plain = quantized(on), quantized(off)
    assert searched and sorted(searched) == sorted(plain)
    differ = 0
    for name, la in searched.items():
        assert la.qweight.spec.group_size == 16
        assert on.ctx.layers[name].detail["weight_clip"] == GROUP_SEARCH_DETAIL
        assert "weight_clip" not in off.ctx.layers[name].detail
        differ += not (torch.equal(la.qweight.scale, plain[name].qweight.scale) and
                       torch.equal(la.qweight.zero_point, plain[name].qweight.zero_point))
    assert differ > 0  # some group found a better range than its min-max


def test_group_wise_int4_weights_take_a_zero_point_per_group_unless_told_symmetric():
    """w4a8 in groups: each group has a zero point (multipliers up to 8, so (q - z) *
    multiplier stays int8), which rewrite-linear hands to linear_w4a8_grouped; with
    weight_symmetric, none (multipliers up to 16). The layer's report says which."""
    for sym in (False, True):
        cap, graphs = walked("chain", "w4a8", group_size=8, weight_symmetric=sym)
        layers = [la for la in (ann.get(n, ann.Layer) for n in cap.gm.graph.nodes)
                  if la is not None and la.qweight is not None]
        assert layers
        for la in layers:
            qw = la.qweight
            assert qw.spec.symmetric is sym and qw.spec.group_levels == (16 if sym else 8)
            assert bool((qw.zero_point == 0).all()) is sym
            ints = qw.int_values()
            torch.testing.assert_close(ints.float() * qw.int_scale()[:, None],
                                       qw.dequantize(), rtol=1e-6, atol=0)
            detail = cap.ctx.layers[la.name].detail["weight_groups"]
            assert ("with a zero point each" in detail) is not sym, detail
        wzp = "None" if sym else "fc1_wzp"
        expect(graphs["rewrite-linear"][1], f"""
            # CHECK: linear_w4a8_grouped.default(quantize_default, fc1_wq4, fc1_wmult, {wzp}
        """)


def test_group_size_channel_gives_one_scale_per_output_channel():
    """group_size "channel": w4a4 (groups of 32 by default) rounds each row on one symmetric
    scale and rewrite-linear picks the per-channel kernel; w4a16's weight-only kernel takes
    one group per row (float scale and zero point)."""
    cap, graphs = walked("chain", "w4a4", group_size="channel")
    layers = [la for la in (ann.get(n, ann.Layer) for n in cap.gm.graph.nodes)
              if la is not None and la.qweight is not None]
    assert layers
    for la in layers:
        qw = la.qweight
        assert qw.spec.granularity == "per_channel" and qw.scale.numel() == qw.qweight.shape[0]
        assert (qw.zero_point == 0).all()
        assert -8 <= int(qw.qweight.min()) <= int(qw.qweight.max()) <= 7
    assert "linear_a4w4_dynamic.default" in graphs["rewrite-linear"][1]
    assert "grouped" not in graphs["rewrite-linear"][1]
    cap, _ = walked("chain", "w4a16", group_size="channel")
    for la in (ann.get(n, ann.Layer) for n in cap.gm.graph.nodes):
        if la is not None and la.qweight is not None:
            spec, k = la.qweight.spec, la.qweight.qweight.shape[1]
            assert spec.granularity == "per_group" and spec.group_size == k
            assert not spec.symmetric
