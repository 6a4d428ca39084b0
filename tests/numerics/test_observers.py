"""Tests for qcompile.numerics.observers: ranges, bounded memory, factory, Hessian, mean,
row samples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.numerics.observers import (
    OBSERVERS,
    HessianObserver,
    MeanObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelAbsMaxObserver,
    PerChannelMinMaxObserver,
    RowSampleObserver,
    observer_for,
    shrink_hessian,
)
from qcompile.numerics.specs import QuantSpec, choose_qparams, compute_qparams, fake_quantize


def _batches(seed, n=4, shape=(3, 5, 16), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale * (i + 1) for i in range(n)]


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=False, bits=4)])
def test_minmax_matches_one_shot_qparams(spec):
    batches = _batches(0)
    batches[1] = batches[1].to(torch.bfloat16)  # observers take bf16 activations too
    obs = MinMaxObserver()
    for b in batches:
        obs.update(b)
    data = torch.cat([b.float().reshape(-1) for b in batches])
    scale, zp = obs.qparams(spec)
    ref_scale, ref_zp = choose_qparams(data, spec)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    assert obs.count == data.numel()


def test_range_observer_refuses_wrong_granularity_and_no_data():
    obs = MinMaxObserver()
    with pytest.raises(RuntimeError, match="no data"):
        obs.qparams(QuantSpec())
    obs.update(torch.randn(4, 4))
    with pytest.raises(ValueError, match="dynamic_per_token_qparams"):
        obs.qparams(QuantSpec(granularity="per_token"))
    with pytest.raises(ValueError, match="per_tensor"):
        PerChannelMinMaxObserver().qparams(QuantSpec())


def test_observers_ignore_empty_and_reject_integer_input():
    obs = MinMaxObserver()
    obs.update(torch.empty(0, 8))
    assert obs.count == 0 and obs.min_val is None
    with pytest.raises(TypeError):
        obs.update(torch.ones(4, dtype=torch.int8))


def test_moving_average_minmax():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.25)
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([-5.0, 10.0]))
    assert obs.min_val.item() == -2.0  # -1 + 0.25 * (-5 - -1)
    assert obs.max_val.item() == 4.0  # 2 + 0.25 * (10 - 2)
    with pytest.raises(ValueError):
        MovingAverageMinMaxObserver(averaging_constant=0.0)


def test_per_channel_minmax_last_dim():
    batches = _batches(1)
    obs = PerChannelMinMaxObserver(axis=-1)
    for b in batches:
        obs.update(b)
    data = torch.cat([b.reshape(-1, 16) for b in batches])  # [rows, C]
    assert torch.equal(obs.min_val, data.amin(0)) and torch.equal(obs.max_val, data.amax(0))
    spec = QuantSpec(granularity="per_channel", axis=-1, symmetric=False)
    scale, zp = obs.qparams(spec)
    assert scale.shape == (16,)
    # The parameters apply to an activation of the observed layout.
    err = (fake_quantize(batches[0], scale, zp, spec) - batches[0]).abs()
    assert (err <= scale * 0.5001).all()
    with pytest.raises(ValueError, match="channel count"):
        obs.update(torch.randn(2, 8))


def test_per_channel_absmax_is_smoothquant_statistic():
    batches = _batches(2)
    obs = PerChannelAbsMaxObserver()
    for b in batches:
        obs.update(b.to(torch.bfloat16))
    ref = torch.stack([b.to(torch.bfloat16).float().abs().amax(dim=(0, 1)) for b in batches])
    assert torch.equal(obs.absmax, ref.amax(0))
    lo, hi = obs.range(QuantSpec(granularity="per_channel", axis=-1))
    assert torch.equal(lo, -hi)


# ---------------------------------------------------------------------------------------
# PercentileObserver
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    mags=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    bins=st.sampled_from([2, 8, 64, 4096]),
    seed=st.integers(0, 2**31 - 1),
)
def test_percentile_histogram_growth_is_exact(mags, bins, seed):
    # Dyadic data (integers / 64) makes every bin index computation exact, so merging the
    # histogram as the range grows must equal binning everything at the final range.
    g = torch.Generator().manual_seed(seed)
    obs = PercentileObserver(bins=bins)
    seen = []
    for m in mags:
        x = torch.randint(-(2**m), 2**m + 1, (64,), generator=g).float() / 64
        obs.update(x)
        seen.append(x)
    data = torch.cat(seen)
    assert obs.hist.numel() == bins  # bounded memory
    assert obs.hist.sum().item() == data.numel() == obs.count
    width = 2 * obs.radius / bins
    idx = torch.floor((data + obs.radius) / width).long().clamp(0, bins - 1)
    assert torch.equal(obs.hist, torch.bincount(idx, minlength=bins).double())
    assert obs.radius > data.abs().max().item()


def test_percentile_matches_exact_quantile():
    g = torch.Generator().manual_seed(3)
    obs = PercentileObserver(percentile=99.0)
    chunks = [torch.randn(50_000, generator=g) * s + 0.5 for s in (0.5, 1.0, 2.0)]
    for c in chunks:
        obs.update(c)
    data = torch.cat(chunks)
    tol = 2 * (2 * obs.radius / obs.bins)
    lo, hi = obs.range(QuantSpec(symmetric=False))
    assert abs(lo.item() - torch.quantile(data, 0.01).item()) < tol
    assert abs(hi.item() - torch.quantile(data, 0.99).item()) < tol
    lo, hi = obs.range(QuantSpec())
    assert abs(hi.item() - torch.quantile(data.abs(), 0.99).item()) < tol
    assert lo.item() == -hi.item()


def test_percentile_clips_outliers_and_100_is_minmax():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(4))
    x[:3] = 1000.0
    clipped = PercentileObserver(percentile=99.9)
    full = PercentileObserver(percentile=100.0)
    for obs in (clipped, full):
        obs.update(x)
    assert clipped.range(QuantSpec())[1].item() < 5.0
    assert full.range(QuantSpec())[1].item() == 1000.0
    assert full.range(QuantSpec(symmetric=False))[0].item() == x.min().item()


# ---------------------------------------------------------------------------------------
# MSEObserver
# ---------------------------------------------------------------------------------------


def _mse(x, lo, hi, spec):
    scale, zp = compute_qparams(lo, hi, spec)
    return (fake_quantize(x, scale, zp, spec) - x).square().mean().item()


def test_mse_observer_beats_minmax_with_outliers():
    spec = QuantSpec(bits=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_000, generator=g)
    x[0] = 40.0
    obs = MSEObserver(sample_size=1 << 20)  # sample holds everything: exact search
    obs.update(x)
    lo, hi = obs.range(spec)
    assert obs.best_ratio < 0.5
    assert _mse(x, lo, hi, spec) < 0.5 * _mse(x, x.min(), x.max(), spec)
    # It is the grid minimum: no candidate does better.
    for r in (0.2, 0.5, 1.0):
        assert _mse(x, lo, hi, spec) <= _mse(x, x.min() * r, x.max() * r, spec)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=False), QuantSpec(bits=4),
                                  QuantSpec(bits=4, symmetric=False)], ids=str)
def test_mse_observer_batched_search_is_the_one_candidate_at_a_time_search(seed, spec):
    """The candidates are scored in one batched pass; the range is the one that scoring
    each candidate's own qparams alone (fake_quantize) picks, ties to the smallest ratio."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30_000, generator=g) * (seed + 1)
    if seed % 2:
        x = x.abs() + 0.3
    x[: 3 * seed] *= 25.0
    obs = MSEObserver(grid=60)
    obs.update(x)
    lo, hi = obs.range(spec)
    best = None
    for ratio in torch.linspace(obs.min_ratio, 1.0, obs.grid, dtype=torch.float64).tolist():
        err = _mse(obs.sample.values, obs.min_val * ratio, obs.max_val * ratio, spec)
        if best is None or err < best[0]:
            best = (err, obs.min_val * ratio, obs.max_val * ratio)
    assert torch.equal(lo, best[1]) and torch.equal(hi, best[2])


