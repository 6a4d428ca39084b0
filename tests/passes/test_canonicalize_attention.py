"""canonicalize-attention: sdpa keywords, the explicit softmax(QK^T)V spellings, negatives."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_function, canonical, count


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


@pytest.mark.parametrize("how", ["div", "mul+mask", "mask+scaled", "noscale"])
def test_explicit_attention_becomes_sdpa(how):
    model = Explicit(how)
    inputs = _inputs()
    cap = canonical(model, *inputs, until="canonicalize-attention")
    assert count(cap.gm, F.scaled_dot_product_attention) == 1
    assert count(cap.gm, F.softmax) == 0 and count(cap.gm, "softmax") == 0
    assert cap.ctx.counters["canonicalize-attention.explicit"] == 1
    node = next(n for n in cap.gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert set(node.kwargs) == {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
    # sdpa rounds differently from the explicit chain: same function to float precision
    assert_same_function(model, cap, *inputs, exact=False, rtol=1e-5)


class Positional(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


def test_sdpa_keywords_spelled_out_and_exact():
    q, k, v, _ = _inputs()
    cap = canonical(Positional(), q, k, v, until="canonicalize-attention")
    node = next(n for n in cap.gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert len(node.args) == 3 and node.kwargs["is_causal"] is True
    assert node.kwargs["scale"] is None
    assert_same_function(Positional(), cap, q, k, v, exact=True)


class ReturnsWeights(torch.nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return p @ v, p


def test_attention_weights_used_elsewhere_unchanged():
    q, k, v, _ = _inputs()
    cap = canonical(ReturnsWeights(), q, k, v, until="canonicalize-attention")
    assert count(cap.gm, F.scaled_dot_product_attention) == 0


class SoftmaxOtherDim(torch.nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


def test_softmax_over_other_dim_unchanged():
    q, k, v, _ = _inputs()
    cap = canonical(SoftmaxOtherDim(), q, k, v, until="canonicalize-attention")
    assert count(cap.gm, F.scaled_dot_product_attention) == 0
