"""The int4-activation ops (lowering/a4_ops.py): quantize_per_token_int4 and
linear_a4w4_dynamic, and the kernels under them (kernels/quantize.py's packing per-token
kernel, kernels/gemm_w4a4.py), with symmetric and with asymmetric (a zero point per token)
activations. The reference against its definition written out here;
every implementation that runs on this machine (CPU routes, the Triton interpreter)
against the reference bit for bit, on odd shapes (M, N, K of 1, 7, 34, 66), rows of equal
values, zeros, ties, huge outliers, int4 weights at -8 and 7, unclipped and clipped (the
activation clip ratio: which values saturate, and the one op order of the scale);
packing against specs.pack_int4 and back; the checks that make bad arguments loud."""

from __future__ import annotations

import pytest
import torch

from qcompile.lowering import a4_ops, cpu_routes, ops, registry
from qcompile.lowering.epilogue import Epilogue
from qcompile.lowering.kernels import gemm_w4a4
from qcompile.lowering.kernels.quantize import (
    quantize_per_token_asym_ref,
    quantize_per_token_asym_triton,
    quantize_per_token_int4_packed_ref,
    quantize_per_token_int4_packed_triton,
    quantize_per_token_ref,
    quantize_per_token_triton,
)
from qcompile.lowering.ops import dynamic_epilogue
from qcompile.lowering.reference import AccumulatorRangeError
from qcompile.numerics.specs import SCALE_EPS, pack_int4, unpack_int4

QUANTIZE, LINEAR = a4_ops.quantize_per_token_int4, a4_ops.linear_a4w4_dynamic


def _impls(op) -> list[str]:
    return [n for n in sorted(op.impls) if n != "reference" and op.impls[n].runs_on("cpu")]


# ---------------------------------------------------------------- definitions


