"""Integer-only GELU, LayerNorm and softmax attention as ops (lowering/int_ops.py, I-BERT).

The arithmetic itself (qcompile/numerics/ibert.py) is held to exact Python-integer oracles
and float bounds in tests/numerics/test_ibert.py; here, per op: (1) the implementations
(reference, cpu, Triton in the interpreter or on CUDA) give identical integers; (2) the
fused linear + residual + LayerNorm op against the same oracles and float LayerNorm; (3)
attention with the integer softmax against float softmax attention; (4) fake shapes.
"""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.lowering import int_ops as io
from qcompile.lowering.device import triton_target
from qcompile.lowering.kernels.attention import quantized_attention_ref
from qcompile.numerics import ibert
from tests.numerics.test_dyadic import round_half_away
from tests.numerics.test_ibert import layernorm_oracle

DEV = "cuda" if triton_target() == "cuda" else "cpu"
# ---------------------------------------------------------------- GELU


def test_gelu_int8_impls_bit_identical():
    p = ibert.gelu_params(0.05, 3, 0.02, -60)
    x = torch.randint(-128, 128, (3, 5, 333), dtype=torch.int8)
    ref = io.gelu_int8(x, *p, impl="reference")
    assert torch.equal(io.gelu_int8(x, *p, impl="cpu"), ref)
    assert torch.equal(io.gelu_int8(x.to(DEV), *p, impl="triton").cpu(), ref)


# ---------------------------------------------------------------- LayerNorm


def test_layernorm_int8_impls_bit_identical():
    c = 384
    w, b = torch.randn(c) * 0.2 + 1, torch.randn(c) * 0.1
    p = ibert.layernorm_params(0.03, 5, c, w, b, 1e-12, 0.04, -3)
    x = torch.randint(-128, 128, (2, 7, c), dtype=torch.int8)
    x[0, 0] = 5  # a constant row: zero variance, eps 0 -> all zeros, no division by 0
    ref = io.layernorm_int8(x, *p, impl="reference")
    assert torch.equal(io.layernorm_int8(x, *p, impl="cpu"), ref)
    assert torch.equal(io.layernorm_int8(x.to(DEV), *p, impl="triton").cpu(), ref)
    assert (ref[0, 0].long() - (-3) - torch.round(b / 0.04).long()).abs().max() <= 1


