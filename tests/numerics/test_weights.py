"""Tests for qcompile.numerics.weights: RTN bounds, GPTQ against an independent OBQ-style
reference, GPTQ beating RTN on correlated inputs, act_order, groups, dead columns."""

import time

import pytest
import torch

from qcompile.numerics.observers import HessianObserver, shrink_hessian
from qcompile.numerics.specs import (
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_qparam,
    pack_int4,
    quantize,
    weight_spec,
)
from qcompile.numerics.weights import gptq_quantize, quantize_weight_rtn, weight_qparams

RTN_SPECS = [
    weight_spec(8),
    weight_spec(8, symmetric=False),
    weight_spec(4, group_size=32),
    weight_spec(4, group_size=16, symmetric=False),
    QuantSpec(bits=4),
]


def _problem(seed, n=64, k=128, rows=1024, outliers=4):
    """A weight [n, k] and correlated inputs [rows, k] with a few large channels, like LLM
    activations; returns (w, x, H = 2/rows x^T x)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.2 * torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :outliers] *= 10.0
    w = torch.randn(n, k, generator=g) * 0.05
    xd = x.double()
    return w, x, 2.0 / rows * xd.T @ xd


def _output_error(x, w, qw):
    return (x @ w.T - x @ qw.dequantize().T).norm().item()


# ---------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", RTN_SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}")
def test_rtn_error_is_at_most_half_a_step(spec):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    qw = quantize_weight_rtn(w, spec)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == w.shape
    assert int(qw.qweight.min()) >= spec.qmin and int(qw.qweight.max()) <= spec.qmax
    expected_shape = {"per_tensor": (), "per_channel": (24,)}.get(
        spec.granularity, (24, 64 // (spec.group_size or 1))
    )
    assert qw.scale.shape == expected_shape and qw.zero_point.shape == expected_shape
    step = expand_qparam(qw.scale, w.shape, spec)
    assert ((w - qw.dequantize()).abs() <= step * (0.5 + 1e-5)).all()


def test_rtn_group_scales_are_per_row_per_group():
    w = torch.zeros(2, 8)
    w[0, 5] = 7.0  # row 0, group 1 (columns 4..7)
    w[1, 0] = -3.5  # row 1, group 0: a negative end reaches -8 (weight_qparams)
    qw = quantize_weight_rtn(w, weight_spec(4, group_size=4))
    assert qw.scale[0, 1].item() == 1.0 and qw.scale[1, 0].item() == 3.5 / 8
    assert qw.qweight[0, 5].item() == 7 and qw.qweight[1, 0].item() == -8
    assert torch.equal(qw.dequantize(), w)


def test_rtn_packed_and_errors():
    w = torch.randn(8, 32)
    qw4 = quantize_weight_rtn(w, weight_spec(4, group_size=16))
    assert torch.equal(qw4.packed(), pack_int4(qw4.qweight))
    with pytest.raises(ValueError, match="two per byte"):
        quantize_weight_rtn(w).packed()
    with pytest.raises(ValueError, match="per_channel"):
        quantize_weight_rtn(w, QuantSpec(granularity="per_token"))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight_rtn(w, weight_spec(4))  # default group 128 > K = 32
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_weight_rtn(torch.randn(8))


# ---------------------------------------------------------------------------------------
# GPTQ against an independent reference
# ---------------------------------------------------------------------------------------


def _obq_reference(w, h, spec, damp, act_order):
    """GPTQ in its original OBQ form: no Cholesky, no blocks. After each column the full
    inverse Hessian is updated to drop that column (Gaussian elimination), and every
    remaining column takes -err / Hinv[c, c] * Hinv[c, :]. Exact arithmetic gives the
    same result as the Cholesky/blocked algorithm."""
    w = w.double().clone()
    h = h.double().clone()
    n, k = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    order = order.tolist() if order is not None else list(range(k))
    row_spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric, granularity="per_channel")
    if spec.granularity == "per_group":
        g = spec.group_size
        params = {}
    else:
        scale, zp = weight_qparams(w.float().amin(1), w.float().amax(1), row_spec)
    q = torch.empty(n, k, dtype=torch.int8)
    for c in order:
        if spec.granularity == "per_group":
            gi = c // g
            if gi not in params:
                cols = w[:, gi * g : (gi + 1) * g]
                params[gi] = weight_qparams(cols.amin(1), cols.amax(1), row_spec)
            scale, zp = params[gi]
        col = w[:, c : c + 1]
        q[:, c : c + 1] = quantize(col, scale, zp, row_spec)
        deq = dequantize(q[:, c : c + 1], scale, zp, row_spec).double()
        d = hinv[c, c]
        w -= ((col - deq) / d) @ hinv[c : c + 1, :]
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / d
    return q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "spec",
    [weight_spec(8), weight_spec(4, group_size=16), weight_spec(4, group_size=8, symmetric=False)],
    ids=["8b-channel", "4b-g16", "4b-g8-asym"],
)
@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_gptq_matches_obq_reference(spec, act_order, block_size):
    w, _, h = _problem(seed=1, n=16, k=48, rows=256)
    ref = _obq_reference(w, h, spec, 0.01, act_order)
    qw = gptq_quantize(w, h, spec, act_order=act_order, block_size=block_size)
    # Same algorithm in exact arithmetic; float64 leaves rounding decisions identical.
    assert torch.equal(qw.qweight, ref)


@pytest.mark.parametrize("group_size", [16, 48])
def test_gptq_with_diagonal_hessian_is_rtn(group_size):
    # No correlation between inputs: nothing to compensate, so GPTQ must reduce to RTN, even
    # with act_order reordering columns (which checks un-permutation and that group
    # parameters land on the original column groups).
    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.linspace(0.1, 5.0, 96, dtype=torch.float64).flip(0).roll(37))
    spec = weight_spec(4, group_size=group_size)
    rtn = quantize_weight_rtn(w, spec)
    qw = gptq_quantize(w, h, spec, act_order=True, block_size=40)
    assert torch.equal(qw.qweight, rtn.qweight)
    assert torch.equal(qw.scale, rtn.scale) and torch.equal(qw.zero_point, rtn.zero_point)


# ---------------------------------------------------------------------------------------
# GPTQ quality, dead columns, determinism
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,act_order",
    [
        (weight_spec(4, group_size=64), False),
        (weight_spec(4, group_size=64), True),
        (QuantSpec(bits=4, granularity="per_channel"), True),
        (weight_spec(8), False),
    ],
    ids=["4b-g64", "4b-g64-act", "4b-channel-act", "8b-channel"],
)
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
    w, x, h = _problem(seed=3)
    gptq = gptq_quantize(w, h, spec, act_order=act_order)
    rtn = quantize_weight_rtn(w, spec)
    assert _output_error(x, w, gptq) < 0.9 * _output_error(x, w, rtn)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rows", [8, 32])
def test_gptq_on_a_shrunk_hessian_from_few_rows_does_not_overfit(seed, rows):
    """From fewer calibration rows than inputs (64), GPTQ on H as measured fits those rows
    and loses to round-to-nearest on new rows of the same inputs; on H shrunk as
    HessianObserver.shrinkage says it does not."""
    g = torch.Generator().manual_seed(seed)
    k = 64
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    w = torch.randn(32, k, generator=g)
    obs = HessianObserver()
    obs.update(torch.randn(rows, k, generator=g) @ mix)
    fresh = torch.randn(4000, k, generator=g) @ mix
    spec = weight_spec(4, group_size=16)
    rtn = _output_error(fresh, w, quantize_weight_rtn(w, spec))
    raw = _output_error(fresh, w, gptq_quantize(w, obs.hessian, spec, act_order=True))
    shrunk = _output_error(fresh, w, gptq_quantize(
        w, shrink_hessian(obs.hessian, obs.shrinkage), spec, act_order=True))
    assert raw > 1.15 * rtn
    assert shrunk < 1.03 * rtn


def test_gptq_dead_columns():
    w, x, h = _problem(seed=4, k=64)
    dead = [0, 5, 33, 63]
    x[:, dead] = 0.0
    h = 2.0 / x.shape[0] * x.double().T @ x.double()
    spec = weight_spec(4, group_size=32, symmetric=False)
    qw = gptq_quantize(w, h, spec, act_order=True)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qw.scale).all()
    assert (deq[:, dead] == 0).all()
    assert _output_error(x, w, qw) < 0.9 * _output_error(x, w, quantize_weight_rtn(w, spec))
    # A fully dead group (all zero) still gets a usable scale.
    h[:32, :] = 0.0
    h[:, :32] = 0.0
    qw = gptq_quantize(w, h, spec)
    assert torch.isfinite(qw.scale).all() and (qw.dequantize()[:, :32] == 0).all()


def test_gptq_is_deterministic():
    w, _, h = _problem(seed=5)
    spec = weight_spec(4, group_size=32)
    a = gptq_quantize(w, h, spec, act_order=True)
    b = gptq_quantize(w.clone(), h.clone(), spec, act_order=True)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)


def test_gptq_errors():
    w = torch.randn(4, 2)
    with pytest.raises(ValueError, match="Hessian, must be"):
        gptq_quantize(w, torch.eye(3))
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, indefinite, damp=0.0)
    w16 = torch.randn(4, 16)
    with pytest.raises(ValueError, match="group_search chooses"):  # a clip it would ignore
        gptq_quantize(w16, torch.eye(16), weight_spec(4, group_size=16), clip=torch.ones(4),
                      group_search=True)
    with pytest.raises(ValueError, match="group_search chooses"):  # no groups to search
        gptq_quantize(w16, torch.eye(16), weight_spec(8), group_search=True)


def test_gptq_speed_1536x384():
    # CPU time of one thread, not wall time: the test machine is shared (other workers,
    # other processes), and oversubscribed thread pools make wall time meaningless there.
    w, _, h = _problem(seed=6, n=1536, k=384, rows=512)
    spec = weight_spec(4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gptq_quantize(w, h, spec)  # first LAPACK use carries a one-off cost
        times = []
        for _ in range(2):
            start = time.process_time()
            gptq_quantize(w, h, spec, act_order=True)
            times.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 1.0


# ---------------------------------------------------------------------------------------
# clipping: per-row ratios searched on the output error
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="per_channel"),
                                  weight_spec(4, group_size=32)], ids=["channel", "g32"])
def test_clip_search_cuts_output_error_and_feeds_rtn_and_gptq(spec):
    from qcompile.numerics.weights import clip_search

    w, x, h = _problem(seed=5)
    w[:, 7] *= 6  # a heavy-tailed column: clipping it trades its error for every other's
    clip = clip_search(w, spec, h)
    assert clip.shape == (w.shape[0],) and bool(((clip >= 0.5) & (clip <= 1)).all())
    assert int((clip < 1).sum()) > 0
    rtn, clipped = quantize_weight_rtn(w, spec), quantize_weight_rtn(w, spec, clip=clip)
    assert _output_error(x, w, clipped) < 0.97 * _output_error(x, w, rtn)
    # each row's range (every group's) shrinks by exactly its ratio
    lo = quantize_weight_rtn(w, spec, clip=torch.ones_like(clip))
    assert torch.equal(lo.qweight, rtn.qweight) and torch.equal(lo.scale, rtn.scale)
    ratio = clipped.scale / rtn.scale
    expected = clip if ratio.dim() == 1 else clip[:, None].expand_as(ratio)
    torch.testing.assert_close(ratio, expected, rtol=1e-5, atol=0)
    gptq = gptq_quantize(w, h, spec, clip=clip)
    assert _output_error(x, w, gptq) < _output_error(x, w, gptq_quantize(w, h, spec))


def test_clip_search_without_hessian_minimises_the_weight_error():
    from qcompile.numerics.weights import clip_search

    spec = QuantSpec(bits=4, granularity="per_channel")
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    clip = clip_search(w, spec)
    for r in (1.0, 0.9, 0.75, 0.5):  # no single ratio beats the per-row choice on any row
        d = (w - quantize_weight_rtn(w, spec, clip=torch.full((32,), r)).dequantize())
        best = (w - quantize_weight_rtn(w, spec, clip=clip).dequantize())
        assert bool((best.pow(2).sum(1) <= d.pow(2).sum(1) * (1 + 1e-5)).all())


def test_clip_errors():
    from qcompile.numerics.weights import clip_search

    w = torch.randn(4, 8)
    spec = QuantSpec(bits=4, granularity="per_channel")
    with pytest.raises(ValueError, match="one ratio per output row"):
        quantize_weight_rtn(w, spec, clip=torch.ones(3))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        quantize_weight_rtn(w, spec, clip=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="per-tensor"):
        clip_search(w, QuantSpec(bits=4))


# ---------------------------------------------------------------------------------------
# Group scales on the row's integer grid (integer-only group-wise int4)
# ---------------------------------------------------------------------------------------

LEVELED = QuantSpec(bits=4, granularity="per_group", group_size=16, group_levels=16)
ASYM_LEVELED = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16,
                         group_levels=8)


def _grouped_weight(seed=5, n=48, k=128):
    """Rows whose groups span ranges 1 to 40x apart (what per-channel int4 loses on)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    spread = torch.rand(n, k // 16, generator=g) * 39 + 1
    return w * spread.repeat_interleave(16, dim=1)


@pytest.mark.parametrize("symmetric,levels", [(True, 16), (True, 8), (True, 1), (False, 8),
                                               (False, 4), (False, 1)])
@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-search"])
def test_leveled_groups_are_int8_values_at_one_scale_per_row(symmetric, levels, method):
    """Each group's scale is row_scale times an integer in 1..levels, so int_values()
    (q, less the group's zero point where asymmetric, times that integer) times row_scale
    is the dequantized weight, in the int8 range the levels allow; levels=1 is one scale
    per row."""
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="per_group", group_size=16,
                     group_levels=levels)
    w, x, h = _problem(seed=2)
    qw = quantize_weight_rtn(w, spec) if method == "rtn" else \
        gptq_quantize(w, h, spec, group_search=method == "gptq-search")
    mult = qw.group_mult
    assert mult.dtype == torch.int8 and mult.shape == (64, 8)
    assert 1 <= int(mult.min()) and int(mult.max()) <= levels
    if method == "rtn":  # the row's widest group sets its grid
        assert int(mult.max()) == levels
    ints = qw.int_values()
    assert ints.dtype == torch.int8
    lo, hi = (-8, 7) if symmetric else (-15, 15)
    assert lo * levels <= int(ints.min()) and int(ints.max()) <= hi * levels
    if not symmetric:
        assert int(qw.zero_point.abs().max()) > 0  # the groups' zero points are used
    torch.testing.assert_close(ints.float() * qw.int_scale()[:, None], qw.dequantize(),
                               rtol=1e-6, atol=0)
    if levels == 1 and symmetric:  # every group at the row's scale: the per-channel weight
        channel = quantize_weight_rtn(w, QuantSpec(bits=4, granularity="per_channel"))
        if method == "rtn":
            assert torch.equal(ints, channel.qweight)


