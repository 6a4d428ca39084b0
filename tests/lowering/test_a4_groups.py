"""int4 activations in groups (lowering/a4_ops.py: quantize_int4_groups, and the W4A4
linears' act_group): each group's scale the token's times an integer m in 1..15, the
values q * m int8s that the int8 GEMM reads. The reference against its definition
written out here group by group in Python; every implementation that runs here (CPU
routes, the Triton interpreter: tests/lowering/test_registry.py and
test_quantize_int4_groups_triton.py hold them to the reference bit for bit) on rows whose
groups lie decades apart; that the values carry 4 bits each and a multiplier a group; the
fake quantizer the calibration passes use (passes/_fake_quant.py) against the op; the
checks that make bad arguments loud."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.lowering import a4_ops
from qcompile.numerics.specs import SCALE_EPS, pack_int4, unpack_int4
from qcompile.passes._fake_quant import fake_token, fake_token_groups

QUANTIZE, LINEAR = a4_ops.quantize_int4_groups, a4_ops.linear_a4w4_dynamic
GROUPED = a4_ops.linear_a4w4_grouped_dynamic


def _definition(x: torch.Tensor, group: int, clip: float):
    """quantize_int4_groups' docstring, one float32 operation at a time in numpy."""
    f32 = np.float32
    rows = x.float().reshape(-1, x.shape[-1]).numpy()
    c = f32(clip)
    v = np.zeros(rows.shape, dtype=np.int8)
    scales = np.zeros(rows.shape[0], dtype=np.float32)
    for r, row in enumerate(rows):
        groups = row.reshape(-1, group)
        a = [f32(np.abs(gr).max()) * c for gr in groups]
        s = max(f32(max(a) / f32(105.0)), f32(SCALE_EPS))
        scales[r] = s
        for j, gr in enumerate(groups):
            m = min(max(np.ceil(f32(a[j] / f32(s * f32(7.0)))), f32(1.0)), f32(15.0))
            q = np.clip(np.round(gr / f32(s * m)), -8, 7)  # numpy rounds half to even
            v[r, j * group:(j + 1) * group] = (q * m).astype(np.int8)
    return torch.from_numpy(v).reshape(x.shape), torch.from_numpy(scales).reshape(x.shape[:-1])


def _rows(m: int, groups: int, group: int, seed: int = 0) -> torch.Tensor:
    """Rows whose groups lie up to six decades apart, one exact tie, a zero group."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (torch.rand(m, groups, 1, generator=g) * 6 - 4)
    x = (torch.randn(m, groups, group, generator=g) * mag).reshape(m, groups * group)
    x[0, :group] = 0.0
    return x


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("group", [2, 16, 32])
def test_reference_is_the_definition(group, clip):
    x = _rows(6, 4, group)
    x[1] = 0.0  # an all-zero row: the scale guard
    v, s = QUANTIZE(x, group, clip, impl="reference")
    want_v, want_s = _definition(x, group, clip)
    assert torch.equal(v, want_v) and torch.equal(s, want_s)
    assert v.dtype == torch.int8 and s.dtype == torch.float32


def test_values_are_int4_times_a_multiplier_per_group():
    """Each group's values are q * m with q in [-8, 7] and m in 1..15 (|v| <= 120), and the
    largest group (unclipped) spends all 15 levels of m: 4 bits a value, 4 a group."""
    group = 16
    x = _rows(8, 6, group, seed=1)
    v, s = QUANTIZE(x, group, 1.0, impl="reference")
    assert int(v.abs().max()) <= 120
    for r in range(x.shape[0]):
        groups = x[r].reshape(-1, group)
        absmax = groups.abs().amax(1)
        for j, gv in enumerate(v[r].reshape(-1, group)):
            if absmax[j] == 0:
                assert not gv.any()
                continue
            m = int(torch.ceil(absmax[j] / (s[r] * 7)).clamp(1, 15))
            assert torch.all(gv.int() % m == 0), (r, j)
            assert torch.all((gv.int() // m >= -8) & (gv.int() // m <= 7))
        assert int(torch.ceil(absmax.max() / (s[r] * 7))) == 15  # the row's largest group


def test_groups_keep_small_groups_that_one_scale_per_token_rounds_away():
    """A group 16x smaller than its row's largest keeps its values (m = 1: step s, the
    row's absmax / 105); per token, one step for the row (absmax / 7) rounds it to zero."""
    x = torch.cat([torch.linspace(-1, 1, 16), torch.linspace(-0.06, 0.06, 16)])[None]
    v, s = QUANTIZE(x, 16, 1.0, impl="reference")
    grouped = (v.float() * s[:, None])[0, 16:]
    q, scale, _ = a4_ops.quantize_per_token_int4(x, False, 1.0, True, impl="reference")
    assert not (q[0, 16:]).any()
    assert (grouped - x[0, 16:]).abs().max() <= float(s) * 1 / 2 + 1e-7  # m = 1: step s
    assert int(v[0, 16:].abs().max()) == 6  # 0.06 / (1 / 105) = 6.3: q = 6, m = 1


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_clip_saturates_each_group_beyond_its_range(impl):
    x = torch.tensor([[10.0, 1.0, -1.0, 0.5] * 4 + [1.0, -0.1, 0.1, 0.0] * 4])
    v, s = QUANTIZE(x, 16, 0.5, impl=impl)
    want_v, want_s = _definition(x, 16, 0.5)
    assert torch.equal(v, want_v) and torch.equal(s, want_s)
    assert int(v[0, 0]) == 7 * 15  # 10 is beyond 0.5 * 10: saturated at q = 7, m = 15
    assert int(v[0, 16]) == 7 * int(v[0, 16:].abs().max()) // 7  # its own group's top


