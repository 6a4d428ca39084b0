"""canonicalize-linear: Before/Expected for each spelling, and graphs that must not change."""

import operator

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_function, canonical, count


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


SPELLINGS = ["C.linear", "@ w.t()", "@ w.T", "matmul transpose", "matmul kn", "mm",
             "addmm", "addmm t"]


@pytest.mark.parametrize("how", SPELLINGS)
def test_spelling_becomes_linear_bit_exact(how):
    model = Spelling(how).eval()
    x = torch.randn(3, 5, 16)
    cap = canonical(model, x, until="canonicalize-linear")
    gm = cap.gm
    assert count(gm, F.linear) == 1
    for t in (torch.matmul, operator.matmul, torch.mm, torch.addmm):
        assert count(gm, t) == 0
    rec = cap.ctx.history[-1]
    assert rec.name == "canonicalize-linear"
    # C.linear is F.linear already: only its keyword form would need normalising
    assert rec.modified == (how != "C.linear")
    lin = next(n for n in gm.graph.nodes if n.target is F.linear)
    w = getattr(gm, lin.args[1].target)
    assert w.shape == (24, 16)
    assert_same_function(model, cap, x, exact=True)


def test_keyword_linear_is_normalised():
    model = Spelling("F.linear").eval()
    cap = canonical(model, torch.randn(2, 16), until="canonicalize-linear")
    lin = next(n for n in cap.gm.graph.nodes if n.target is F.linear)
    assert len(lin.args) == 3 and not lin.kwargs


class ActAct(torch.nn.Module):
    def forward(self, a, b):
        return a @ b.transpose(-1, -2)


def test_activation_matmul_unchanged():
    cap = canonical(ActAct(), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                    until="canonicalize-linear")
    assert count(cap.gm, F.linear) == 0
    assert not cap.ctx.history[-1].modified


class ScaledAddmm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8))
        self.b = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.addmm(self.b, x, self.w, beta=0.5)


def test_addmm_with_beta_unchanged():
    cap = canonical(ScaledAddmm(), torch.randn(4, 16), until="canonicalize-linear")
    assert count(cap.gm, torch.addmm) == 1
    assert count(cap.gm, F.linear) == 0


def test_weight_view_shares_storage():
    """addmm(b, x, W_kn) becomes linear over a transposed view: no copy of the weight."""
    model = Spelling("addmm").eval()
    cap = canonical(model, torch.randn(4, 16), until="canonicalize-linear")
    lin = next(n for n in cap.gm.graph.nodes if n.target is F.linear)
    w = getattr(cap.gm, lin.args[1].target)
    assert w.data_ptr() == model.w_kn.data_ptr()
    assert lin.args[1].meta["qc_param_name"] == "w_kn"
