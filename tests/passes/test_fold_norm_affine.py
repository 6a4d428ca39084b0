"""fold-norm-affine: Before/Expected on a small pre-norm model (LayerNorm and RMSNorm, tied
lm_head), and the norms it must leave alone. The toy models and `transformed` here are
shared by the other transform tests."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.fx_utils import get_constant
from tests.helpers import expect


def _norm(kind: str, d: int) -> torch.nn.Module:
    norm = torch.nn.LayerNorm(d) if kind == "layer" else torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d))
        if kind == "layer":
            norm.bias.copy_(torch.randn(d))
    return norm


class PreNorm(torch.nn.Module):
    """Embedding, `layers` pre-norm MLP blocks x + down(gelu(up(norm(x)))), a final norm
    and an lm_head (tied to the embedding unless tied=False)."""

    def __init__(self, norm="layer", d=16, hidden=32, layers=2, vocab=24, tied=True,
                 head_reads_norm=True, return_hidden=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, d)
        self.norms = torch.nn.ModuleList(_norm(norm, d) for _ in range(layers))
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, hidden) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(hidden, d) for _ in range(layers))
        self.final = _norm(norm, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.head_reads_norm, self.return_hidden = head_reads_norm, return_hidden

    def forward(self, ids):
        x = self.emb(ids)
        for norm, up, down in zip(self.norms, self.up, self.down, strict=True):
            x = x + down(F.gelu(up(norm(x))))
        h = self.final(x)
        logits = self.head(h if self.head_reads_norm else x)
        return (logits, h) if self.return_hidden else logits


class PostNorm(torch.nn.Module):
    """BERT-style: x = norm(x + down(gelu(up(x)))) per block."""

    def __init__(self, d=16, hidden=32, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.norms = torch.nn.ModuleList(_norm("layer", d) for _ in range(layers))
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, hidden) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(hidden, d) for _ in range(layers))

    def forward(self, x):
        for norm, up, down in zip(self.norms, self.up, self.down, strict=True):
            x = norm(x + down(F.gelu(up(x))))
        return x


def transformed(model, *inputs, passes, **options):
    """Capture model in float64, run canonicalization and analysis, then `passes` one by
    one. Returns (captured, outputs before the passes)."""
    model = model.double().eval()
    inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    cap = qcompile.capture(model, *inputs, options={"recipe": "w8a8", **options})
    cap.run(until="canonicalize-norm")
    before = cap()
    cap.run_pass("analyze-structure")
    for name in passes:
        cap.run_pass(name)
    return cap, before


def assert_close(out, ref, rtol=1e-12):
    out = out if isinstance(out, (tuple, list)) else [out]
    ref = ref if isinstance(ref, (tuple, list)) else [ref]
    for a, b in zip(out, ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() < rtol


def nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def linear_by_param(gm, name):
    return next(n for n in nodes(gm, F.linear) if n.args[1].meta["qc_param_name"] == name)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_folds_gamma_and_beta_into_consumers(kind):
    model = PreNorm(kind).double()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 24, (2, 5))
    cap, before = transformed(model, ids, passes=[])
    norm = f"{kind}_norm"
    # gamma, beta and eps as the norm's arguments after x and its shape
    affine = "{0}_weight, {0}_bias, 1e-05" if kind == "layer" else "{0}_weight, 1e-06"
    expect(cap.gm, f"""
        # CHECK: x = torch.nn.functional.embedding(l_ids_, emb_weight,
        # CHECK-NEXT: {norm} = torch.nn.functional.{norm}(x, (16,), {affine.format("norms_0")})
        # CHECK-NEXT: linear = torch._C._nn.linear({norm}, up_0_weight, up_0_bias)
        # CHECK: h = torch.nn.functional.{norm}(x_2, (16,), {affine.format("final")})
        # CHECK-NEXT: logits = torch._C._nn.linear(h, emb_weight, None)
    """)
    cap.run_pass("fold-norm-affine")
    gm = cap.gm
    # Expected: norms without affine, the linears reading them new values under the same
    # names (below); the tied lm_head reads its own folded copy of the embedding (and, for
    # LayerNorm, a bias W beta), the embedding still the user's tensor
    no_affine = "None, None, 1e-05" if kind == "layer" else "None, 1e-06"
    head_bias = "emb_bias" if kind == "layer" else "None"
    expect(gm, f"""
        # CHECK: x = torch.nn.functional.embedding(l_ids_, emb_weight,
        # CHECK-NEXT: {norm} = torch.nn.functional.{norm}(x, (16,), {no_affine})
        # CHECK-NEXT: linear = torch._C._nn.linear({norm}, up_0_weight, up_0_bias)
        # CHECK: {norm}_1 = torch.nn.functional.{norm}(x_1, (16,), {no_affine})
        # CHECK: h = torch.nn.functional.{norm}(x_2, (16,), {no_affine})
        # CHECK-NEXT: emb_weight_1 = self.emb_weight_1
        # CHECK: logits = torch._C._nn.linear(h, emb_weight_1, {head_bias})
    """)
    expect(gm, """
        # CHECK-NOT: norms_
        # CHECK-NOT: final_
    """)
    # Expected: W' = W diag(gamma), b' = b + W beta
    up = linear_by_param(gm, "up.0.weight")
    g, w, b = model.norms[0].weight, model.up[0].weight, model.up[0].bias
    torch.testing.assert_close(get_constant(gm, up.args[1]), w * g[None, :], rtol=0, atol=0)
    expected_b = b + w @ model.norms[0].bias if kind == "layer" else b
    torch.testing.assert_close(get_constant(gm, up.args[2]), expected_b, rtol=1e-15, atol=1e-15)
    # the tied lm_head gets its own folded copy; the embedding keeps the user's tensor
    head = linear_by_param(gm, "emb.weight")
    emb = nodes(gm, F.embedding)[0]
    assert get_constant(gm, emb.args[1]).data_ptr() == model.emb.weight.data_ptr()
    torch.testing.assert_close(get_constant(gm, head.args[1]),
                               model.emb.weight * model.final.weight[None, :], rtol=0, atol=0)
    if kind == "layer":
        torch.testing.assert_close(get_constant(gm, head.args[2]),
                                   model.emb.weight @ model.final.bias, rtol=1e-15, atol=1e-15)
    assert any("tied" in note for note in cap.ctx.notes)
    rec = cap.ctx.history[-1]
    assert rec.modified and rec.counters == {"folded": 3, "linears": 3}
    assert "fold-norm(" in cap.ctx.layers["up.0"].transforms[0]
    assert_close(cap(), before)
    for k, v in model.state_dict().items():  # the user's parameters are untouched
        assert torch.equal(v, originals[k]), k


def test_post_norm_graph_is_unchanged():
    model = PostNorm()
    cap, before = transformed(model, torch.randn(2, 5, 16), passes=[])
    code = cap.gm.code
    cap.run_pass("fold-norm-affine")
    rec = cap.ctx.history[-1]
    assert not rec.modified and rec.counters == {"skipped": 2}
    assert cap.gm.code == code
    # the norms write the residual stream: their gamma / beta stay where they are
    expect(code, """
        # CHECK: add = l_x_ + linear_1
        # CHECK-NEXT: x = torch.nn.functional.layer_norm(add, (16,), norms_0_weight, norms_0_bias,
        # CHECK-NEXT: linear_2 = torch._C._nn.linear(x, up_1_weight, up_1_bias)
    """)
    assert any("post-norm graph: no stream is rotated" in n for n in cap.ctx.notes)


def test_sandwich_norms_keep_their_gamma():
    """Gemma 3: the norms before attention and the MLP are read by linears only, but the
    graph is post-norm, nothing rotates its stream, and gamma (0 to 20 on the real model)
    folded into int4 per-channel weights took its perplexity from 85 to 1e10."""
    from tests.passes.test_analyze_structure import tiny_gemma3

    pytest.importorskip("transformers")
    cap, _ = transformed(tiny_gemma3(), torch.randint(0, 64, (2, 7)), passes=[])
    weights = {k: v.clone() for k, v in cap.gm.state_dict().items()}
    cap.run_pass("fold-norm-affine")
    assert not cap.ctx.history[-1].modified
    assert all(torch.equal(v, weights[k]) for k, v in cap.gm.state_dict().items())
    assert not any(layer.transforms for layer in cap.ctx.layers.values())


class TwoDimNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm((4, 16))
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_norm_over_more_than_the_last_dim_is_not_folded():
    cap, _ = transformed(TwoDimNorm(), torch.randn(2, 4, 16), passes=["fold-norm-affine"])
    assert not cap.ctx.history[-1].modified
    assert any("more than the last dim" in n for n in cap.ctx.notes)
    assert nodes(cap.gm, F.layer_norm)[0].args[2] is not None
