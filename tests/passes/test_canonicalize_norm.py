"""canonicalize-norm: Before/Expected for a decomposed RMSNorm and the module norms; each
spelling's one norm op; a graph that must not change."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_function, canonical, expect


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


# Expected: the weight (or None) and eps found in each spelling
RMS_NORM = {
    "pow-rsqrt": "torch.nn.functional.rms_norm(l_x_, (16,), weight, 1e-06)",
    "mul-sqrt": "torch.nn.functional.rms_norm(l_x_, (16,), weight, 1e-05)",
    "noweight": "torch.nn.functional.rms_norm(l_x_, (16,), None, 1e-06)",
}


def test_decomposed_rmsnorm_becomes_one_op():
    model = DecomposedRMS("pow-rsqrt")
    x = torch.randn(2, 5, 16)
    cap = canonical(model, x, until="canonicalize-attention")
    expect(cap.gm, """
        # CHECK: h = l_x_.to(torch.float32)
        # CHECK-NEXT: pow_1 = h.pow(2)
        # CHECK-NEXT: var = pow_1.mean(-1, keepdim = True)
        # CHECK-NEXT: add = var + 1e-06
        # CHECK-NEXT: rsqrt = torch.rsqrt(add)
        # CHECK-NEXT: h_1 = h * rsqrt
        # CHECK-NEXT: to_1 = h_1.to(torch.float32)
        # CHECK-NEXT: mul_1 = weight * to_1
        # CHECK-NEXT: return (mul_1,)
    """)
    cap.run(until="canonicalize-norm")
    # the .to(float32) round trip is part of the spelling: rms_norm reads x itself
    expect(cap.gm, f"""
        # CHECK: weight = self.weight
        # CHECK-NEXT: rms_norm = {RMS_NORM["pow-rsqrt"]}
        # CHECK-NEXT: return (rms_norm,)
    """)
    assert cap.ctx.history[-1].counters == {"decomposed_rms_norm": 1}
    assert_same_function(model, cap, x, exact=True)


@pytest.mark.parametrize("how", [h for h in RMS_NORM if h != "pow-rsqrt"])  # (above)
def test_decomposed_rmsnorm(how):
    model = DecomposedRMS(how)
    x = torch.randn(2, 5, 16)
    cap = canonical(model, x, until="canonicalize-norm")
    expect(cap.gm, f"""
        # CHECK-NOT: sqrt
        # CHECK-NOT: mean
        # CHECK: rms_norm = {RMS_NORM[how]}
        # CHECK-NEXT: return (rms_norm,)
    """)
    assert_same_function(model, cap, x, exact=False, rtol=1e-6)


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
    expect(cap.gm, """
        # CHECK-NOT: mean
        # CHECK-NOT: sqrt
        # CHECK: layer_norm = torch.nn.functional.layer_norm(l_x_, (16,), w, b, 1e-05)
        # CHECK-NEXT: return (layer_norm,)
    """)
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
    cap = canonical(model, x, until="canonicalize-attention")
    # Dynamo shows nn.RMSNorm as torch.rms_norm
    expect(cap.gm, "# CHECK: rms_norm = torch.rms_norm(layer_norm, (16,), rms_weight, 1e-06)")
    cap.run(until="canonicalize-norm")
    expect(cap.gm, """
        # CHECK: layer_norm = torch.nn.functional.layer_norm(l_x_, (16,), ln_weight, ln_bias, 1e-05)
        # CHECK-NEXT: rms_norm = torch.nn.functional.rms_norm(layer_norm, (16,), rms_weight, 1e-06)
        # CHECK-NEXT: return (rms_norm,)
    """)
    for target, n in ((F.layer_norm, 5), (F.rms_norm, 4)):
        node = next(nd for nd in cap.gm.graph.nodes if nd.target is target)
        assert len(node.args) == n and not node.kwargs
    assert_same_function(model, cap, x, exact=True)


class NotANorm(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # sum, not mean


def test_sum_of_squares_is_not_rmsnorm():
    cap = canonical(NotANorm(), torch.randn(2, 16), until="canonicalize-attention")
    code = cap.gm.code
    cap.run(until="canonicalize-norm")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    expect(code, """
        # CHECK-NOT: rms_norm
        # CHECK: sum_1 = pow_1.sum(-1, keepdim = True)
        # CHECK-NOT: rms_norm
    """)


class OffsetWeightRMS(torch.nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and applied as
    `(1.0 + w.float())`, then the result is cast back with type_as."""

    def __init__(self, d=16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d) * 0.3)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)


def test_weight_expression_becomes_a_constant():
    model = OffsetWeightRMS()
    x = torch.randn(2, 5, 16)
    cap = canonical(model, x, until="canonicalize-norm")
    expect(cap.gm, """
        # CHECK-NOT: mean
        # CHECK: rms_norm = torch.nn.functional.rms_norm(l_x_, (16,), weight_1, 1e-06)
        # CHECK-NEXT: type_as = rms_norm.type_as(l_x_)
    """)
    assert cap.ctx.history[-1].counters == {"decomposed_rms_norm": 1}
    norm = next(n for n in cap.gm.graph.nodes if n.target is F.rms_norm)
    weight = getattr(cap.gm, norm.args[2].target)
    assert torch.equal(weight, 1.0 + model.weight.detach())  # the value, computed once
    assert norm.args[2].meta["qc_param_name"] == "weight"
    assert torch.equal(model.weight, model.weight.detach())  # the user's tensor untouched
    assert_same_function(model, cap, x, exact=False, rtol=1e-6)


class TwoConstantsWeight(torch.nn.Module):
    """A weight computed from two parameters is not one constant's expression: left as is."""

    def __init__(self, d=16):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(d))
        self.b = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h * (self.a + self.b)


def test_weight_of_two_constants_stays_a_multiply():
    model = TwoConstantsWeight()
    x = torch.randn(2, 16)
    cap = canonical(model, x, until="canonicalize-norm")
    expect(cap.gm, """
        # CHECK: rms_norm = torch.nn.functional.rms_norm(l_x_, (16,), None, 1e-06)
        # CHECK-NEXT: add_1 = a + b
        # CHECK-NEXT: mul_1 = rms_norm * add_1
    """)
    assert_same_function(model, cap, x, exact=False, rtol=1e-6)