def test_the_fake_quantizer_is_the_op_dequantized():
    """passes/_fake_quant.py's fake_token_groups (what smooth, GPTQ and learn-transforms
    simulate) rounds as the op does; fake_token takes it for a K the group divides and
    keeps one scale per token elsewhere."""
    x = _rows(5, 4, 16, seed=2)
    v, s = QUANTIZE(x, 16, 0.9, impl="reference")
    fake = fake_token_groups(x, 16, 0.9)
    assert torch.allclose(fake, v.float() * s[:, None], rtol=1e-6, atol=0)
    assert torch.equal(fake_token(x, 4, 0.9, True, 16), fake)
    assert torch.equal(fake_token(x[:, :24], 4, 0.9, True, 16), fake_token(x[:, :24], 4, 0.9))


def _linear_case(k=64, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rows(7, k // 16, 16, seed=seed).reshape(7, k)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    return x, w, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_in_groups_is_the_int8_gemm_of_the_values(bias):
    """act_group: the int8 GEMM of quantize_int4_groups' values and the int4 weight,
    exact in int64, dequantized ((acc * s[m]) * w_scale[n]) + bias[n] in float32."""
    x, w, ws, b = _linear_case()
    b = b if bias else None
    y = LINEAR(x, pack_int4(w), ws, b, 0.9, None, 16, impl="reference")
    v, s = QUANTIZE(x, 16, 0.9, impl="reference")
    acc = (v.long() @ w.long().T).float()
    want = acc * s[:, None] * ws
    if b is not None:
        want = want + b
    assert torch.equal(y, want)


@pytest.mark.parametrize("impl", sorted(set(LINEAR.impls) - {"reference"}))
def test_every_implementation_of_the_grouped_linears_equals_the_reference(impl):
    if not LINEAR.impls[impl].runs_on("cpu"):
        pytest.skip(f"{impl} does not run here")
    x, w, ws, b = _linear_case(k=96, seed=3)
    want = LINEAR(x, pack_int4(w), ws, b, 0.9, None, 32, impl="reference")
    assert torch.equal(LINEAR(x, pack_int4(w), ws, b, 0.9, None, 32, impl=impl), want)
    mult = torch.randint(1, 9, (w.shape[0], 96 // 32), dtype=torch.int8)
    wzp = torch.randint(-8, 8, (w.shape[0], 96 // 32), dtype=torch.int8)
    if impl.startswith("cpu-"):  # the weight range the route is exact for
        from qcompile.lowering import cpu_routes

        lo, hi = cpu_routes.ROUTES[impl[4:]].weight_range(cpu_routes.cpu_capabilities())
        mult = mult.clamp(max=min(lo // -15, hi // 15))
    args = (x, pack_int4(w), mult, wzp, ws, None, 1.0, None, 32)
    assert torch.equal(GROUPED(*args, impl=impl), GROUPED(*args, impl="reference"))


def test_groups_are_closer_to_float_than_one_scale_per_token():
    """Gaussian rows with channels up to 5x their neighbours: about 0.7-0.8 of the error
    (six seeds) in groups of 16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * (1 + 4 * torch.rand(1, 64, generator=g) ** 4)
    _, w, ws, b = _linear_case(seed=4)
    want = x @ (w.float() * ws[:, None]).T + b
    per_token = LINEAR(x, pack_int4(w), ws, b, 0.9, impl="reference")
    grouped = LINEAR(x, pack_int4(w), ws, b, 0.9, None, 16, impl="reference")
    assert (grouped - want).norm() < 0.85 * (per_token - want).norm()


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_bad_arguments_are_loud(impl):
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="not a positive multiple of the group size 48"):
        QUANTIZE(x, 48, 1.0, impl=impl)
    with pytest.raises(ValueError, match="group must be an int >= 2"):
        QUANTIZE(x, 1, 1.0, impl=impl)
    with pytest.raises(ValueError, match="clip must be a number in"):
        QUANTIZE(x, 16, 0.0, impl=impl)
    with pytest.raises(TypeError, match="floating-point"):
        QUANTIZE(x.to(torch.int8), 16, 1.0, impl=impl)
    w = pack_int4(torch.zeros(8, 64, dtype=torch.int8))
    ws = torch.ones(8)
    with pytest.raises(ValueError, match="not a multiple of the activations' group size 48"):
        LINEAR(x, w, ws, None, 1.0, None, 48, impl=impl)
    w_sum = a4_ops.weight_row_sums(unpack_int4(w))
    with pytest.raises(ValueError, match="are symmetric: pass w_sum=None"):
        LINEAR(x, w, ws, None, 1.0, w_sum, 16, impl=impl)
    with pytest.raises(ValueError, match="act_group must be 0"):
        LINEAR(x, w, ws, None, 1.0, None, -16, impl=impl)
