"""Capture and the compiled artifact: frozen weights, identity/version checks, inference
only, dynamic shapes, graph breaks."""

import torch
import torch.nn.functional as F

import qcompile
from tests.helpers import TinyMLP

FLOAT = {"recipe": "float"}


def test_parameters_become_constants_with_module_paths():
    cap = qcompile.capture(TinyMLP().eval(), torch.randn(2, 16), options=FLOAT)
    cap.run(until="freeze-params")
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    names = sorted(n.meta["qc_param_name"] for n in cap.gm.graph.nodes if n.op == "get_attr")
    assert names == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    for node in cap.gm.graph.nodes:
        if node.op != "output":
            assert isinstance(node.meta["val"], torch.Tensor)


def test_another_instance_uses_its_own_weights():
    a, b = TinyMLP().eval(), TinyMLP().eval()
    x = torch.randn(3, 16)
    ca, cb = (torch.compile(m, backend="qcompile", options=FLOAT) for m in (a, b))
    with torch.no_grad():
        assert torch.equal(ca(x), a(x))
        assert torch.equal(cb(x), b(x))  # Dynamo may reuse a's graph: weights must differ
        assert torch.equal(ca(x), a(x))


def test_weights_changed_in_place_are_noticed():
    m = TinyMLP().eval()
    cm = torch.compile(m, backend="qcompile", options=FLOAT)
    x = torch.randn(3, 16)
    with torch.no_grad():
        cm(x)
        m.fc1.weight.mul_(2.0)
        assert torch.equal(cm(x), m(x))


def test_dynamic_batch_and_sequence():
    m = TinyMLP().eval()
    cm = torch.compile(m, backend="qcompile", options=FLOAT, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 3, 16), (5, 7, 16), (1, 1, 16)]:
            x = torch.randn(shape)
            assert torch.equal(cm(x), m(x))


def test_symbolic_shapes_through_composite_meta_functions():
    """BLOOM's ALiBi: bias.baddbmm(q, k) over symbolic batch and sequence. Its meta function
    expands with symbolic sizes, which the passes' fake-tensor runs can only do under the
    Python dispatcher, as Dynamo traced it."""

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            b, s, _ = x.shape
            bias = torch.arange(s, dtype=x.dtype)[None, None, :].repeat(b, 1, 1)
            return bias.baddbmm(self.q(x), self.k(x).transpose(1, 2), beta=1.0, alpha=0.5)

    m = Scores().eval()
    cm = torch.compile(m, backend="qcompile", options=FLOAT, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 3, 8), (4, 6, 8)]:
            x = torch.randn(shape)
            assert torch.equal(cm(x), m(x))


def test_graph_breaks_compile_each_subgraph():
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b(F.relu(y))

    m = Breaks().eval()
    cm = torch.compile(m, backend="qcompile", options=FLOAT)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(cm(x), m(x))
    assert len(qcompile.report(cm).graphs) == 2
