"""rotate-residual, rotate-heads and online-hadamard: Before/Expected weights, exact
function in float64, un-rotation where values leave, and the skips (post-norm, sizes
without a Hadamard matrix, values used outside heads layout)."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.fx_utils import get_constant
from qcompile.passes.online_hadamard import HADAMARD, normalized_hadamard
from qcompile.passes.rotate_residual import rotation
from tests.helpers import expect, targets
from tests.passes.test_fold_norm_affine import (
    PostNorm,
    PreNorm,
    assert_close,
    linear_by_param,
    nodes,
    transformed,
)

RESIDUAL = ["fold-norm-affine", "layernorm-to-rmsnorm", "rotate-residual"]


def weights(cap):
    return {n.args[1].meta["qc_param_name"]: get_constant(cap.gm, n.args[1]).clone()
            for n in nodes(cap.gm, F.linear)}


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_rotate_residual_writers_and_readers(kind):
    cap, before = transformed(PreNorm(kind), torch.randint(0, 24, (2, 5)), passes=RESIDUAL[:2])
    w0 = weights(cap)
    emb0 = get_constant(cap.gm, nodes(cap.gm, F.embedding)[0].args[1]).clone()
    ops = targets(cap.gm)
    cap.run_pass("rotate-residual")
    # Expected: the same ops reading rotated weights (values below): nothing but norms
    # without affine and linears read the stream, so nothing is rotated online
    assert targets(cap.gm) == ops
    expect(cap.gm, """
        # CHECK-NOT: hadamard_transform
        # CHECK: x = torch.nn.functional.embedding(l_ids_, emb_weight,
        # CHECK-NEXT: = torch.nn.functional.rms_norm(x, (16,), None,
        # CHECK-NEXT: linear = torch._C._nn.linear(rms_norm
        # CHECK-SAME: up_0_weight, up_0_bias)
        # CHECK: logits = torch._C._nn.linear(
        # CHECK-SAME: emb_weight_1,
        # CHECK-NOT: hadamard_transform
    """)
    # nothing left behind: no constant without a reader (the signs of an un-rotation)
    assert not [n.name for n in cap.gm.graph.nodes if n.op == "get_attr" and not n.users]
    q, signs = rotation(16, cap.ctx.options.seed)
    assert signs is not None and torch.allclose(q.T @ q, torch.eye(16, dtype=q.dtype))
    w1 = weights(cap)
    # Expected: writers W <- Q^T W, E <- E Q; readers W <- W Q (the tied lm_head too)
    torch.testing.assert_close(w1["down.0.weight"], q.T @ w0["down.0.weight"])
    torch.testing.assert_close(w1["up.1.weight"], w0["up.1.weight"] @ q)
    torch.testing.assert_close(w1["emb.weight"], w0["emb.weight"] @ q)
    emb1 = get_constant(cap.gm, nodes(cap.gm, F.embedding)[0].args[1])
    torch.testing.assert_close(emb1, emb0 @ q)
    rec = cap.ctx.history[-1]
    assert rec.counters == {"streams": 1, "writers": 3, "readers": 3}
    assert "rotate-residual(in)" in cap.ctx.layers["up.0"].transforms
    assert not nodes(cap.gm, HADAMARD)
    assert_close(cap(), before)


def test_values_leaving_the_stream_are_unrotated():
    cap, before = transformed(PreNorm("rms", return_hidden=True), torch.randint(0, 24, (2, 5)),
                              passes=RESIDUAL[:2])
    # Before: the final norm kept its gamma, as its output h is also returned
    expect(cap.gm, """
        # CHECK: x = torch.nn.functional.embedding(l_ids_, emb_weight,
        # CHECK: h = torch.nn.functional.rms_norm(x_2, (16,), final_weight, 1e-06)
        # CHECK-NEXT: logits = torch._C._nn.linear(h, emb_weight, None)
        # CHECK-NEXT: return (logits, h)
    """)
    cap.run_pass("rotate-residual")
    # Expected: the embedding writes the rotated stream from its own rotated copy; the norm
    # drops gamma, then the rotated value is un-rotated online (had(x Q * s)) and gets gamma,
    # so the returned h and the lm_head (the user's embedding) see what they saw before
    expect(cap.gm, """
        # CHECK: emb_weight_1 = self.emb_weight_1
        # CHECK-NEXT: x = torch.nn.functional.embedding(l_ids_, emb_weight_1,
        # CHECK: = torch.nn.functional.rms_norm(x_2, (16,), None, 1e-06)
        # CHECK-NEXT: mul = rms_norm_2 * rotate_residual_signs
        # CHECK-NEXT: = torch.ops.qcompile.hadamard_transform.default(mul)
        # CHECK-NEXT: mul_1 = hadamard_transform_default * final_weight
        # CHECK-NEXT: logits = torch._C._nn.linear(mul_1, emb_weight, None)
        # CHECK-NEXT: return (logits, mul_1)
    """)
    [had] = nodes(cap.gm, HADAMARD)
    assert had.meta["qc_online_hadamard"] == "unrotate"
    assert cap.ctx.history[-1].counters["unrotations"] == 1
    assert_close(cap(), before)


def test_no_hadamard_size_uses_an_orthogonal_matrix():
    q, signs = rotation(18, 0)
    assert signs is None and torch.allclose(q @ q.T, torch.eye(18, dtype=q.dtype))
    cap, before = transformed(PreNorm("rms", d=18), torch.randint(0, 24, (2, 5)),
                              passes=RESIDUAL)
    assert cap.ctx.history[-1].counters["streams"] == 1
    assert_close(cap(), before)


def test_no_hadamard_size_with_exits_is_skipped():
    cap, _ = transformed(PreNorm("rms", d=18, return_hidden=True), torch.randint(0, 24, (2, 5)),
                         passes=RESIDUAL)
    assert not cap.ctx.history[-1].modified
    assert any("no Hadamard matrix" in n for n in cap.ctx.notes)


@pytest.mark.parametrize("model, reason", [
    (PostNorm(), "post-norm"),
    (PreNorm("layer", head_reads_norm=False), "not invariant"),  # a LayerNorm stays
], ids=["post-norm", "layernorm-reader"])
def test_rotate_residual_skips(model, reason):
    x = torch.randn(2, 5, 16) if isinstance(model, PostNorm) else torch.randint(0, 24, (2, 5))
    cap, _ = transformed(model, x, passes=RESIDUAL[:2])
    code = cap.gm.code
    cap.run_pass("rotate-residual")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    assert any(n.startswith("rotate-residual") and reason in n for n in cap.ctx.notes)


class Attention(torch.nn.Module):
    """q/k/v/o with grouped KV heads; GQA by sdpa or by an explicit repeat."""

    def __init__(self, d=32, heads=4, kv=2, hd=8, repeat=False, return_v=False,
                 leak_v=False):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.kv, self.hd = heads, kv, hd
        self.q = torch.nn.Linear(d, heads * hd)
        self.k = torch.nn.Linear(d, kv * hd)
        self.v = torch.nn.Linear(d, kv * hd)
        self.o = torch.nn.Linear(heads * hd, d)
        self.repeat, self.return_v, self.leak_v = repeat, return_v, leak_v

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)  # [B, H, S, D]
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)  # [B, KV, S, D]
        vp = self.v(x)
        v = vp.view(b, s, self.kv, self.hd).transpose(1, 2)
        if self.repeat:  # [B, KV, S, D] -> [B, H, S, D]
            n = self.heads // self.kv
            k = k[:, :, None].expand(b, self.kv, n, s, self.hd).reshape(b, self.heads, s, self.hd)
            v = v[:, :, None].expand(b, self.kv, n, s, self.hd).reshape(b, self.heads, s, self.hd)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=not self.repeat)
        out = self.o(a.transpose(1, 2).reshape(b, s, -1))
        if self.leak_v:
            out = out + vp.sum(-1, keepdim=True)
        return (out, v) if self.return_v else out


@pytest.mark.parametrize("repeat", [False, True], ids=["sdpa-gqa", "repeat-kv"])
def test_rotate_heads_v_and_o(repeat):
    model = Attention(repeat=repeat, return_v=True)
    cap, before = transformed(model, torch.randn(2, 5, 32), passes=[])
    w0 = weights(cap)
    b0 = get_constant(cap.gm, linear_by_param(cap.gm, "v.weight").args[2]).clone()
    k, v = ("k_1", "v_1") if repeat else ("k", "v")  # after the repeat, with repeat-kv
    expect(cap.gm, f"""
        # CHECK: vp = torch._C._nn.linear(l_x_, v_weight, v_bias)
        # CHECK: a = torch._C._nn.scaled_dot_product_attention(q, {k}, {v},
        # CHECK: out = torch._C._nn.linear(reshape{"_2" if repeat else ""}, o_weight, o_bias)
        # CHECK-NEXT: return (out, {v})
    """)
    cap.run_pass("rotate-heads")
    # Expected: the same attention on rotated v (weights below); v also leaves the graph,
    # so that use reads it un-rotated online
    expect(cap.gm, f"""
        # CHECK: vp = torch._C._nn.linear(l_x_, v_weight, v_bias)
        # CHECK: hadamard_transform_default = torch.ops.qcompile.hadamard_transform.default({v})
        # CHECK-NEXT: a = torch._C._nn.scaled_dot_product_attention(q, {k}, {v},
        # CHECK: out = torch._C._nn.linear(reshape{"_2" if repeat else ""}, o_weight, o_bias)
        # CHECK-NEXT: return (out, hadamard_transform_default)
    """)
    w1 = weights(cap)
    r = normalized_hadamard(8)
    # Expected: per head h, W_v[h] <- R^T W_v[h], b_v[h] <- R^T b_v[h], W_o[:, h] <- W_o[:, h] R
    wv = w0["v.weight"].reshape(2, 8, 32)
    torch.testing.assert_close(w1["v.weight"], (r.T @ wv).reshape(16, 32))
    bv = get_constant(cap.gm, linear_by_param(cap.gm, "v.weight").args[2])
    torch.testing.assert_close(bv, (r.T @ b0.reshape(2, 8, 1)).reshape(16))
    wo = w0["o.weight"].reshape(32, 4, 8)
    torch.testing.assert_close(w1["o.weight"], (wo @ r).reshape(32, 32))
    assert torch.equal(w1["q.weight"], w0["q.weight"])
    rec = cap.ctx.history[-1]
    assert rec.counters == {"heads_rotated": 1, "v_proj": 1, "o_proj": 1, "exits": 1}
    [had] = nodes(cap.gm, HADAMARD)  # the returned v is un-rotated
    assert had.meta["qc_online_hadamard"] == "unrotate"
    assert_close(cap(), before)


@pytest.mark.parametrize("model, reason", [
    (Attention(hd=6, d=24), "no Hadamard matrix"),
    (Attention(leak_v=True), "not as whole heads"),
], ids=["head-size-6", "v-used-flat"])
def test_rotate_heads_skips(model, reason):
    cap, _ = transformed(model, torch.randn(2, 5, model.q.in_features), passes=[])
    code = cap.gm.code
    cap.run_pass("rotate-heads")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    assert any(n.startswith("rotate-heads") and reason in n for n in cap.ctx.notes)


def test_online_hadamard_down_proj_and_qk():
    cap, before = transformed(PreNorm("rms"), torch.randint(0, 24, (2, 5)), passes=[])
    w0 = weights(cap)
    expect(cap.gm, """
        # CHECK: gelu = torch._C._nn.gelu(linear)
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(gelu, down_0_weight, down_0_bias)
    """)
    cap.run_pass("online-hadamard")
    # Expected: a Hadamard in front of every MLP down projection, its inverse folded into
    # the weight (below)
    expect(cap.gm, """
        # CHECK: gelu = torch._C._nn.gelu(linear)
        # CHECK-NEXT: = torch.ops.qcompile.hadamard_transform.default(gelu)
        # CHECK-NEXT: linear_1 = torch._C._nn.linear(hadamard_transform_default, down_0_weight,
        # CHECK: gelu_1 = torch._C._nn.gelu(linear_2)
        # CHECK-NEXT: hadamard_transform_default_1 = torch.ops.qcompile.hadamard_transform.default(
        # CHECK-NEXT: linear_3 = torch._C._nn.linear(hadamard_transform_default_1, down_1_weight,
    """)
    hads = nodes(cap.gm, HADAMARD)
    assert sorted(h.meta["qc_online_hadamard"] for h in hads) == ["down", "down"]
    down = linear_by_param(cap.gm, "down.0.weight")
    assert down.args[0].target is HADAMARD
    h = normalized_hadamard(32)
    torch.testing.assert_close(weights(cap)["down.0.weight"], w0["down.0.weight"] @ h.T)
    assert_close(cap(), before)

    cap, before = transformed(Attention(), torch.randn(2, 5, 32), passes=[])
    expect(cap.gm, "# CHECK: a = torch._C._nn.scaled_dot_product_attention(q, k, v,")
    cap.run_pass("online-hadamard")
    # Expected: q and k rotated at the sdpa inputs (had(q) had(k)^T = q k^T), v untouched
    expect(cap.gm, """
        # CHECK: hadamard_transform_default = torch.ops.qcompile.hadamard_transform.default(q)
        # CHECK-NEXT: = torch.ops.qcompile.hadamard_transform.default(k)
        # CHECK-NEXT: a = torch._C._nn.scaled_dot_product_attention(hadamard_transform_default,
        # CHECK-SAME: hadamard_transform_default_1, v,
    """)
    sdpa = nodes(cap.gm, F.scaled_dot_product_attention)[0]
    assert [a.meta["qc_online_hadamard"] for a in sdpa.args[:2]] == ["q", "k"]
    assert cap.ctx.history[-1].counters == {"qk": 1}
    assert_close(cap(), before)


def test_online_hadamard_post_norm_inputs():
    cap, before = transformed(PostNorm(), torch.randn(2, 5, 16), passes=["online-hadamard"])
    counters = cap.ctx.history[-1].counters
    # up.1 reads norm 0's output; down.* are MLP down projections (up.0 reads the input)
    assert counters == {"down_proj": 2, "post_norm_inputs": 1}
    assert linear_by_param(cap.gm, "up.1.weight").args[0].target is HADAMARD
    assert_close(cap(), before)


def test_online_hadamard_skips_sizes_without_hadamard():
    cap, before = transformed(PreNorm("rms", hidden=18), torch.randint(0, 24, (2, 5)),
                              passes=[])
    code = cap.gm.code
    cap.run_pass("online-hadamard")
    assert not cap.ctx.history[-1].modified and cap.gm.code == code
    assert any("input size 18 has no Hadamard matrix" in n for n in cap.ctx.notes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [16, 24, 40])
def test_hadamard_op(dtype, n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    ref = x @ normalized_hadamard(n).T
    out = HADAMARD(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert HADAMARD(torch.empty(2, n, dtype=dtype)).shape == (2, n)


def test_online_hadamard_sandwich_norm_down_projection():
    from tests.passes.test_analyze_structure import tiny_gemma3

    pytest.importorskip("transformers")
    model = tiny_gemma3()
    cap, before = transformed(model, torch.randint(0, 64, (2, 7)), passes=["online-hadamard"])
    counters = cap.ctx.history[-1].counters
    # Gemma's down projections write the stream through a norm of their output; their
    # input gets the online Hadamard as a plain pre-norm model's would
    assert counters["down_proj"] == 2 and counters["qk"] == 2
    for i in range(2):
        down = linear_by_param(cap.gm, f"model.layers.{i}.mlp.down_proj.weight")
        assert down.args[0].target is HADAMARD and down.meta["qc_online_hadamard"] == "down"
    assert_close(cap()[-1], before[-1], rtol=1e-6)  # the logits (float32 q/k/v norms inside)
