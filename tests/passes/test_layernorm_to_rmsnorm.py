"""layernorm-to-rmsnorm: a pre-norm stream read only by LayerNorms becomes zero-mean and
its readers RMSNorms; post-norm graphs, streams read by a linear or written by a
non-linear op are left alone with the reason recorded."""

import operator

import torch
import torch.nn.functional as F

from qcompile.fx_utils import get_constant
from tests.helpers import expect
from tests.passes.test_fold_norm_affine import (
    PostNorm,
    PreNorm,
    assert_close,
    linear_by_param,
    nodes,
    transformed,
)

PASSES = ["fold-norm-affine", "layernorm-to-rmsnorm"]


def test_stream_becomes_zero_mean_and_norms_rms():
    model = PreNorm("layer")
    cap, before = transformed(model, torch.randint(0, 24, (2, 5)), passes=PASSES[:1])
    # Before: every reader of the stream (x, x_1, x_2) is a LayerNorm without affine
    expect(cap.gm, """
        # CHECK: x = torch.nn.functional.embedding(l_ids_, emb_weight,
        # CHECK-NEXT: layer_norm = torch.nn.functional.layer_norm(x, (16,), None, None, 1e-05)
        # CHECK: x_1 = x + linear_1
        # CHECK-NEXT: layer_norm_1 = torch.nn.functional.layer_norm(x_1, (16,), None, None,
        # CHECK: x_2 = x_1 + linear_3
        # CHECK-NEXT: h = torch.nn.functional.layer_norm(x_2, (16,), None, None, 1e-05)
    """)
    cap.run_pass("layernorm-to-rmsnorm")
    gm = cap.gm
    # Expected: the same graph with RMSNorms (the writers' weights change, below)
    expect(gm, """
        # CHECK-NOT: layer_norm
        # CHECK: x = torch.nn.functional.embedding(l_ids_, emb_weight,
        # CHECK-NEXT: = torch.nn.functional.rms_norm(x, (16,), None, 1e-05)
        # CHECK-NEXT: linear = torch._C._nn.linear(rms_norm
        # CHECK: x_1 = x + linear_1
        # CHECK-NEXT: = torch.nn.functional.rms_norm(x_1, (16,), None, 1e-05)
        # CHECK: x_2 = x_1 + linear_3
        # CHECK-NEXT: = torch.nn.functional.rms_norm(x_2, (16,), None, 1e-05)
        # CHECK: logits = torch._C._nn.linear(rms_norm
        # CHECK-NOT: layer_norm
    """)
    rec = cap.ctx.history[-1]
    assert rec.counters == {"streams": 1, "writers": 3, "converted": 3}
    # Expected: every written vector has zero mean (embedding rows, down columns, bias)
    emb = get_constant(gm, nodes(gm, F.embedding)[0].args[1])
    down = linear_by_param(gm, "down.1.weight")
    for t in (emb, get_constant(gm, down.args[1]).T, get_constant(gm, down.args[2])):
        assert t.mean(-1).abs().max() < 1e-15
    torch.testing.assert_close(get_constant(gm, down.args[1]),
                               model.down[1].weight - model.down[1].weight.mean(0), rtol=0,
                               atol=1e-15)
    assert cap.ctx.layers["down.0"].transforms == ["zero-mean(out)"]
    assert_close(cap(), before)


def test_unfolded_affine_stays_explicit():
    """The final norm's output is also returned: fold-norm-affine keeps its gamma / beta,
    so the RMSNorm keeps gamma and beta becomes an explicit add."""
    model = PreNorm("layer", return_hidden=True)
    cap, before = transformed(model, torch.randint(0, 24, (2, 5)), passes=PASSES)
    expect(cap.gm, """
        # CHECK: rms_norm_1 = torch.nn.functional.rms_norm(x_2, (16,), final_weight, 1e-05)
        # CHECK-NEXT: add = rms_norm_1 + final_bias
        # CHECK-NEXT: logits = torch._C._nn.linear(add, emb_weight, None)
        # CHECK-NEXT: return (logits, add)
    """)
    final = nodes(cap.gm, F.rms_norm)[-1]
    assert final.args[2] is not None
    [add] = [u for u in final.users if u.target is operator.add]
    assert get_constant(cap.gm, add.args[1]) is not None
    assert_close(cap(), before)


def _unchanged_with(model, x, reason):
    cap, _ = transformed(model, x, passes=["fold-norm-affine"])
    code = cap.gm.code
    cap.run_pass("layernorm-to-rmsnorm")
    rec = cap.ctx.history[-1]
    assert not rec.modified and rec.counters == {"skipped": 1}, rec.counters
    assert cap.gm.code == code
    assert any(n.startswith("layernorm-to-rmsnorm") and reason in n for n in cap.ctx.notes), \
        cap.ctx.notes


def test_post_norm_is_skipped():
    cap, _ = transformed(PostNorm(), torch.randn(2, 5, 16), passes=PASSES)
    assert not cap.ctx.history[-1].modified
    assert any("post-norm" in n for n in cap.ctx.notes if n.startswith("layernorm-to-rms"))


def test_stream_read_by_a_linear_is_skipped():
    _unchanged_with(PreNorm("layer", head_reads_norm=False), torch.randint(0, 24, (2, 5)),
                    "are not invariant")


class ReluWriter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 16)
        self.fc = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.fc(x).relu()
        return self.head(self.norm(x))


def test_non_linear_writer_is_skipped():
    _unchanged_with(ReluWriter(), torch.randint(0, 10, (2, 5)), "cannot absorb")
