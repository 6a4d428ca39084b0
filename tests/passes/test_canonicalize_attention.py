"""canonicalize-attention: Before/Expected for the explicit softmax(QK^T)V chain and sdpa's
positional form, each spelling's sdpa, and graphs that must not change."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_function, canonical, expect


class Explicit(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, mask):
        d = q.shape[-1]
        if self.how == "div":
            s = q @ k.transpose(-2, -1) / math.sqrt(d)
        elif self.how == "mul+mask":
            s = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(d)) + mask
        elif self.how == "mask+scaled":
            s = mask + (q @ k.transpose(-1, -2)) * 0.25
        elif self.how == "noscale":
            s = q @ k.mT
        else:
            raise AssertionError(self.how)
        p = F.softmax(s, dim=-1) if self.how != "noscale" else s.softmax(-1)
        return p @ v


def _inputs():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[..., -2:] = -1e4
    return q, k, v, mask


# Expected: one sdpa, every keyword spelled out, the mask and the scale found in the chain
SDPA = ("scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, "
        "l_v_, attn_mask = {}, dropout_p = 0.0, is_causal = False, scale = {}, "
        "enable_gqa = False)")
EXPECTED = {
    "div": SDPA.format("None", 1 / math.sqrt(8)),
    "mul+mask": SDPA.format("l_mask_", 1 / math.sqrt(8)),
    "mask+scaled": SDPA.format("l_mask_", 0.25),
    "noscale": SDPA.format("None", 1.0),
}


def test_explicit_chain_becomes_sdpa():
    model = Explicit("mul+mask")
    inputs = _inputs()
    cap = canonical(model, *inputs, until="canonicalize-linear")
    expect(cap.gm, """
        # CHECK: transpose = l_k_.transpose(2, 3)
        # CHECK-NEXT: matmul = torch.matmul(l_q_, transpose)
        # CHECK-NEXT: mul = matmul * 0.35355339059327373
        # CHECK-NEXT: s = mul + l_mask_
        # CHECK-NEXT: p = torch.nn.functional.softmax(s, dim = -1)
        # CHECK-NEXT: matmul_1 = p @ l_v_
        # CHECK-NEXT: return (matmul_1,)
    """)
    cap.run(until="canonicalize-attention")
    expect(cap.gm, f"""
        # CHECK-NOT: matmul
        # CHECK-NOT: softmax(
        # CHECK: {EXPECTED["mul+mask"]}
        # CHECK-NEXT: return (scaled_dot_product_attention,)
    """)
    assert cap.ctx.counters["canonicalize-attention.explicit"] == 1
    assert_same_function(model, cap, *inputs, exact=False, rtol=1e-5)


@pytest.mark.parametrize("how", [h for h in EXPECTED if h != "mul+mask"])  # (above)
def test_explicit_attention_becomes_sdpa(how):
    model = Explicit(how)
    inputs = _inputs()
    cap = canonical(model, *inputs, until="canonicalize-attention")
    expect(cap.gm, f"""
        # CHECK-NOT: softmax
        # CHECK-NOT: @
        # CHECK: {EXPECTED[how]}
        # CHECK-NEXT: return (scaled_dot_product_attention,)
    """)
    assert cap.ctx.counters["canonicalize-attention.explicit"] == 1
    # sdpa rounds differently from the explicit chain: same function to float precision
    assert_same_function(model, cap, *inputs, exact=False, rtol=1e-5)


class Positional(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


def test_sdpa_keywords_spelled_out_and_exact():
    q, k, v, _ = _inputs()
    cap = canonical(Positional(), q, k, v, until="canonicalize-linear")
    expect(cap.gm, "# CHECK: scaled_dot_product_attention(l_q_, l_k_, l_v_, None, 0.0, True)")
    cap.run(until="canonicalize-attention")
    expect(cap.gm, """
        # CHECK: scaled_dot_product_attention(l_q_, l_k_, l_v_, attn_mask = None,
        # CHECK-SAME: dropout_p = 0.0, is_causal = True, scale = None, enable_gqa = False)
    """)
    assert_same_function(Positional(), cap, q, k, v, exact=True)


def _unchanged(model, *inputs):
    cap = canonical(model, *inputs, until="canonicalize-linear")
    code = cap.gm.code
    cap.run(until="canonicalize-attention")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    expect(code, """
        # CHECK-NOT: scaled_dot_product_attention
        # CHECK: softmax(
        # CHECK-NOT: scaled_dot_product_attention
    """)


class ReturnsWeights(torch.nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return p @ v, p


def test_attention_weights_used_elsewhere_unchanged():
    q, k, v, _ = _inputs()
    _unchanged(ReturnsWeights(), q, k, v)


class SoftmaxOtherDim(torch.nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


def test_softmax_over_other_dim_unchanged():
    q, k, v, _ = _inputs()
    _unchanged(SoftmaxOtherDim(), q, k, v)
