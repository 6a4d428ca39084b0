"""_migration: the shift-and-scale candidates are exact in real arithmetic, the search's
quantizers are the real ones (bit for bit), and the search moves an off-centre outlier
channel, keeps "no change" where nothing beats it."""

import pytest
import torch

from qcompile.numerics.specs import (
    QuantSpec,
    compute_qparams,
    dynamic_per_token_qparams,
    fake_quantize,
)
from qcompile.numerics.weights import quantize_weight_rtn
from qcompile.passes._migration import (
    candidates,
    choose,
    static_quantizer,
    token_quantizer,
    weight_quantizer,
)


def _outlier_rows(n=256, k=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, k, generator=gen)
    rows[:, 3] = rows[:, 3] * 4 + 40  # an off-centre outlier channel (BERT's LayerNorm outputs)
    rows[:, 7] *= 25
    return rows


def test_every_candidate_is_exact_in_float64():
    rows = _outlier_rows().double()
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(n, 32, generator=gen, dtype=torch.float64) for n in (16, 8)]
    found = candidates(rows.amin(0), rows.amax(0), weights)
    labels = [m.label for m in found]
    assert labels[:2] == ["none", "shift"] and found[0].identity
    assert any(lb.startswith("os+(shift") for lb in labels)
    assert any(lb.startswith("smoothquant(alpha") for lb in labels)
    for m in found:
        z = m.shift if m.shift is not None else torch.zeros(32, dtype=torch.float64)
        assert bool((m.scale > 0).all())
        x = (rows - z) / m.scale
        for w in weights:
            torch.testing.assert_close(x @ (w * m.scale).T + w @ z, rows @ w.T,
                                       rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity="per_channel", axis=0),
                                  QuantSpec(bits=4, granularity="per_channel", axis=0),
                                  QuantSpec(bits=4, granularity="per_group", group_size=8)])
def test_weight_quantizer_is_rtn(spec):
    w = torch.randn(12, 32) * torch.logspace(-2, 1, 32)
    assert torch.equal(weight_quantizer(spec)(w), quantize_weight_rtn(w, spec).dequantize())


def test_activation_quantizers_are_the_ops():
    x = _outlier_rows()
    lo, hi = x.amin(0).double() - 1, x.amax(0).double() + 2  # calibration saw more
    spec = QuantSpec(bits=8, symmetric=False)
    expected = fake_quantize(x, *compute_qparams(lo.min(), hi.max(), spec), spec)
    assert torch.equal(static_quantizer(spec)(x, lo, hi), expected)
    for bits, clip, symmetric in ((8, 1.0, True), (4, 0.8, True), (4, 0.8, False),
                                  (4, 1.0, False)):
        token = QuantSpec(bits=bits, granularity="per_token", symmetric=symmetric)
        expected = fake_quantize(x, *dynamic_per_token_qparams(x, token, clip), token)
        got = token_quantizer(bits, clip, symmetric)(x, lo, hi)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_outlier_channel_is_shifted_and_scaled():
    rows = _outlier_rows()
    w = torch.randn(16, 32) * 0.1
    choice = choose(rows, rows.amin(0).double(), rows.amax(0).double(), [w],
                    static_quantizer(QuantSpec(bits=8, symmetric=False)),
                    weight_quantizer(QuantSpec(bits=8, granularity="per_channel", axis=0)))
    best = choice.best
    assert best.shift is not None and abs(float(best.shift[3]) - 40) < 8
    assert float(best.scale[7]) > 2 and float(best.scale[7]) >= float(best.scale[0])
    assert choice.error < choice.baseline / 4, (best.label, choice.error, choice.baseline)


def test_no_change_where_nothing_beats_it():
    rows = torch.randn(128, 16)
    w = torch.randn(8, 16)

    def exact(x, lo, hi):
        return x

    choice = choose(rows, rows.amin(0).double(), rows.amax(0).double(), [w], exact,
                    lambda t: t)
    assert choice.best.identity and choice.best.label == "none"
    assert choice.tried > 2


def test_output_error_is_relative_per_row_and_per_linear():
    """Each row's error counts relative to that row's output: a token 100x the others (an
    attention sink) or a reader with 100x larger weights (v against q and k) weighs the
    same as the rest, so neither decides the migration alone. Scaling one row, or one
    reader's weights, by a power of two leaves the per-token / per-channel quantization's
    relative error, and so the score, unchanged."""
    from qcompile.passes._migration import output_error

    rows = _outlier_rows()
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(n, 32, generator=gen) for n in (16, 8)]
    lo, hi = rows.amin(0).double(), rows.amax(0).double()
    quant_a, quant_w = token_quantizer(8), weight_quantizer(
        QuantSpec(bits=4, granularity="per_channel", axis=0))

    def score(r, ws):
        m = candidates(lo, hi, ws)[2]  # a shift and scale, not the identity
        return output_error(m, r, lo, hi, ws, [r @ w.T for w in ws], quant_a, quant_w)

    base = score(rows, weights)
    loud = rows.clone()
    loud[5] *= 128.0  # one token far above the rest
    heavy = [weights[0], weights[1] * 128.0]
    torch.testing.assert_close(score(loud, weights), base, rtol=1e-3, atol=0)  # the floor
    torch.testing.assert_close(score(rows, heavy), base, rtol=1e-5, atol=0)
    assert base > 0
