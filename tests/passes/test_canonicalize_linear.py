"""canonicalize-linear: Before/Expected for each spelling, and graphs that must not change."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_function, canonical, expect


class Spelling(torch.nn.Module):
    def __init__(self, how, bias=True):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn(24, 16))  # [N, K]
        self.w_kn = torch.nn.Parameter(torch.randn(16, 24))  # [K, N] (GPT-2 Conv1D)
        self.b = torch.nn.Parameter(torch.randn(24)) if bias else None

    def forward(self, x):
        how = self.how
        if how == "F.linear":
            return F.linear(x, self.w, bias=self.b)
        if how == "C.linear":
            return torch._C._nn.linear(x, self.w, self.b)
        if how == "@ w.t()":
            return x @ self.w.t()
        if how == "@ w.T":
            return x @ self.w.T
        if how == "matmul transpose":
            return torch.matmul(x, self.w.transpose(0, 1))
        if how == "matmul kn":
            return torch.matmul(x, self.w_kn)
        if how == "mm":
            return torch.mm(x.reshape(-1, 16), self.w_kn)
        if how == "addmm":
            return torch.addmm(self.b, x.reshape(-1, 16), self.w_kn)
        if how == "addmm t":
            return torch.addmm(self.b, x.reshape(-1, 16), self.w.t())
        raise AssertionError(how)


# Expected: one linear reading the constant itself, or a transposed view of a [K, N]
# weight (`w_kn_t`); torch.mm / addmm spellings keep the reshape that makes x 2-D
SPELLINGS = {
    "C.linear": "torch._C._nn.linear(l_x_, w, b)",
    "@ w.t()": "torch._C._nn.linear(l_x_, w, None)",
    "@ w.T": "torch._C._nn.linear(l_x_, w, None)",
    "matmul transpose": "torch._C._nn.linear(l_x_, w, None)",
    "matmul kn": "torch._C._nn.linear(l_x_, w_kn_t, None)",
    "mm": "torch._C._nn.linear(reshape, w_kn_t, None)",
    "addmm": "torch._C._nn.linear(reshape, w_kn_t, b)",
    "addmm t": "torch._C._nn.linear(reshape, w, b)",
}


@pytest.mark.parametrize("how", SPELLINGS)
def test_spelling_becomes_linear_bit_exact(how):
    model = Spelling(how).eval()
    x = torch.randn(3, 5, 16)
    cap = canonical(model, x, until="canonicalize-linear")
    gm = cap.gm
    expect(gm, f"""
        # CHECK-NOT: torch.matmul
        # CHECK-NOT: torch.mm
        # CHECK-NOT: torch.addmm
        # CHECK-NOT: @
        # CHECK-NOT: torch._C._nn.linear
        # CHECK: {SPELLINGS[how]}
        # CHECK-NEXT: return (linear,)
    """)
    rec = cap.ctx.history[-1]
    assert rec.name == "canonicalize-linear"
    # C.linear is F.linear already: only its keyword form would need normalising
    assert rec.modified == (how != "C.linear")
    lin = next(n for n in gm.graph.nodes if n.target is F.linear)
    w = getattr(gm, lin.args[1].target)
    assert w.shape == (24, 16)
    assert_same_function(model, cap, x, exact=True)


class MatmulPlusBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(24, 16))  # [N, K]
        self.b = torch.nn.Parameter(torch.randn(24))

    def forward(self, x):
        return x @ self.w.t() + self.b


def test_matmul_with_transposed_weight_becomes_linear_and_the_bias_add_stays():
    model = MatmulPlusBias().eval()
    x = torch.randn(3, 16)
    cap = canonical(model, x, until="freeze-params")
    expect(cap.gm, """
        # CHECK: t = w.t()
        # CHECK-NEXT: matmul = l_x_ @ t
        # CHECK-NEXT: add = matmul + b
        # CHECK-NEXT: return (add,)
    """)
    cap.run(until="canonicalize-linear")
    # `+ b` is not among the spellings (an add after the product rounds differently from
    # linear's bias): it stays an add, after a linear without bias
    expect(cap.gm, """
        # CHECK-NOT: .t()
        # CHECK: linear = torch._C._nn.linear(l_x_, w, None)
        # CHECK-NEXT: add = linear + b
        # CHECK-NEXT: return (add,)
    """)
    assert cap.ctx.history[-1].counters == {"matmul": 1}
    assert_same_function(model, cap, x, exact=True)


def test_keyword_linear_is_normalised():
    model = Spelling("F.linear").eval()
    cap = canonical(model, torch.randn(2, 16), until="freeze-params")
    expect(cap.gm, "# CHECK: linear = torch._C._nn.linear(l_x_, w, bias = b)")
    cap.run(until="canonicalize-linear")
    expect(cap.gm, "# CHECK: = torch._C._nn.linear(l_x_, w, b)")
    lin = next(n for n in cap.gm.graph.nodes if n.target is F.linear)
    assert len(lin.args) == 3 and not lin.kwargs


def _unchanged(model, *inputs) -> str:
    cap = canonical(model, *inputs, until="freeze-params")
    code = cap.gm.code
    cap.run(until="canonicalize-linear")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    return code


class ActAct(torch.nn.Module):
    def forward(self, a, b):
        return a @ b.transpose(-1, -2)


def test_activation_matmul_unchanged():
    code = _unchanged(ActAct(), torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    expect(code, "# CHECK: matmul = l_a_ @ transpose")


class ScaledAddmm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8))
        self.b = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.addmm(self.b, x, self.w, beta=0.5)


def test_addmm_with_beta_unchanged():
    code = _unchanged(ScaledAddmm(), torch.randn(4, 16))
    expect(code, "# CHECK: addmm = torch.addmm(b, l_x_, w, beta = 0.5)")


def test_weight_view_shares_storage():
    """addmm(b, x, W_kn) becomes linear over a transposed view: no copy of the weight."""
    model = Spelling("addmm").eval()
    cap = canonical(model, torch.randn(4, 16), until="canonicalize-linear")
    lin = next(n for n in cap.gm.graph.nodes if n.target is F.linear)
    w = getattr(cap.gm, lin.args[1].target)
    assert w.data_ptr() == model.w_kn.data_ptr()
    assert lin.args[1].meta["qc_param_name"] == "w_kn"
