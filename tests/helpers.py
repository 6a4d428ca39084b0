"""Small models and graph helpers shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qcompile


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def count(gm, target) -> int:
    return sum(1 for t in targets(gm) if t is target or t == target)


def canonical(model, *inputs, until="canonicalize-norm", options=None):
    """Capture `model` and run the pipeline up to `until`; returns the Captured."""
    cap = qcompile.capture(model, *inputs, options={"recipe": "float", **(options or {})})
    cap.run(until=until)
    return cap


def assert_same_function(model, cap, *inputs, exact=True, rtol=1e-6):
    with torch.no_grad():
        ref = model(*inputs)
        out = cap()  # the captured example inputs, which are `inputs`
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
    if exact:
        assert torch.equal(ref, out), (ref - out).abs().max()
    else:
        torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol)


class TinyMLP(torch.nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))
