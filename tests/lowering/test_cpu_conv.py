"""The CPU convolution accumulators (lowering/cpu_conv.py): oneDNN's int8 convolution is
exact where it is used (7-bit weights without VNNI, chunks that keep float32 exact), the
exact fallback takes everything else, and the per-layer plan says when int8 is faster."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcompile.lowering import cpu_conv, cpu_routes
from qcompile.lowering.kernels.conv import conv2d_acc_ref

CAPS = cpu_routes.cpu_capabilities()
ONEDNN = pytest.mark.skipif(not CAPS.onednn, reason="no oneDNN int8 convolution here")
G = cpu_conv.ConvGeometry.of((1, 1), (1, 1), (1, 1), 1)


def _acc(x, w, zp, g=G):
    return conv2d_acc_ref(x, w, zp, g.stride, g.padding, g.dilation, g.groups)


def _weight_range():
    return cpu_conv.onednn_weight_range(CAPS)


@ONEDNN
@pytest.mark.parametrize("zp", [-128, -5, 0, 37, 127])
@pytest.mark.parametrize("geometry, c, n, kernel", [
    (((1, 1), (1, 1), (1, 1), 1), 8, 8, (3, 3)), (((2, 1), (2, 0), (1, 2), 1), 8, 8, (3, 3)),
    (((1, 1), (0, 0), (1, 1), 4), 8, 8, (3, 3)), (((2, 2), (1, 1), (1, 1), 8), 8, 8, (3, 3)),
    # rows of outputs whose window lies wholly in the padding, grouped: oneDNN's own
    # padding gave garbage there on AVX512-VNNI (u8 zero point not 0), so cpu_conv pads
    (((2, 1), (2, 1), (1, 1), 3), 3, 18, (2, 3))])
def test_onednn_route_is_exact_at_the_extremes(zp, geometry, c, n, kernel):
    """Saturating patterns (x at both ends, w at both ends of the exact range), borders
    where padding holds the zero point, grouped and depthwise convolutions."""
    g = cpu_conv.ConvGeometry.of(*geometry)
    lo, hi = _weight_range()
    gen = torch.Generator().manual_seed(zp & 0xFF)
    x = torch.where(torch.rand(2, c, 9, 7, generator=gen) > 0.5, 127, -128).to(torch.int8)
    w = torch.where(torch.rand(n, c // g.groups, *kernel, generator=gen) > 0.5, hi, lo)
    w = w.to(torch.int8)
    p = cpu_conv.prepare_conv(w, zp, g)
    got = cpu_conv.run_prepared(x, p)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.to(torch.int64), _acc(x, w, zp, g))


@ONEDNN
def test_input_channels_are_chunked_where_float32_would_round():
    """sum |w| too large for one float32-exact call: chunks of input channels, summed in
    int32, still exact (accumulators far beyond 2**24)."""
    lo, hi = _weight_range()
    c = 320
    w = torch.full((4, c, 3, 3), lo, dtype=torch.int8)
    chunks = cpu_conv.plan_channel_chunks(w, 1)
    assert chunks is not None and len(chunks) > 1
    assert chunks[0][0] == 0 and chunks[-1][1] == c
    x = torch.full((1, c, 5, 5), 127, dtype=torch.int8)
    got = cpu_conv.conv_acc(x, w, -128, G)
    want = _acc(x, w, -128)
    assert got.dtype == torch.int32 and want.abs().max() > 2**24
    assert torch.equal(got.to(torch.int64), want)


@ONEDNN
def test_one_call_where_the_values_stay_small_though_the_weights_allow_more():
    """Weights whose bound needs chunks, inputs whose accumulators stay below 2**24: one
    oneDNN call, its float32 output checked at run time and returned (exact)."""
    lo, hi = _weight_range()
    c = 320
    w = torch.full((4, c, 3, 3), hi, dtype=torch.int8)
    w[:, ::2] = lo
    assert len(cpu_conv.plan_channel_chunks(w, 1)) > 1
    x = torch.randint(-3, 4, (2, c, 5, 5), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int8)
    got = cpu_conv.conv_acc(x, w, 0, G)
    assert got.dtype == torch.float32 and torch.equal(got.to(torch.int64), _acc(x, w, 0))


@ONEDNN
def test_weights_outside_the_exact_range_are_refused_and_take_the_exact_route():
    lo, hi = _weight_range()
    if (lo, hi) == cpu_routes.FULL_RANGE:
        pytest.skip("this CPU's int8 convolution is exact for every int8 weight (VNNI)")
    w = torch.full((4, 4, 3, 3), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"exact only for weights in \[-64, 63\]"):
        cpu_conv.prepare_conv(w, 0, G)
    x = torch.full((1, 4, 5, 5), 127, dtype=torch.int8)
    got = cpu_conv.conv_acc(x, w, 0, G)  # the exact fallback
    assert got.dtype == torch.int64 and torch.equal(got, _acc(x, w, 0))


def test_empty_batch_gives_an_empty_accumulator():
    x = torch.zeros((0, 4, 5, 5), dtype=torch.int8)
    w = torch.ones((6, 4, 3, 3), dtype=torch.int8)
    assert cpu_conv.conv_acc(x, w, 3, G).shape == (0, 6, 5, 5)


AVX2 = cpu_routes.CpuCapabilities(arch="x86_64", isa="AVX2", avx2=True, onednn=True)
VNNI = dataclasses.replace(AVX2, isa="AVX512", avx512=True, avx512_vnni=True,
                           onednn_full_range=True)
ARM = cpu_routes.CpuCapabilities(arch="aarch64", isa="DEFAULT", dotprod=True)


@pytest.mark.parametrize("caps, x, w, groups, hw, fast, words", [
    (AVX2, (8, 64, 56, 56), (64, 64, 3, 3), 1, (56, 56), True, "oneDNN"),
    (AVX2, (8, 3, 224, 224), (64, 3, 7, 7), 1, (112, 112), False, "3 input channels"),
    (AVX2, (8, 96, 56, 56), (96, 1, 3, 3), 96, (56, 56), False, "depthwise"),
    (AVX2, (1, 16, 4, 4), (16, 16, 3, 3), 1, (4, 4), False, "MACs"),
    (AVX2, (8, 144, 56, 56), (24, 144, 1, 1), 1, (56, 56), False, "1 x 1"),
    (AVX2, (8, 1024, 14, 14), (256, 1024, 1, 1), 1, (14, 14), True, "oneDNN"),
    (ARM, (8, 64, 56, 56), (64, 64, 3, 3), 1, (56, 56), False, "no oneDNN"),
])
def test_plan_says_when_int8_beats_float(caps, x, w, groups, hw, fast, words):
    g = cpu_conv.ConvGeometry.of((1, 1), (1, 1), (1, 1), groups)
    plan = cpu_conv.plan_conv(caps, x, w, g, hw, cpu_routes.SEVEN_BIT)
    assert plan.fast is fast and words in plan.reason


def test_plan_refuses_full_range_weights_without_vnni():
    g = cpu_conv.ConvGeometry.of((1, 1), (1, 1), (1, 1), 1)
    plan = cpu_conv.plan_conv(AVX2, (8, 64, 56, 56), (64, 64, 3, 3), g, (56, 56),
                              cpu_routes.FULL_RANGE)
    assert not plan.fast and "[-64, 63]" in plan.reason