def _quantize_def(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = max((max|x[m]| * clip) / 7, eps) and q = clamp(round_half_even(x / scale),
    -8, 7), all in float32 (clip too)."""
    xf = x.float()
    clip32 = torch.tensor(clip, dtype=torch.float32)
    scale = ((xf.abs().amax(dim=-1) * clip32) / 7).clamp(min=SCALE_EPS)
    q = torch.round(xf / scale[..., None]).clamp(-8, 7).to(torch.int8)
    return q, scale


def _quantize_asym_def(x: torch.Tensor, clip: float = 1.0):
    """lo = min(min(x[m]) * clip, 0), hi = max(max(x[m]) * clip, 0), scale = max((hi - lo) /
    15, eps), zp = clamp(-8 - round_half_even(lo / scale), -8, 7), q = clamp(
    round_half_even(x / scale) + zp, -8, 7), all in float32."""
    xf = x.float()
    clip32 = torch.tensor(clip, dtype=torch.float32)
    lo = torch.minimum(xf.amin(dim=-1) * clip32, torch.zeros(()))
    hi = torch.maximum(xf.amax(dim=-1) * clip32, torch.zeros(()))
    scale = ((hi - lo) / 15).clamp(min=SCALE_EPS)
    zp = (-8 - torch.round(lo / scale)).clamp(-8, 7)
    q = (torch.round(xf / scale[..., None]) + zp[..., None]).clamp(-8, 7).to(torch.int8)
    return q, scale, zp.to(torch.int32)


def _linear_def(x, w, w_scale, bias, clip=1.0, symmetric=True) -> torch.Tensor:
    """Per-token int4 x, the exact int64 accumulator of (q - zp) and w, then ((float32(acc)
    * x_scale[m]) * w_scale[n]) + bias[n] in float32, one cast to x.dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if symmetric:
        q, s = _quantize_def(rows, clip)
    else:
        q, s, zp = _quantize_asym_def(rows, clip)
        q = q.long() - zp[:, None]
    acc = q.long() @ unpack_int4(w).long().T  # [M, N], exact
    y = (acc.float() * s[:, None]) * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------- quantize_per_token_int4


def _quantize_cases():
    g = torch.Generator().manual_seed(0)
    s = 2.0**-4  # a power of two: x / s is exact, so (j + 0.5) s are exact ties
    ties = torch.cat([(torch.arange(-7, 7) + 0.5) * s, torch.tensor([7 * s, -7 * s])])  # [16]
    ends = torch.zeros(4, 34)
    ends[0] = 3.25  # one value throughout: every q is 7
    ends[1] = -1e-3  # ... or -7
    ends[2, 5] = 3e38  # a huge outlier: everything else rounds to 0
    ends[2, 6] = -1.0
    ends[3] = 0.0  # all zeros: the scale guard, q = 0
    outlier = torch.randn(7, 66, generator=g)
    outlier[:, 3] = 1e4  # one outlier channel, as before a Hadamard
    return [
        ("random 7x66", torch.randn(7, 66, generator=g) * 3),
        ("one row, K=34", torch.randn(1, 34, generator=g)),
        ("K=2", torch.randn(5, 2, generator=g)),
        ("batched", torch.randn(2, 3, 34, generator=g) * 0.1),
        ("ties", ties.reshape(1, 16).repeat(2, 1)),
        ("equal rows, outlier, zeros", ends),
        ("outlier channel", outlier),
        ("float16", (torch.randn(3, 34, generator=g) * 50).half()),
        ("bfloat16", torch.randn(3, 66, generator=g).bfloat16()),
        ("float64", torch.randn(2, 34, generator=g, dtype=torch.float64)),
        ("transposed", torch.randn(34, 7, generator=g).T),
    ]


def _op_order_rows() -> torch.Tensor:
    """Rows whose absmax a makes (a * 0.9) / 7, the op order every implementation keeps,
    differ in float32 from a * (0.9 / 7) and from (a / 7) * 0.9: a different order would
    give other scales here."""
    c = torch.tensor(0.9, dtype=torch.float32)
    a = torch.rand(4096, generator=torch.Generator().manual_seed(3)) * 10 + 0.1
    ours = (a * c) / 7
    a = a[(ours != a * (c / 7)) & (ours != (a / 7) * c)][:6]
    assert a.numel() == 6
    rows = torch.linspace(-1, 1, 34).repeat(6, 1) * a[:, None] * 0.5
    rows[:, 7] = a  # the absmax, once per row
    return rows


QCASES = [*_quantize_cases(), ("op order", _op_order_rows())]
QIDS = [c[0] for c in QCASES]
# 1.0: no clipping; QuaRot's 0.9; 0.3 saturates much of a row, 1e-3 nearly all of it
CLIPS = [1.0, 0.9, 0.3, 1e-3]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("name, x", QCASES, ids=QIDS)
def test_quantize_reference_is_the_definition(name, x, clip):
    q, scale, zp = QUANTIZE(x, False, clip, impl="reference")
    want_q, want_s = _quantize_def(x, clip)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert torch.equal(q, want_q) and torch.equal(scale, want_s) and not zp.any()
    assert q.shape == x.shape and scale.shape == x.shape[:-1] == zp.shape


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("name, x", QCASES, ids=QIDS)
def test_asymmetric_reference_is_the_definition(name, x, clip):
    got = QUANTIZE(x, False, clip, False, impl="reference")
    want = _quantize_asym_def(x, clip)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
    q, scale, zp = got
    assert q.shape == x.shape and scale.shape == x.shape[:-1] == zp.shape


def test_asymmetric_rows_use_all_16_levels():
    """A row in [0, 1.5]: zero point -8 and 15 steps of 0.1 (the symmetric grid would use 8
    of its 16 levels); all negative: zero point 7; all zeros: the scale guard, and the
    dequantized zeros are exact."""
    x = torch.stack([torch.arange(16) * 0.1, -torch.arange(16) * 0.1, torch.zeros(16)])
    q, s, zp = QUANTIZE(x, False, 1.0, False, impl="reference")
    assert zp.tolist() == [-8, 7, -8] and s[2] == SCALE_EPS
    assert q[0].tolist() == list(range(-8, 8)) and q[1].tolist() == list(range(7, -9, -1))
    assert ((q[2].float() - zp[2]) * s[2] == 0).all()


def test_quantize_cases_reach_the_ends():
    _, _, _, _, (_, ties), (_, ends), *_ = QCASES
    q, _, _ = QUANTIZE(ties, False, 1.0, impl="reference")
    assert q[0, :14].tolist() == [-6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6]  # to even
    q, s, _ = QUANTIZE(ends, False, 1.0, impl="reference")
    assert (q[0] == 7).all() and (q[1] == -7).all() and (q[3] == 0).all()
    assert q[2, 5] == 7 and q[2].abs().sum() == 7 and s[3] == SCALE_EPS


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("impl", _impls(QUANTIZE))
def test_quantize_implementations_equal_the_reference(impl, packed, clip, symmetric):
    for name, x in QCASES:
        want_q, want_s, want_zp = QUANTIZE(x, packed, clip, symmetric, impl="reference")
        q, s, zp = QUANTIZE(x, packed, clip, symmetric, impl=impl)
        assert q.dtype == want_q.dtype and torch.equal(q, want_q), name
        assert torch.equal(s, want_s), name
        assert zp.dtype == torch.int32 and torch.equal(zp, want_zp), name


@pytest.mark.parametrize("impl", sorted(QUANTIZE.impls))
def test_clip_saturates_the_values_beyond_it(impl):
    """absmax 14 at clip 0.5: scale (14 * 0.5) / 7 = 1 exactly, so x / scale is x: what lies
    beyond 7 saturates at 7, beyond -8.5 at -8, the rest rounds on the finer grid; unclipped,
    the scale is 2 and only the absmax reaches the ends (7, -7)."""
    if not QUANTIZE.impls[impl].runs_on("cpu"):
        pytest.skip(f"{impl} does not run here")
    x = torch.tensor([[14.0, -14.0, 8.0, -9.0, 7.6, -8.4, 7.4, 3.0, -3.5, 0.0]])
    q, s, _ = QUANTIZE(x, False, 0.5, impl=impl)
    assert s.tolist() == [1.0]
    assert q.tolist() == [[7, -8, 7, -8, 7, -8, 7, 3, -4, 0]]
    q, s, _ = QUANTIZE(x, False, 1.0, impl=impl)
    assert s.tolist() == [2.0]
    assert q.tolist() == [[7, -7, 4, -4, 4, -4, 4, 2, -2, 0]]
    p, _, _ = QUANTIZE(x, True, 0.5, impl=impl)
    assert torch.equal(unpack_int4(p), torch.tensor([[7, -8, 7, -8, 7, -8, 7, 3, -4, 0]]))


def test_clip_saturates_the_tail_of_a_gaussian_row():
    """QuaRot's 0.9 on a Gaussian row (its absmax positive): every value from 0.9 of the
    absmax up is 7, every one from -(7.5 / 7) * 0.9 of it down -8 (where x / scale rounds
    to -8 or beyond), more values at the ends than unclipped."""
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(16))
    x = x * x.flatten()[x.abs().argmax()].sign()
    a = x.abs().max()
    top, bottom = x >= a * 0.9, x <= -a * 0.9 * 7.5 / 7
    assert int(top.sum()) == 7 and int(bottom.sum()) == 1  # more than the absmax itself
    q, _, _ = QUANTIZE(x, False, 0.9, impl="reference")
    assert (q[top] == 7).all() and (q[bottom] == -8).all()
    q1, _, _ = QUANTIZE(x, False, 1.0, impl="reference")
    ends = lambda t: int(((t == 7) | (t == -8)).sum())  # noqa: E731
    assert ends(q) > ends(q1) and not (q1 == -8).any()  # unclipped, the grid ends at -7


