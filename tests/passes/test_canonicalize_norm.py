"""canonicalize-norm: modules, decomposed RMSNorm / LayerNorm, negatives."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_function, canonical, count


class DecomposedRMS(torch.nn.Module):
    """LLaMA-style RMSNorm, with the fp32 round trip, and spelling variants."""

    def __init__(self, how, d=16):
        super().__init__()
        self.how = how
        self.weight = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = x.to(torch.float32)
        if self.how == "pow-rsqrt":
            var = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(var + 1e-6)
            return self.weight * h.to(x.dtype)
        if self.how == "mul-sqrt":
            var = (h * h).mean(dim=-1, keepdim=True)
            return h * (1.0 / torch.sqrt(var + 1e-5)) * self.weight
        if self.how == "noweight":
            return h * (h.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["pow-rsqrt", "mul-sqrt", "noweight"])
def test_decomposed_rmsnorm(how):
    model = DecomposedRMS(how)
    x = torch.randn(2, 5, 16)
    cap = canonical(model, x, until="canonicalize-norm")
    assert count(cap.gm, F.rms_norm) == 1
    assert count(cap.gm, torch.rsqrt) == 0 and count(cap.gm, "rsqrt") == 0
    node = next(n for n in cap.gm.graph.nodes if n.target is F.rms_norm)
    assert (node.args[2] is None) == (how == "noweight")
    assert_same_function(model, cap, x, exact=(how == "pow-rsqrt"), rtol=1e-6)


class DecomposedLN(torch.nn.Module):
    def __init__(self, how, d=16):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn(d))
        self.b = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        if self.how == "var":
            var = x.var(-1, keepdim=True, unbiased=False)
            y = (x - mu) / torch.sqrt(var + 1e-5)
        else:
            xc = x - mu
            y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)
        return y * self.w + self.b


@pytest.mark.parametrize("how", ["var", "centered"])
def test_decomposed_layernorm(how):
    model = DecomposedLN(how)
    x = torch.randn(2, 5, 16) * 3 + 1
    cap = canonical(model, x, until="canonicalize-norm")
    assert count(cap.gm, F.layer_norm) == 1
    node = next(n for n in cap.gm.graph.nodes if n.target is F.layer_norm)
    assert node.args[2] is not None and node.args[3] is not None and node.args[4] == 1e-5
    assert_same_function(model, cap, x, exact=False, rtol=1e-5)


class Modules(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16, eps=1e-6)

    def forward(self, x):
        return self.rms(self.ln(x))


def test_module_norms_positional_and_exact():
    model = Modules().eval()
    x = torch.randn(3, 16)
    cap = canonical(model, x, until="canonicalize-norm")
    for target, n in ((F.layer_norm, 5), (F.rms_norm, 4)):
        node = next(nd for nd in cap.gm.graph.nodes if nd.target is target)
        assert len(node.args) == n and not node.kwargs
    assert_same_function(model, cap, x, exact=True)


class NotANorm(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # sum, not mean


def test_sum_of_squares_is_not_rmsnorm():
    cap = canonical(NotANorm(), torch.randn(2, 16), until="canonicalize-norm")
    assert count(cap.gm, F.rms_norm) == 0
