"""The int8 implicit-GEMM convolution: its reference against an independent definition,
and the generated Triton kernels against the reference, bit for bit.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small: B <= 2, C, N <= 16, H, W <= 8.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import FileCheck

from qcompile.lowering import device as qdevice
from qcompile.lowering.autotune import GemmConfig
from qcompile.lowering.cache_dir import CacheWarning
from qcompile.lowering.codegen import kernel_dir
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize
from qcompile.lowering.kernels.conv import (
    check_conv_accumulator_range,
    conv2d_acc_ref,
    conv2d_int8_ref,
    conv2d_int8_triton,
    conv_output_shape,
    generated_source,
    kernel_epilogue,
    kernel_path,
    load_conv_kernel,
)
from qcompile.lowering.reference import AccumulatorRangeError, random_operands
from qcompile.numerics.dyadic import quantize_multiplier

triton_only = pytest.mark.skipif(
    qdevice.triton_target() == "none", reason="needs CUDA or TRITON_INTERPRET=1"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

EPILOGUES = [
    Epilogue(),
    Epilogue((Bias(),)),
    Epilogue((Requantize(),)),
    Epilogue((Bias(), Requantize(per_channel=True))),
    Epilogue((Dequantize("float32"),)),
    Epilogue((Bias(), Dequantize("float32", has_bias=True))),
    Epilogue((Dequantize("bfloat16", has_bias=True),)),
]
REQUANT = EPILOGUES[3]

# (x shape [B, C, H, W], w shape [N, C/groups, KH, KW], stride, padding, dilation, groups, in_zp)
CASES = {
    "3x3-pad1": ((2, 4, 6, 5), (8, 4, 3, 3), 1, 1, 1, 1, 0),
    "3x3-pad1-zp": ((2, 4, 6, 5), (8, 4, 3, 3), 1, 1, 1, 1, -37),
    "stride2": ((1, 3, 7, 8), (5, 3, 3, 3), 2, 1, 1, 1, 11),
    "dilation2": ((2, 4, 8, 7), (6, 4, 3, 3), 1, 2, 2, 1, 100),
    "groups2": ((2, 6, 5, 6), (8, 3, 3, 3), 1, 1, 1, 2, -128),
    "depthwise": ((2, 8, 6, 6), (8, 1, 3, 3), 1, 1, 1, 8, 127),
    "depthwise-x2": ((1, 4, 5, 7), (8, 1, 3, 2), (2, 1), (1, 0), 1, 4, 9),
    "1x1": ((2, 16, 4, 3), (12, 16, 1, 1), 1, 0, 1, 1, 5),
    "7x7-stride2": ((1, 3, 8, 8), (4, 3, 7, 7), 2, 3, 1, 1, -20),
    "pairs": ((1, 4, 8, 6), (4, 2, 2, 3), (2, 1), (0, 2), (2, 1), 2, 1),
    "all-padding-rows": ((1, 2, 2, 2), (3, 2, 3, 3), 1, 3, 1, 1, 60),
}


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def _case(name, seed=0):
    xs, ws, s, p, d, g, zp = CASES[name]
    return _rand(xs, seed), _rand(ws, seed + 1), dict(in_zp=zp, stride=s, padding=p,
                                                      dilation=d, groups=g)


def _values(ep, x, w, geo, seed=0):
    """Epilogue values for this convolution, scaled to its accumulators: biases within
    their range and requantization multipliers that spread the outputs over int8."""
    b, n, ho, wo = conv_output_shape(x.shape, w.shape, geo["stride"], geo["padding"],
                                     geo["dilation"], geo["groups"])
    k = w.shape[1] * w.shape[2] * w.shape[3]
    vals = random_operands(ep, b * ho * wo, n, k, seed=seed)[2]
    acc = conv2d_acc_ref(x, w, **geo).transpose(0, 1).reshape(n, -1)  # [N, M]
    top = acc.abs().amax(dim=1).clamp(min=1) if acc.numel() else torch.ones(n, dtype=torch.long)
    if "bias" in vals:
        g = torch.Generator().manual_seed(seed)
        vals["bias"] = ((torch.rand(n, generator=g) - 0.5) * top).to(torch.int32)
        top = top + vals["bias"].abs()
    if "q" in vals:
        q, s = quantize_multiplier(200.0 / top.double())  # [N]
        pc = ep.requantize.per_channel
        vals["q"], vals["shift"] = (q, s) if pc else (int(q.min()), int(s.min()))
    return vals


def _by_taps(x, w, in_zp, stride, padding, dilation, groups):
    """The definition, in int64 with explicit zero padding of (x - in_zp): [B, N, HO, WO]."""
    (sh, sw), (ph, pw), (dh, dw) = (v if isinstance(v, tuple) else (v, v)
                                    for v in (stride, padding, dilation))
    b, n, ho, wo = conv_output_shape(x.shape, w.shape, stride, padding, dilation, groups)
    xp = F.pad(x.to(torch.int64) - in_zp, (pw, pw, ph, ph))  # [B, C, H + 2ph, W + 2pw]
    cg, ng = w.shape[1], n // groups
    out = torch.zeros((b, n, ho, wo), dtype=torch.int64)
    for g in range(groups):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                           j * dw:j * dw + sw * (wo - 1) + 1:sw]  # [B, CG, HO, WO]
                wt = w[g * ng:(g + 1) * ng, :, i, j].to(torch.int64)  # [NG, CG]
                out[:, g * ng:(g + 1) * ng] += (patch[:, None] * wt[None, :, :, None, None]).sum(2)
    return out


@pytest.fixture(scope="module")
def kdir(tmp_path_factory):
    return tmp_path_factory.mktemp("conv_kernels")


# ------------------------------------------------------------------ reference


@pytest.mark.parametrize("name", list(CASES))
def test_reference_is_the_definition(name):
    x, w, geo = _case(name)
    acc = conv2d_acc_ref(x, w, **geo)
    assert acc.dtype == torch.int64
    assert torch.equal(acc, _by_taps(x, w, **geo))
    zp = geo.pop("in_zp")
    want = F.conv2d(x.double() - zp, w.double(), None, **geo)
    assert torch.equal(acc.double(), want) and acc.shape == want.shape


def test_padding_holds_the_zero_point():
    # x == in_zp everywhere is real zero: the accumulator is 0 at the borders too.
    x = torch.full((1, 3, 4, 4), -9, dtype=torch.int8)
    w = _rand((2, 3, 3, 3), 1)
    assert not conv2d_acc_ref(x, w, -9, padding=2).any()
    assert conv2d_acc_ref(x, w, 0, padding=2).any()


@pytest.mark.parametrize("xv, wv, zp", [(-128, -128, 127), (127, -128, -128), (-128, 127, 127),
                                        (127, 127, 0), (-128, -128, 0)])
def test_reference_extremes_beyond_int32(xv, wv, zp):
    # K = 131067, the largest 3x3 reduction under 131071: (x - zp) * w * K reaches 2**32.
    c = 131071 // 9
    x = torch.full((1, c, 3, 3), xv, dtype=torch.int8)
    w = torch.full((1, c, 3, 3), wv, dtype=torch.int8)
    acc = conv2d_acc_ref(x, w, zp)
    assert acc.shape == (1, 1, 1, 1) and int(acc) == (xv - zp) * wv * c * 9
    padded = conv2d_acc_ref(x, w, zp, padding=1)  # the corner sees 4 of 9 taps
    assert int(padded[0, 0, 0, 0]) == (xv - zp) * wv * c * 4
    if abs(int(acc)) >= 2**31:
        with pytest.raises(AccumulatorRangeError, match="int32"):
            conv2d_int8_ref(x, w, zp)
    with pytest.raises(AccumulatorRangeError, match="131071"):
        conv2d_acc_ref(torch.zeros((1, c + 1, 3, 3), dtype=torch.int8),
                       torch.zeros((1, c + 1, 3, 3), dtype=torch.int8))


def test_reference_epilogue_rows_and_layout():
    x, w, geo = _case("stride2")
    ep = REQUANT
    vals = _values(ep, x, w, geo)
    got = conv2d_int8_ref(x, w, **geo, epilogue=ep, **vals)
    b, n, ho, wo = got.shape
    assert got.dtype == torch.int8 and got.is_contiguous(memory_format=torch.channels_last)
    # Row m = (b*HO + oh)*WO + ow of the GEMM epilogue, applied to the exact accumulator.
    from qcompile.lowering.reference import apply_epilogue_ref

    rows = conv2d_acc_ref(x, w, **geo).permute(0, 2, 3, 1).reshape(-1, n)
    assert torch.equal(got.permute(0, 2, 3, 1).reshape(-1, n),
                       apply_epilogue_ref(rows, ep, **vals))


@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((2, 4, 5, 5), (8, 4, 3, 3), {}), ((2, 4, 2, 2), (8, 4, 3, 3), {"padding": 1}),
    ((0, 4, 5, 5), (8, 4, 3, 3), {}), ((0, 4, 0, 2), (8, 4, 1, 1), {"padding": 1}),
    ((2, 6, 9, 5), (9, 2, 2, 3), {"groups": 3, "stride": (3, 1), "dilation": (1, 2)}),
    ((1, 1, 1, 1), (1, 1, 1, 1), {"stride": 5}),
])
def test_output_shape_is_torchs(x_shape, w_shape, kw):
    want = F.conv2d(torch.empty(x_shape, device="meta"), torch.empty(w_shape, device="meta"),
                    **kw).shape
    assert conv_output_shape(x_shape, w_shape, **kw) == tuple(want)


@pytest.mark.parametrize("x_shape, w_shape, kw, match", [
    ((2, 4, 5, 5), (8, 4, 3, 3), {"groups": 2}, "expects x with 8 channels"),
    ((2, 4, 5, 5), (7, 2, 3, 3), {"groups": 2}, "not divisible by groups"),
    ((2, 4, 5, 5), (0, 4, 3, 3), {}, "no output channels"),
    ((2, 0, 5, 5), (8, 0, 3, 3), {}, "no input channels"),
    ((2, 4, 2, 2), (8, 4, 3, 3), {}, "smaller than the dilated kernel"),
    ((2, 4, 5, 5), (8, 4, 3, 3), {"dilation": 3}, "smaller than the dilated kernel"),
    ((2, 4, 0, 5), (8, 4, 1, 1), {"padding": 1}, "empty spatial"),
    ((2, 4, 5, 5), (8, 4, 3, 3), {"stride": 0}, "stride must be positive"),
    ((2, 4, 5, 5), (8, 4, 3, 3), {"padding": (1, -1)}, "padding must be non-negative"),
    ((2, 4, 5, 5), (8, 4, 3, 3), {"groups": 0}, "groups must be positive"),
    ((2, 4, 5, 5), (8, 4, 3, 3), {"stride": (1, 2, 3)}, "pair of ints"),
    ((2, 4, 5), (8, 4, 3, 3), {}, "need x"),
])
def test_output_shape_errors(x_shape, w_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        conv_output_shape(x_shape, w_shape, **kw)


# ------------------------------------------------------------------ Triton kernels


@triton_only
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_requant(name, kdir):
    x, w, geo = _case(name, seed=3)
    vals = _values(REQUANT, x, w, geo, seed=3)
    want = conv2d_int8_ref(x, w, **geo, epilogue=REQUANT, **vals)
    got = conv2d_int8_triton(x.to(DEV), w.to(DEV), **geo, epilogue=REQUANT,
                             kernel_cache_dir=kdir, **vals)
    assert got.dtype == torch.int8 and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.cpu(), want)
    assert len(want.unique()) > 10  # rounding is exercised, not only saturation


@triton_only
@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: e.signature())
@pytest.mark.parametrize("name", ["3x3-pad1-zp", "groups2", "depthwise-x2", "3x3-pad1"])
def test_every_epilogue_matches_reference(ep, name, kdir):
    x, w, geo = _case(name, seed=5)
    vals = _values(ep, x, w, geo, seed=5)
    want = conv2d_int8_ref(x, w, **geo, epilogue=ep, **vals)
    got = conv2d_int8_triton(x.to(DEV), w.to(DEV), **geo, epilogue=ep,
                             kernel_cache_dir=kdir, **vals)
    assert got.dtype == ep.out_dtype
    assert torch.equal(got.cpu(), want)


@triton_only
@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2), cg=st.integers(1, 5), ng=st.integers(1, 6), groups=st.integers(1, 3),
    h=st.integers(1, 7), w=st.integers(1, 7), kh=st.integers(1, 3), kw=st.integers(1, 3),
    sh=st.integers(1, 2), sw=st.integers(1, 2), ph=st.integers(0, 2), pw=st.integers(0, 2),
    dh=st.integers(1, 2), dw=st.integers(1, 2), zp=st.integers(-128, 127),
    ep=st.sampled_from(EPILOGUES), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_random_geometry_matches_reference(b, cg, ng, groups, h, w, kh, kw, sh, sw, ph, pw,
                                           dh, dw, zp, ep, seed, kdir):
    h, w = max(h, dh * (kh - 1) + 1 - 2 * ph), max(w, dw * (kw - 1) + 1 - 2 * pw)
    x, wt = _rand((b, cg * groups, h, w), seed), _rand((ng * groups, cg, kh, kw), seed + 1)
    geo = dict(in_zp=zp, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups)
    vals = _values(ep, x, wt, geo, seed=seed)
    want = conv2d_int8_ref(x, wt, **geo, epilogue=ep, **vals)
    got = conv2d_int8_triton(x.to(DEV), wt.to(DEV), **geo, epilogue=ep, kernel_cache_dir=kdir,
                             config=GemmConfig(16, 16, 16, group_m=2), **vals)
    assert torch.equal(got.cpu(), want)


@triton_only
def test_memory_formats_and_views(kdir):
    # channels-last x, a sliced x, a permuted (non-contiguous) w, tiles smaller than the
    # problem (many programs, several K steps), and a scalar per-tensor row scale.
    x, w, geo = _case("3x3-pad1-zp", seed=7)
    big = _rand((2, 9, 14, 7), 8)
    wt = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # [N, C, KH, KW] viewed
    assert not wt.is_contiguous()
    ep = Epilogue((Bias(), Dequantize("float32", has_bias=True)))
    vals = {**_values(ep, x, w, geo, seed=7), "row_scale": 0.0125}
    want = conv2d_int8_ref(x, w, **geo, epilogue=ep, **vals)
    small = GemmConfig(16, 16, 16, group_m=2)
    for xx, ww in [(x.to(memory_format=torch.channels_last), w), (x, wt),
                   (big[:, 2:6, ::2, 1:6], w)]:
        if xx.shape == x.shape:
            ref = want
        else:
            ref = conv2d_int8_ref(xx, ww, **geo, epilogue=ep, **vals)
        got = conv2d_int8_triton(xx.to(DEV), ww.to(DEV), **geo, epilogue=ep,
                                 kernel_cache_dir=kdir, config=small, **vals)
        assert torch.equal(got.cpu(), ref)


@triton_only
@pytest.mark.parametrize("ep", [Epilogue(), REQUANT, Epilogue((Dequantize("float32"),))],
                         ids=lambda e: e.signature())
def test_empty_batch(ep, kdir):
    x, w = torch.zeros((0, 4, 5, 5), dtype=torch.int8), _rand((6, 2, 3, 3), 1)
    geo = dict(in_zp=3, stride=2, padding=1, dilation=1, groups=2)
    vals = _values(ep, torch.zeros((1, 4, 5, 5), dtype=torch.int8), w, geo)
    vals = {k: (v[:0] if k == "row_scale" else v) for k, v in vals.items()}
    for fn in (conv2d_int8_ref, conv2d_int8_triton):
        got = fn(x.to(DEV), w.to(DEV), **geo, epilogue=ep, **vals)
        assert got.shape == (0, 6, 3, 3) and got.dtype == ep.out_dtype


@triton_only
def test_largest_k_at_the_int32_edge(kdir):
    # K = 131067 (3x3 over 14563 channels), x and w all -128, in_zp = 0: the centre row is
    # 2**14 * K, just under 2**31, proven from the shape alone; padded rows see fewer taps.
    c = 131071 // 9
    x = torch.full((1, c, 3, 3), -128, dtype=torch.int8)
    w = torch.full((2, c, 3, 3), -128, dtype=torch.int8)
    w[1] = 127
    got = conv2d_int8_triton(x.to(DEV), w.to(DEV), 0, padding=1, kernel_cache_dir=kdir,
                             config=GemmConfig(16, 16, 8192, group_m=1))
    want = conv2d_int8_ref(x, w, 0, padding=1)
    assert torch.equal(got.cpu(), want)
    assert int(want[0, 0, 1, 1]) == 2**14 * 9 * c and int(want[0, 1, 0, 0]) == -128 * 127 * 4 * c


@triton_only
def test_accumulator_beyond_int32_is_exact_or_refused(kdir):
    # (x - in_zp) * w = 255 * 128 per tap over K = 66006: |acc| > 2**31. The float
    # epilogue computes it in int64 exactly; an int32 output or a requantization refuses
    # it (the weights make the bound reachable), before launching.
    c = 66006 // 9
    x = torch.full((1, c, 3, 3), -128, dtype=torch.int8)
    w = torch.full((2, c, 3, 3), -128, dtype=torch.int8)
    w[1] = 127
    ep = Epilogue((Dequantize("float32"),))
    vals = dict(row_scale=1.0, col_scale=torch.ones(2))
    want = conv2d_int8_ref(x, w, 127, epilogue=ep, **vals)
    assert abs(float(want[0, 0])) > 2**31
    big_k = GemmConfig(16, 16, 8192, group_m=1)
    got = conv2d_int8_triton(x.to(DEV), w.to(DEV), 127, epilogue=ep, kernel_cache_dir=kdir,
                             config=big_k, **vals)
    assert torch.equal(got.cpu(), want)
    for bad in (Epilogue(), Epilogue((Requantize(),))):
        v = {"q": 1 << 30, "shift": 40} if bad.requantize else {}
        with pytest.raises(AccumulatorRangeError, match="needs"):
            conv2d_int8_triton(x.to(DEV), w.to(DEV), 127, epilogue=bad, **v)
    # Small weights make the same zero point safe: the bound is read from w.
    w_small = torch.ones((2, c, 3, 3), dtype=torch.int8)
    ep32 = Epilogue((Bias(),))
    bias = torch.tensor([5, -5], dtype=torch.int32)
    check_conv_accumulator_range(w_small, 127, ep32, bias)
    got = conv2d_int8_triton(x.to(DEV), w_small.to(DEV), 127, epilogue=ep32, bias=bias.to(DEV),
                             kernel_cache_dir=kdir, config=big_k)
    assert torch.equal(got.cpu(), conv2d_int8_ref(x, w_small, 127, epilogue=ep32, bias=bias))
    with pytest.raises(AccumulatorRangeError):
        check_conv_accumulator_range(w_small, 127, ep32, torch.tensor([1 - 2**31, 0]))


@triton_only
def test_errors(kdir):
    x, w, geo = _case("groups2")
    with pytest.raises(TypeError, match="int8"):
        conv2d_int8_triton(x.float(), w, **geo)
    with pytest.raises(TypeError, match="int8"):
        conv2d_int8_ref(x, w.to(torch.int32), **geo)
    with pytest.raises(ValueError, match="groups"):
        conv2d_int8_triton(x, w, **{**geo, "groups": 3})
    with pytest.raises(ValueError, match="expects x with"):
        conv2d_int8_triton(x, w, **{**geo, "groups": 1})
    with pytest.raises(ValueError, match="InputZeroPoint"):
        conv2d_int8_triton(x, w, **geo, epilogue=Epilogue((InputZeroPoint(), Bias())))
    with pytest.raises(ValueError, match="in_zp"):
        conv2d_int8_ref(x, w, **{**geo, "in_zp": 128})
    with pytest.raises(TypeError, match="in_zp"):
        conv2d_int8_triton(x, w, **{**geo, "in_zp": 0.5})
    with pytest.raises(TypeError, match="unexpected values"):  # the term is the kernel's
        conv2d_int8_triton(x, w, **geo, epilogue=Epilogue((Bias(),)),
                           bias=torch.zeros(8, dtype=torch.int32),
                           zp_term=torch.zeros(8, dtype=torch.int32))


@triton_only
def test_generated_source(kdir):
    text = generated_source(REQUANT, in_zp=-3, origin="conv1  (layer1.0)")
    FileCheck().check("epilogue: izp+bias+requant.pc").check("# serves:   conv1 (layer1.0)") \
        .check("def conv2d_int8_kernel").check("tl.dot").check("zp_term").check(">> shift") \
        .check("def conv2d_int8_direct_kernel").check_not("tl.dot").run(text)
    assert "float" not in text.split("\nimport triton", 1)[1]  # integer-only: no float op
    assert "izp" not in generated_source(REQUANT, in_zp=0)  # no zero point, no term


@triton_only
def test_kernel_file_names_its_users(tmp_path):
    ep = kernel_epilogue(Epilogue((Bias(),)), 5)
    path = kernel_path(ep, kernel_dir(tmp_path))
    path.write_text("print('planted')\n")  # not what the template makes: never run
    with pytest.warns(CacheWarning, match="it does not start with the generated header"):
        spec = load_conv_kernel(ep, origin="conv_a", cache_dir=tmp_path)
    load_conv_kernel(ep, origin="conv b", cache_dir=tmp_path)
    text = path.read_text()
    assert spec.path == path and "planted" not in text
    assert "# serves:   conv_a\n" in text and text.endswith("# also serves: conv b\n")