def _residual_problem(seed=0, n=64, k=48):
    """A linear (int8 x, w, int32 bias, input zero point) plus an int8 residual, and the
    fused op's constants built as passes/integer_nonlinear.py builds them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (2, 5, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s_x, zp_x, s_r, zp_r = 0.02, 3, 0.05, -7
    s_w = torch.rand(n, generator=g, dtype=torch.float64) * 2e-3 + 1e-3
    bias = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32)
    zp_term = (zp_x * w.long().sum(1)).to(torch.int32)
    r = torch.randint(-128, 128, (2, 5, n), generator=g, dtype=torch.int8)
    gamma, beta = torch.randn(n, generator=g) * 0.3 + 1, torch.randn(n, generator=g) * 0.2
    e, s_ref = 7, 0.1  # the sum's calibrated scale, refined by 2**7
    s_h, bound = s_ref / 2**e, 1 << (9 + e)
    p = ibert.layernorm_params(s_h, 0, n, gamma, beta, 1e-5, 0.03, 4, in_range=(-bound, bound))
    pairs = [ibert.fit_multiplier(m, 1 << 31) for m in (s_x * s_w / s_h).tolist()]
    acc_q, acc_shift = (torch.tensor(v, dtype=torch.int64) for v in zip(*pairs))
    r_q, r_shift = ibert.fit_multiplier(s_r / s_h, 255)
    args = (x, w, bias, zp_term, acc_q, acc_shift, r, zp_r, r_q, r_shift, bound, p.gamma, p.beta,
            *p[3:])
    floats = dict(x=(x.double() - zp_x) * s_x, w=w.double() * s_w[:, None], b=bias * s_x * s_w,
                  r=(r.double() - zp_r) * s_r, gamma=gamma.double(), beta=beta.double())
    return args, p, floats


def test_linear_residual_layernorm_exact_and_close_to_float():
    args, p, fl = _residual_problem()
    x, w, bias, zp_term, acc_q, acc_shift, r, zp_r, r_q, r_shift, bound = args[:11]
    y = io.linear_residual_layernorm_int8(*args, impl="reference")
    # (1) Python integers: accumulator, the two rounded rescales, then the LayerNorm steps
    acc = (x.long().reshape(-1, x.shape[-1]) @ w.long().T) - zp_term.long() + bias.long()
    rows = []
    for a_row, r_row in zip(acc.tolist(), r.reshape(-1, r.shape[-1]).tolist()):
        h = [round_half_away(Fraction(a * q, 2**s)) + round_half_away(
            Fraction((v - zp_r) * r_q, 2**r_shift))
            for a, q, s, v in zip(a_row, acc_q.tolist(), acc_shift.tolist(), r_row)]
        rows.append(layernorm_oracle([min(bound, max(-bound, t)) for t in h], p))
    assert y.reshape(-1, y.shape[-1]).tolist() == rows
    # (2) float: LayerNorm(x W^T + b + r) rounded to the output scale, within one step
    ref = F.layer_norm(fl["x"] @ fl["w"].T + fl["b"] + fl["r"], (w.shape[0],), fl["gamma"],
                       fl["beta"], 1e-5)
    ref_q = (torch.round(ref / 0.03) + 4).clamp(-128, 127)
    assert (y.double() - ref_q).abs().max() <= 1


def test_linear_residual_layernorm_impls_bit_identical():
    args, _, _ = _residual_problem(seed=1)
    ref = io.linear_residual_layernorm_int8(*args, impl="reference")
    assert torch.equal(io.linear_residual_layernorm_int8(*args, impl="cpu"), ref)
    dev_args = [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]
    out = io.linear_residual_layernorm_int8(*dev_args, impl="triton")
    assert torch.equal(out.cpu(), ref)


# ---------------------------------------------------------------- softmax attention


def _quant(x):
    s = x.abs().amax() / 127
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), s


def _attention_inputs(b=2, hq=4, hkv=2, sq=19, sk=23, d=16, amp=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    (q, qs), (k, ks), (v, vs) = (_quant(torch.randn(b, h, s, d, generator=g) * a)
                                 for h, s, a in ((hq, sq, amp), (hkv, sk, amp), (hkv, sk, 1)))
    return q, k, v, qs, ks, vs


@pytest.mark.parametrize("amp", [0.5, 2.0, 8.0])
def test_isoftmax_attention_close_to_float_softmax(amp):
    q, k, v, qs, ks, vs = _attention_inputs(amp=amp, sq=40, sk=40)
    ref = quantized_attention_ref(q, k, v, qs, ks, vs, out_dtype=torch.float64)
    out = io.attention_int8_isoftmax(q, k, v, qs, ks, vs, None, False, None, torch.float32,
                                     impl="cpu")
    # output = sum_j p_j v_j: i-exp's ~3e-3 relative error per probability (plus 2**-17
    # rounding) moves it by at most ~4e-3 of max |v|
    assert (out.double() - ref).abs().max() <= 4e-3 * 127 * float(vs)


MASKS = {
    "none": lambda b, h, sq, sk: None,
    "bool": lambda b, h, sq, sk: torch.rand(b, 1, sq, sk, generator=torch.Generator()
                                            .manual_seed(1)) > 0.3,
    "padding": lambda b, h, sq, sk: torch.zeros(b, 1, 1, sk).index_fill_(
        -1, torch.arange(sk - 5, sk), torch.finfo(torch.float32).min),
    "additive": lambda b, h, sq, sk: torch.randn(1, h, sq, sk, generator=torch.Generator()
                                                 .manual_seed(2)),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", list(MASKS))
def test_isoftmax_attention_impls_bit_identical(mask, causal):
    q, k, v, qs, ks, vs = _attention_inputs()
    m = MASKS[mask](2, 4, q.shape[2], k.shape[2])
    args = (qs, ks, vs, m, causal, 0.3, torch.float32)
    ref = io.attention_int8_isoftmax(q, k, v, *args, impl="reference")
    assert torch.equal(io.attention_int8_isoftmax(q, k, v, *args, impl="cpu"), ref)
    dev_args = (qs, ks, vs, None if m is None else m.to(DEV), causal, 0.3, torch.float32)
    tri = io.attention_int8_isoftmax(q.to(DEV), k.to(DEV), v.to(DEV), *dev_args, impl="triton")
    assert torch.equal(tri.cpu(), ref)
    if mask in ("none", "padding"):  # masked keys hidden exactly as the float path does
        fl = quantized_attention_ref(q, k, v, qs, ks, vs, attn_mask=m, causal=causal,
                                     sm_scale=0.3, out_dtype=torch.float64)
        assert (ref.double() - fl).abs().max() <= 4e-3 * 127 * float(vs)


def test_fake_impls_propagate_shapes():
    p = ibert.gelu_params(0.05, 0, 0.05, 0)  # compile time: real tensors
    lp = ibert.layernorm_params(0.05, 0, 8, None, None, 1e-5, 0.05, 0)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(2, 3, 8, dtype=torch.int8))
        assert io.gelu_int8(x, *p, impl="cpu").dtype == torch.int8
        g, b = mode.from_tensor(lp.gamma), mode.from_tensor(lp.beta)
        assert io.layernorm_int8(x, g, b, *lp[2:], impl="cpu").shape == (2, 3, 8)
        q = mode.from_tensor(torch.zeros(1, 2, 5, 8, dtype=torch.int8))
        s = mode.from_tensor(torch.tensor(0.1))
        out = io.attention_int8_isoftmax(q, q, q, s, s, s, None, True, None, torch.float16,
                                         impl="cpu")
        assert out.shape == (1, 2, 5, 8) and out.dtype == torch.float16