def test_mse_observer_keeps_full_range_for_uniform_8bit():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(6)) * 2 - 1
    obs = MSEObserver()
    obs.update(x)
    obs.range(QuantSpec())
    assert obs.best_ratio > 0.95


def test_mse_sample_is_bounded_uniform_and_deterministic():
    a, b = MSEObserver(sample_size=1000, seed=7), MSEObserver(sample_size=1000, seed=7)
    for i in range(10):
        batch = torch.full((2000,), float(i))
        a.update(batch)
        b.update(batch)
    vals = a.sample.values
    assert vals.numel() == 1000
    counts = torch.bincount(vals.long(), minlength=10)
    assert counts.min() > 60 and counts.max() < 140  # ~100 each if uniform over batches
    assert torch.equal(vals, b.sample.values)
    assert torch.equal(a.range(QuantSpec())[1], b.range(QuantSpec())[1])


# ---------------------------------------------------------------------------------------
# HessianObserver
# ---------------------------------------------------------------------------------------


def test_hessian_is_independent_of_batching():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 7, 12, generator=g)
    split = HessianObserver()
    for i in range(3):
        split.update(x[2 * i : 2 * i + 2])
    whole = HessianObserver()
    whole.update(x.reshape(-1, 12))
    rows = x.reshape(-1, 12).double()
    expected = 2.0 / rows.shape[0] * rows.T @ rows
    assert split.count == whole.count == 42
    assert split.hessian.dtype == torch.float64
    torch.testing.assert_close(split.hessian, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.hessian, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="features"):
        split.update(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="no data"):
        _ = HessianObserver().hessian


