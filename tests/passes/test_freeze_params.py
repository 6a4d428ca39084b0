"""freeze-params: Before/Expected on a small module with a parameter, a buffer and an eval
dropout (training mode and gradients are refused: tests/test_inference_only.py)."""

import pytest
import torch

from tests.helpers import assert_same_function, expect, stage


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.drop = torch.nn.Dropout(0.1)
        self.register_buffer("shift", torch.randn(8))

    def forward(self, x):
        return self.drop(self.fc(x)) + self.shift


def test_parameters_and_buffers_become_constants_and_eval_dropout_goes():
    model = Block().eval()
    x = torch.randn(3, 16)
    cap = stage(model, x, before="freeze-params", options={"recipe": "float"})
    # Dynamo passes parameters and buffers in as graph inputs
    expect(cap.gm, """
        # CHECK: def forward(self, L_self_modules_fc_parameters_weight_ :
        # CHECK-SAME: torch.nn.parameter.Parameter,
        # CHECK-SAME: L_x_ : torch.Tensor, L_self_buffers_shift_ : torch.Tensor)
        # CHECK: linear = torch._C._nn.linear(l_x_, l_self_modules_fc_parameters_weight_,
        # CHECK-NEXT: dropout = torch.nn.functional.dropout(linear, 0.1, False, False)
        # CHECK-NEXT: add = dropout + l_self_buffers_shift_
    """)
    cap.run(until="freeze-params")
    # Expected: one input left; constants named after their module path; no dropout
    expect(cap.gm, """
        # CHECK: def forward(self, L_x_ : torch.Tensor):
        # CHECK-NEXT: fc_weight = self.fc_weight
        # CHECK-NEXT: fc_bias = self.fc_bias
        # CHECK-NEXT: l_x_ = L_x_
        # CHECK-NEXT: shift = self.shift
        # CHECK-NEXT: linear = torch._C._nn.linear(l_x_, fc_weight, fc_bias)
        # CHECK-NEXT: add = linear + shift
        # CHECK-NEXT: return (add,)
    """)
    assert cap.ctx.history[-1].counters == {"frozen": 3, "eval_dropout_removed": 1}
    assert cap.gm.fc_weight.data_ptr() == model.fc.weight.data_ptr()  # no copy
    assert cap.ctx.frozen["names"] == ["fc.weight", "fc.bias", "shift"]
    assert_same_function(model, cap, x, exact=True)


def test_scalars_of_a_module_passed_as_an_argument_fold_under_dynamic_shapes():
    """transformers decorates forward, so under dynamic=True Dynamo's frame sees the model
    as L['args'][0] and passes each RMSNorm's eps as a 0-d tensor read by .item(): it is
    folded to a number all the same (so canonicalize-norm finds the norms and the rotations
    apply), and parameter names carry no "args.0." prefix."""
    pytest.importorskip("transformers")
    import qcompile
    from tests.models import zoo

    model = zoo.llama().eval()
    torch._dynamo.reset()
    cm = torch.compile(model, backend="qcompile", dynamic=True,
                       options={"recipe": "w8a8", "rotate": True, "kernels": "cpu"})
    with torch.no_grad():
        ref, out = model(torch.randint(0, zoo.VOCAB, (2, 8))), None
        out = cm(torch.randint(0, zoo.VOCAB, (2, 8)))
    assert out.logits.shape == ref.logits.shape
    graphs = qcompile.report(cm).graphs
    freeze = [p for g in graphs for p in g.passes if p.name == "freeze-params"]
    assert freeze and all(p.counters.get("scalars", 0) >= 5 for p in freeze)  # 5 RMSNorm eps
    structure = [n for g in graphs for n in g.notes if n.startswith("structure of")]
    assert structure and all("pre-norm; 5 norms" in n for n in structure), structure
    names = [layer.name for g in graphs for layer in g.layers]
    assert names and not any(n.startswith("args.") for n in names), names
