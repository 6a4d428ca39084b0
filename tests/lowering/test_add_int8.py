"""add_int8's CPU path on large tensors: the float32 candidate with exact fix-up gives the
int64 reference's integers, ties and near-ties included, in contiguous and channels-last
memory (the small samples of test_registry never reach it)."""

from __future__ import annotations

import pytest
import torch

from qcompile.lowering import ops

SHAPE = (2, 64, 48, 48)  # 294912 elements: above the fused-path threshold


def _pair(seed: int, channels_last: bool):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, SHAPE, generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, SHAPE, generator=g, dtype=torch.int8)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    return a, b


# (qa, sa, qb, sb): halves and quarters make exact ties everywhere; nearly equal
# multipliers of opposite effect (a - b) cancel; random ones are what calibration gives
MULTIPLIERS = [
    (1 << 30, 31, 1 << 30, 31),
    (1 << 30, 32, 3 << 29, 33),
    ((1 << 31) - 1, 31, (1 << 30) + 7, 32),
    (1518500250, 33, 1518500249, 33),
    (1234567890, 38, 2000000000, 45),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mult", MULTIPLIERS)
def test_cpu_add_equals_the_reference(mult, channels_last):
    a, b = _pair(sum(mult) % 1000, channels_last)
    qa, sa, qb, sb = mult
    for a_zp, b_zp, out_zp, lo, hi in ((0, 0, 0, -128, 127), (-7, 100, 12, 12, 127),
                                       (127, -128, -128, -128, 127)):
        args = (a, b, a_zp, b_zp, qa, sa, qb, sb, out_zp, lo, hi)
        got = ops.add_int8(*args, impl="cpu")
        want = ops.add_int8(*args, impl="reference")
        assert got.shape == want.shape and torch.equal(got, want)
        if channels_last:
            assert got.is_contiguous(memory_format=torch.channels_last)


def test_cpu_add_of_two_memory_formats():
    a, b = _pair(5, True)
    b = b.contiguous()
    args = (a, b, 3, -3, 1 << 30, 31, 1 << 30, 32, 0, -128, 127)
    assert torch.equal(ops.add_int8(*args, impl="cpu"), ops.add_int8(*args, impl="reference"))


def test_cpu_add_broadcast_and_strided_inputs_take_the_exact_path():
    a, b = _pair(3, False)
    args = (a[:, :, ::2], b[:, :, ::2], 1, 2, 1 << 30, 31, 1 << 30, 32, 0, -128, 127)
    assert torch.equal(ops.add_int8(*args, impl="cpu"), ops.add_int8(*args, impl="reference"))
    args = (a, b[:1], 1, 2, 1 << 30, 31, 1 << 30, 32, 0, -128, 127)
    assert torch.equal(ops.add_int8(*args, impl="cpu"), ops.add_int8(*args, impl="reference"))