def test_asymmetric_groups_on_the_grid_beat_symmetric_ones_on_skewed_groups():
    """Groups whose values sit mostly on one side of 0 (what a rotation leaves in many
    layers): a zero point per group with 8 levels has less error than symmetric groups
    with 16, since a symmetric group spends half its 16 codes where it has no values."""
    w = _grouped_weight(seed=9)
    g = torch.Generator().manual_seed(1)
    w = w + w.abs().mean() * 3 * torch.randn(w.shape[0], w.shape[1] // 16, generator=g
                                             ).repeat_interleave(16, dim=1)
    err = {spec.symmetric: float((quantize_weight_rtn(w, spec).dequantize() - w).pow(2).sum())
           for spec in (LEVELED, ASYM_LEVELED)}
    assert err[False] < 0.7 * err[True]


def test_leveled_groups_keep_most_of_what_float_group_scales_gain():
    """On rows with groups of very different ranges, integer group multipliers (16 levels)
    cut the weight error to under half of per-channel int4's, close to float group scales'."""
    w = _grouped_weight()
    err = {}
    for name, spec in (("channel", QuantSpec(bits=4, granularity="per_channel")),
                       ("float groups", weight_spec(4, group_size=16)),
                       ("16 levels", LEVELED)):
        err[name] = float((quantize_weight_rtn(w, spec).dequantize() - w).pow(2).sum())
    assert err["16 levels"] < 0.5 * err["channel"]
    assert err["16 levels"] < 1.2 * err["float groups"]