@pytest.mark.parametrize("impl", sorted(QUANTIZE.impls))
def test_packing_round_trips(impl):
    """packed == specs.pack_int4(unpacked), and unpacking gives the values back."""
    if not QUANTIZE.impls[impl].runs_on("cpu"):
        pytest.skip(f"{impl} does not run here")
    for name, x in QCASES:
        for symmetric in (True, False):
            q, _, _ = QUANTIZE(x, False, 0.9, symmetric, impl=impl)
            p, _, _ = QUANTIZE(x, True, 0.9, symmetric, impl=impl)
            assert p.dtype == torch.uint8 and p.shape == (*x.shape[:-1], x.shape[-1] // 2)
            assert torch.equal(p, pack_int4(q)) and torch.equal(unpack_int4(p), q), name


def test_pack_int4_values_is_specs_layout_for_every_pair():
    v = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.stack(torch.meshgrid(v, v, indexing="ij"), dim=-1).reshape(1, 512)  # 256 pairs
    assert torch.equal(a4_ops.pack_int4_values(pairs), pack_int4(pairs))
    assert torch.equal(unpack_int4(a4_ops.pack_int4_values(pairs)), pairs)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_long_rows_take_the_two_pass_kernel(clip, symmetric):
    """Rows longer than a step (block_b, block_k below K): the kernels read x twice, same
    bytes (and the same zero points)."""
    x = torch.randn(3, 130, generator=torch.Generator().manual_seed(1))
    x[1, 129] = 40.0  # the row's max in the last step
    x[0, 128] = -50.0  # the row's min in the last step
    x[2] = x[2].abs() + 1.0  # a row without negatives: its zero point at -8
    if symmetric:
        unpacked = (quantize_per_token_ref, quantize_per_token_triton)
    else:
        unpacked = (quantize_per_token_asym_ref, quantize_per_token_asym_triton)
    for want, got in [
        (quantize_per_token_int4_packed_ref(x, clip=clip, symmetric=symmetric),
         quantize_per_token_int4_packed_triton(x, clip=clip, block_b=16, symmetric=symmetric)),
        (unpacked[0](x, bits=4, clip=clip), unpacked[1](x, bits=4, clip=clip, block_k=16)),
    ]:
        assert len(got) == (2 if symmetric else 3) and (symmetric or want[2][2] == -8)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_large_inputs_take_the_fused_cpu_path_with_the_same_integers():
    """2**18 elements and more run Inductor-fused on the CPU path: the clip's product and
    the division stay two float32 roundings there too."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(5)) * 3
    x[:, 11] = torch.rand(64, generator=torch.Generator().manual_seed(6)) * 40  # absmaxes
    assert x.numel() >= ops._FUSE_MIN_ELEMENTS
    for symmetric in (True, False):
        want = QUANTIZE(x, False, 0.9, symmetric, impl="reference")
        got = QUANTIZE(x, False, 0.9, symmetric, impl="cpu")
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- linear_a4w4_dynamic


def _linear_case(name: str):
    """(x, w packed, w_scale, bias) for linear_a4w4_dynamic; (M, N, K) odd where it can be."""
    g = torch.Generator().manual_seed(len(name))
    m, n, k = {"random": (7, 33, 66), "one row": (1, 7, 34), "batched": (6, 66, 34),
               "extremes": (4, 7, 34), "bfloat16": (7, 1, 66)}[name]
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    if name == "batched":
        x, bias = x.reshape(2, 3, k), None
    elif name == "extremes":
        x[0] = -2.5  # equal values: q = -7 throughout
        x[1] = 0.0  # all zeros
        x[2, 0] = 1e6  # an outlier
        x[3] = torch.where(torch.arange(k) % 2 == 0, 7.0, -7.0)
        w[0], w[1] = -8, 7  # the ends of int4
        w[2] = torch.where(torch.arange(k) % 2 == 0, -8, 7).to(torch.int8)
    elif name == "bfloat16":
        x, bias = x.bfloat16(), bias.bfloat16()
    return x, pack_int4(w), w_scale, bias


LINEAR_CASES = ["random", "one row", "batched", "extremes", "bfloat16"]


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_reference_is_the_definition(case, clip):
    args = _linear_case(case)
    got = LINEAR(*args, clip, impl="reference")
    assert got.dtype == args[0].dtype
    assert torch.equal(got, _linear_def(*args, clip))
    w_sum = a4_ops.weight_row_sums(args[1])
    got = LINEAR(*args, clip, w_sum, impl="reference")
    assert torch.equal(got, _linear_def(*args, clip, symmetric=False))


def test_asymmetric_linear_is_closer_to_float_on_a_one_sided_input():
    """Post-GELU-like rows (mostly positive): the zero point doubles the levels in use."""
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.gelu(torch.randn(64, 128, generator=g) + 1.0)
    w = torch.randint(-8, 8, (32, 128), generator=g, dtype=torch.int8)
    w_scale = torch.full((32,), 0.01)
    exact = torch.nn.functional.linear(x, w.float() * w_scale[:, None])
    sym = LINEAR(x, pack_int4(w), w_scale, None, 1.0, impl="reference")
    asym = LINEAR(x, pack_int4(w), w_scale, None, 1.0, a4_ops.weight_row_sums(w),
                  impl="reference")
    assert (asym - exact).pow(2).mean() < 0.5 * (sym - exact).pow(2).mean()


@pytest.mark.slow
def test_large_asymmetric_calls_take_the_compiled_cpu_epilogue_with_the_same_outputs():
    """2**18 outputs and more: the CPU epilogue runs Inductor-compiled, the zero points' term
    included (float32 where exact, else the integer path), on every route."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(512, 512, generator=g) * 2 + 0.3
    w = torch.randint(-8, 8, (512, 512), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(512, generator=g) * 0.01, torch.randn(512, generator=g)
    w_sum = a4_ops.weight_row_sums(w)
    want = LINEAR(x, pack_int4(w), w_scale, bias, 0.8, w_sum, impl="reference")
    for impl in _impls(LINEAR):
        prepare = LINEAR.impls[impl].prepare
        wi = prepare({"w": pack_int4(w)})["w"] if prepare else pack_int4(w)
        assert torch.equal(LINEAR(x, wi, w_scale, bias, 0.8, w_sum, impl=impl), want), impl


def test_a_wrong_w_sum_is_refused_by_the_reference():
    x, w, w_scale, bias = _linear_case("random")
    w_sum = a4_ops.weight_row_sums(w)
    w_sum[3] += 1
    with pytest.raises(ValueError, match="w_sum is not the weight rows' sums"):
        LINEAR(x, w, w_scale, bias, 0.9, w_sum, impl="reference")


def test_extremes_reach_the_accumulator_ends():
    x, w, *_ = _linear_case("extremes")
    q, _, _ = QUANTIZE(x, False, 1.0, impl="reference")
    acc = q.long() @ unpack_int4(w).long().T
    k = x.shape[-1]
    assert acc[0, 0] == 56 * k and acc[0, 1] == -49 * k  # -7 x -8 and -7 x 7 throughout
    assert acc[3, 2] == -(56 + 49) * (k // 2) and (acc[1] == 0).all()  # 7 x -8, -7 x 7


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("impl", _impls(LINEAR))
@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_implementations_equal_the_reference(impl, clip, symmetric):
    prepare = LINEAR.impls[impl].prepare
    for case in LINEAR_CASES:
        x, w, w_scale, bias = _linear_case(case)
        w_sum = None if symmetric else a4_ops.weight_row_sums(w)
        want = LINEAR(x, w, w_scale, bias, clip, w_sum, impl="reference")
        assert torch.equal(LINEAR(x, w, w_scale, bias, clip, w_sum, impl=impl), want), case
        if prepare is not None:  # the CPU implementations unpack w at lowering: same outputs
            pw = prepare({"w": w})["w"]
            assert pw.dtype == torch.int8
            assert torch.equal(LINEAR(x, pw, w_scale, bias, clip, w_sum, impl=impl), want)


def test_triton_takes_an_unpacked_weight_too():
    """int4 values in int8 storage run the generated int8 GEMM on the unpacked x."""
    x, w, w_scale, bias = _linear_case("one row")
    want = LINEAR(x, w, w_scale, bias, 0.9, impl="reference")
    assert torch.equal(LINEAR(x, unpack_int4(w), w_scale, bias, 0.9, impl="triton"), want)
    w_sum = a4_ops.weight_row_sums(w)
    want = LINEAR(x, w, w_scale, bias, 0.9, w_sum, impl="reference")
    assert torch.equal(LINEAR(x, unpack_int4(w), w_scale, bias, 0.9, w_sum, impl="triton"),
                       want)


def test_w4a4_gemm_accumulator_is_exact_at_the_ends():
    """The packed kernel's int32 accumulator (no epilogue): -8 x -8 and 7 x -8 throughout,
    and mixed signs, over K = 66 (a masked last K tile)."""
    k = 66
    a = torch.full((3, k), -8, dtype=torch.int8)
    a[1] = 7
    a[2] = torch.where(torch.arange(k) % 3 == 0, -8, 7).to(torch.int8)
    w = torch.full((5, k), -8, dtype=torch.int8)
    w[1] = 7
    w[2, ::2] = 7
    w[4] = torch.randint(-8, 8, (k,), generator=torch.Generator().manual_seed(2),
                         dtype=torch.int8)
    acc = gemm_w4a4.gemm_w4a4_triton(pack_int4(a), pack_int4(w), Epilogue())
    assert acc.dtype == torch.int32
    assert acc.tolist() == (a.long() @ w.long().T).tolist()
    assert acc[0, 0] == 64 * k
    assert torch.equal(acc, gemm_w4a4.gemm_w4a4_ref(pack_int4(a), pack_int4(w)))


def test_generated_kernel_has_the_int8_gemms_dequantize_lines():
    """The float epilogue is the codegen's Dequantize step, as in the int8 GEMM."""
    from qcompile.lowering.codegen import generated_source

    src = gemm_w4a4.generated_source(dynamic_epilogue(True), origin="test")
    gemm_src = generated_source(dynamic_epilogue(True))
    for line in ("y = x.to(tl.float32) * row_scale[:, None]", "y = y * col_scale[None, :]",
                 "y = y + float_bias[None, :]"):
        assert line in src and line in gemm_src
    torch.testing.FileCheck().check("def gemm_w4a4_kernel").check("unpack_int4(a)").check(
        "tl.dot(a_even, w_even").check("tl.dot(a_odd, w_odd").run(src)
    # asymmetric activations: the row zero points' term before the conversion, in int32
    # (bounded for int4: no int64 tile)
    src = gemm_w4a4.generated_source(dynamic_epilogue(True, True), origin="test")
    torch.testing.FileCheck().check("x = acc  #").check(
        "x = x - row_zp[:, None] * col_sum[None, :]").check(
        "y = x.to(tl.float32) * row_scale[:, None]").run(src)
    assert "tl.int64" not in src


# ---------------------------------------------------------------- registry, fakes, errors


def test_registered_with_every_family():
    assert {"reference", "cpu", "triton"} | {f"cpu-{r}" for r in cpu_routes.ROUTES} <= set(
        LINEAR.impls)
    assert set(QUANTIZE.impls) == {"reference", "cpu", "triton"}
    assert LINEAR.exact and QUANTIZE.exact
    assert registry.choose(LINEAR, "auto", "cpu").name == "cpu"
    assert LINEAR.epilogue({"bias": None, "w_sum": None}).signature() == "dequant.float32"
    w_sum = torch.zeros(3, dtype=torch.int32)
    assert LINEAR.epilogue({"bias": None, "w_sum": w_sum}).signature() == "rzp+dequant.float32"
    assert all(op in registry.all_ops() for op in (QUANTIZE, LINEAR))


def test_fakes_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, w_scale, bias = _linear_case("batched")
    odd = x[..., :-1]
    w_sum = a4_ops.weight_row_sums(w)
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        y = LINEAR(f(x), f(w), f(w_scale), None, 0.9)
        assert y.shape == (2, 3, w.shape[0]) and y.dtype == x.dtype
        y = LINEAR(f(x), f(w), f(w_scale), None, 0.9, f(w_sum))
        assert y.shape == (2, 3, w.shape[0]) and y.dtype == x.dtype
        q, s, zp = QUANTIZE(f(x), True, 0.9)
        assert q.shape == (2, 3, 17) and q.dtype == torch.uint8 and s.shape == (2, 3)
        assert zp.shape == (2, 3) and zp.dtype == torch.int32
        q, s, _ = QUANTIZE(f(x), False, 1.0, False)
        assert q.shape == x.shape and q.dtype == torch.int8 and s.dtype == torch.float32
        with pytest.raises(ValueError, match="even K"):
            QUANTIZE(f(odd), True, 1.0)
        with pytest.raises(ValueError, match=r"clip must be a number in \(0, 1\]"):
            QUANTIZE(f(x), False, 0.0)


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_bad_arguments_are_loud(impl):
    x, w, w_scale, bias = _linear_case("random")
    for args, error, message in [
        ((x.to(torch.int8), w, w_scale, bias, 0.9), TypeError, "x must be a floating"),
        ((x, w.to(torch.int16), w_scale, bias, 0.9), TypeError, "w must be packed int4"),
        ((x[:, :-2], w, w_scale, bias, 0.9), ValueError, "K = 64 but w"),
        ((x, w, w_scale[:-1], bias, 0.9), ValueError, "w_scale must have N = 33"),
        ((x, w, w_scale.long(), bias, 0.9), TypeError, "w_scale must be a float"),
        ((x, w, w_scale, bias[:3], 0.9), ValueError, "bias must have N"),
        ((x, w, w_scale, bias, 1.5), ValueError, r"clip must be a number in \(0, 1\]"),
        ((x, w, w_scale, bias, -0.9), ValueError, r"clip must be a number in \(0, 1\]"),
        ((x, w, w_scale, bias, 0.9, a4_ops.weight_row_sums(w).long()), TypeError,
         "w_sum .* must be the weight rows' sums, int32"),
        ((x, w, w_scale, bias, 0.9, a4_ops.weight_row_sums(w)[:-1]), TypeError,
         "w_sum .* int32 \\[N = 33\\]"),
    ]:
        with pytest.raises(error, match=message):
            LINEAR(*args, impl=impl)
    with pytest.raises(ValueError, match="even K"):
        QUANTIZE(x[:, :-1], True, 0.9, impl=impl)
    with pytest.raises(TypeError, match="floating-point"):
        QUANTIZE(x.to(torch.int8), False, 0.9, impl=impl)
    for clip in (0.0, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"clip must be a number in \(0, 1\]"):
            QUANTIZE(x, False, clip, impl=impl)


def test_k_is_held_to_the_int8_gemms_bound():
    """Every family refuses K > 131071, as the int8 GEMM the reference runs on does."""
    a = torch.zeros(1, 131072 // 2, dtype=torch.uint8)
    with pytest.raises(AccumulatorRangeError, match="131071"):
        gemm_w4a4.gemm_w4a4_triton(a, a, Epilogue())
    with pytest.raises(AccumulatorRangeError, match="131071"):
        gemm_w4a4.gemm_w4a4_ref(a, a, Epilogue())