def test_observer_for_factory():
    obs = observer_for("percentile", percentile=99.0)
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.0
    for name, cls in OBSERVERS.items():
        assert type(observer_for(name)) is cls
    with pytest.raises(ValueError, match="known observers: .*minmax.*percentile"):
        observer_for("histogram")


def test_mean_observer_is_the_per_channel_mean_in_float64():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 12) + torch.arange(12.0)  # channel j has mean ~ j
    split, whole = MeanObserver(), MeanObserver()
    for part in x.split(2):
        split.update(part)
    whole.update(x.reshape(-1, 12))
    expected = x.reshape(-1, 12).double().mean(0)
    assert split.count == whole.count == 42 and split.mean.dtype == torch.float64
    torch.testing.assert_close(split.mean, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.mean, expected, rtol=1e-12, atol=1e-12)
    first = MeanObserver(axis=0)  # another axis: channels of dim 0
    first.update(x.reshape(-1, 12).T)
    torch.testing.assert_close(first.mean, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="no data"):
        _ = MeanObserver().mean


def test_row_sample_keeps_at_most_its_rows_of_the_input_uniformly_and_seeded():
    x = torch.arange(100 * 3, dtype=torch.float32).reshape(100, 3)  # row i: 3i, 3i+1, 3i+2
    obs = RowSampleObserver(rows=10, seed=1)
    for part in x.reshape(10, 10, 3):  # batches of [10, 3]
        obs.update(part)
    assert obs.count == 100 and obs.rows.shape == (10, 3)
    picked = (obs.rows[:, 0] / 3).long()
    assert torch.equal(obs.rows, x[picked]) and picked.unique().numel() == 10  # whole rows
    again = RowSampleObserver(rows=10, seed=1)
    for part in x.reshape(10, 10, 3):
        again.update(part)
    assert torch.equal(again.rows, obs.rows)
    small = RowSampleObserver(rows=200)  # fewer rows than it keeps: all of them, copied
    small.update(x)
    assert torch.equal(small.rows.sort(dim=0).values, x) and small.rows.data_ptr() != x.data_ptr()
    # uniform: each row is in a sample of 10 out of 100 with probability 1/10
    hits = torch.zeros(100)
    for seed in range(300):
        s = RowSampleObserver(rows=10, seed=seed)
        s.update(x)
        hits[(s.rows[:, 0] / 3).long()] += 1
    assert 10 < float(hits.min()) and float(hits.max()) < 60  # mean 30
    with pytest.raises(ValueError, match="features"):
        obs.update(torch.randn(2, 4))


def test_hessian_shrinkage_is_ledoit_wolf():
    """rho = min(1, beta^2 / delta^2) with beta^2 = 1/n^2 sum |x x^T - S|^2 and delta^2 =
    |S - mu I|^2, written out over the rows; the same whatever the batching."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64) @ \
        torch.randn(12, 12, generator=g, dtype=torch.float64)
    s = x.T @ x / 40
    mu = s.trace() / 12
    beta2 = sum(((r[:, None] * r[None, :] - s) ** 2).sum() for r in x) / 40 ** 2
    delta2 = ((s - mu * torch.eye(12, dtype=torch.float64)) ** 2).sum()
    expected = min(1.0, float(beta2 / delta2))
    split = HessianObserver()
    for i in range(4):
        split.update(x[10 * i: 10 * i + 10].float())
    assert 0 < expected < 1
    assert split.shrinkage == pytest.approx(expected, rel=1e-4)
    shrunk = shrink_hessian(split.hessian, split.shrinkage)
    torch.testing.assert_close(
        shrunk, (1 - expected) * 2 * s + expected * 2 * mu * torch.eye(12, dtype=torch.float64),
        rtol=1e-4, atol=1e-6)


def test_hessian_shrinkage_follows_how_much_the_rows_say():
    """From fewer rows than inputs H is mostly noise: rho near 1, and the shrunk estimate is
    closer to the true second moment than H; from many rows of anisotropic inputs rho is
    near 0."""
    g = torch.Generator().manual_seed(4)
    k = 64
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5
    truth = 2 * mix.T @ mix  # H of infinitely many rows x = z mix
    few = HessianObserver()
    few.update((torch.randn(8, k, generator=g, dtype=torch.float64) @ mix).float())
    assert few.shrinkage > 0.5
    shrunk = shrink_hessian(few.hessian, few.shrinkage)
    assert (shrunk - truth).norm() < 0.8 * (few.hessian - truth).norm()
    many = HessianObserver()
    scales = torch.logspace(0, 2, 16, dtype=torch.float64)
    many.update((torch.randn(4000, 16, generator=g, dtype=torch.float64) * scales).float())
    assert many.shrinkage < 0.01
    h = many.hessian
    assert shrink_hessian(h, 0.0) is h
    assert HessianObserver().norm4 == 0.0