@pytest.mark.parametrize("spec", [LEVELED, ASYM_LEVELED], ids=["symmetric", "asymmetric"])
def test_a_group_never_gets_a_narrower_range_than_its_own(spec):
    """Rounding a group's scale up to the row's grid (and, asymmetric, its zero point
    recomputed at that scale): no value saturates, every w within half a step of its
    dequantized value."""
    w = _grouped_weight(seed=7)
    qw = quantize_weight_rtn(w, spec)
    scale = qw.scale.repeat_interleave(16, dim=1)
    assert bool(((qw.dequantize() - w).abs() <= 0.5 * scale * (1 + 1e-5)).all())
    assert bool((qw.qweight >= -8).all() and (qw.qweight <= 7).all())


def test_group_levels_errors():
    with pytest.raises(ValueError, match="belongs to per_group specs"):
        QuantSpec(bits=4, granularity="per_channel", group_levels=16)
    with pytest.raises(ValueError, match="at most 8 for asymmetric 4-bit"):
        QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=8,
                  group_levels=9)
    with pytest.raises(ValueError, match="at most 16 for 4-bit"):
        QuantSpec(bits=4, granularity="per_group", group_size=8, group_levels=17)
    with pytest.raises(ValueError, match="at most 1 for 8-bit"):
        QuantSpec(bits=8, granularity="per_group", group_size=8, group_levels=2)
    w = torch.randn(4, 16)
    qw = quantize_weight_rtn(w, LEVELED)
    with pytest.raises(ValueError, match="row_scale goes with"):
        type(qw)(qw.qweight, qw.scale, qw.zero_point, LEVELED)
    plain = quantize_weight_rtn(w, weight_spec(4, group_size=8))
    assert plain.group_mult is None and torch.equal(plain.int_values(), plain.qweight)
    with pytest.raises(ValueError, match="one accumulator per group"):
        plain.int_scale()


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_weights_use_both_ends_of_the_range(bits):
    """weight_qparams: a row whose larger end is negative reaches qmin, one whose larger end
    is positive reaches qmax; asymmetric specs are compute_qparams' as they are."""
    spec = QuantSpec(bits=bits, granularity="per_channel", axis=0)
    w = torch.tensor([[-1.0, 0.5, 0.25], [1.0, -0.5, 0.25]])
    qw = quantize_weight_rtn(w, spec)
    assert qw.qweight[0, 0].item() == spec.qmin and qw.qweight[1, 0].item() == spec.qmax
    torch.testing.assert_close(qw.scale, torch.tensor([1 / -spec.qmin, 1 / spec.qmax]))
    assert torch.equal(qw.zero_point, torch.zeros(2, dtype=torch.int32))
    asym = QuantSpec(bits=bits, symmetric=False, granularity="per_channel", axis=0)
    lo, hi = w.amin(1), w.amax(1)
    for got, want in zip(weight_qparams(lo, hi, asym), compute_qparams(lo, hi, asym),
                         strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("spec", [weight_spec(4, group_size=16), LEVELED,
                                  weight_spec(4, group_size=16, symmetric=False),
                                  ASYM_LEVELED],
                         ids=["float-scales", "leveled", "asymmetric", "asymmetric-leveled"])
def test_group_search_never_loses_to_min_max_groups_and_wins_on_outliers(spec):
    """With a diagonal Hessian GPTQ has nothing to compensate, so each group's error is its
    own: the searched range (min-max is one candidate) gives every row of every group an
    error, weighted by the Hessian's diagonal, at most min-max's, and lower in all (about
    5% here). Leveled scales stay on their row's grid."""
    w = _grouped_weight(seed=3)
    w[:, ::16] *= 4  # one large value per group: min-max spends levels on it
    k = w.shape[1]
    hd = torch.linspace(0.2, 3.0, k, dtype=torch.float64).roll(11)
    h = torch.diag(hd)
    plain = gptq_quantize(w, h, spec, act_order=True)
    searched = gptq_quantize(w, h, spec, act_order=True, group_search=True)

    def group_err(qw):  # [N, groups]
        d = (qw.dequantize().double() - w.double()).pow(2) * hd[None, :]
        return d.reshape(w.shape[0], -1, 16).sum(-1)

    assert bool((group_err(searched) <= group_err(plain) * (1 + 1e-9)).all())
    assert float(group_err(searched).sum()) < 0.97 * float(group_err(plain).sum())
    if spec.group_levels is not None:
        ints = searched.int_values()
        assert -128 <= int(ints.min()) and int(ints.max()) <= 127
        torch.testing.assert_close(ints.float() * searched.int_scale()[:, None],
                                   searched.dequantize(), rtol=1e-6, atol=0)
        torch.testing.assert_close(ints.float() * searched.int_scale()[:, None],
                                   searched.dequantize(), rtol=1e-6, atol=0)
