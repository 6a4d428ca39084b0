"""Pass-by-pass debugging: capture a model, run the pipeline up to (or from) a named
pass, run a single pass, and look at the GraphModule in between.

    cap = qcompile.capture(model, x, options={"recipe": "float"})
    gm = cap.run(until="canonicalize-linear")     # capture .. canonicalize-linear
    gm = cap.run_pass("canonicalize-norm")         # one more pass
    print(cap.gm.code, cap.ctx.counters)

Prerequisites are checked against what already ran on this capture; nothing is reordered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from qcompile.config import Options
from qcompile.fx_utils import copy_graph_module, graph_fake_mode, seed_meta_from_dynamo
from qcompile.pass_manager import PassContext, PassManager, get_pass, pass_name
from qcompile.pipeline import passes as pipeline_passes


class Captured:
    """One Dynamo graph of a model, with its real example inputs and a pass context."""

    def __init__(self, gm: GraphModule, example_inputs: list, options: Options, name: str):
        self.source_gm = gm
        self.example_inputs = example_inputs
        self.options = options
        self.ctx = PassContext(options, fake_mode=graph_fake_mode(gm), name=name)
        self.ctx.analysis["example_inputs"] = example_inputs
        seed_meta_from_dynamo(gm)
        self.gm = copy_graph_module(gm)
        for node in self.gm.graph.nodes:
            node.meta["qc_pass"] = "capture"

    @property
    def pipeline(self) -> list[str]:
        return [pass_name(p) for p in pipeline_passes(self.options)]

    def run(self, *, until: str | None = None, start: str | None = None) -> GraphModule:
        """Run the pipeline's passes from `start` (default: the next one) to `until`."""
        passes = pipeline_passes(self.options)
        names = [pass_name(p) for p in passes]
        for bound in (until, start):
            if bound is not None and bound not in names:
                raise KeyError(f"no pass {bound!r} in this pipeline; passes: {names}")
        lo = names.index(start) if start else len(self.ctx.history)
        hi = names.index(until) + 1 if until else len(names)
        self.gm = PassManager(passes[lo:hi], self.ctx).run(self.gm)
        return self.gm

    def run_pass(self, name: str) -> GraphModule:
        self.gm = PassManager([get_pass(name)], self.ctx).run(self.gm)
        return self.gm

    def inputs(self) -> list:
        """The example inputs the current graph takes (frozen parameters removed)."""
        frozen = set(self.ctx.frozen.get("indices", ()))
        frozen |= {i for i, _ in self.ctx.frozen.get("scalars", ())}
        return [x for i, x in enumerate(self.example_inputs) if i not in frozen]

    def __call__(self, *args):
        with torch.no_grad():
            return self.gm(*(args or self.inputs()))


def capture(model: torch.nn.Module, *example_inputs: Any, options: dict | None = None,
            dynamic: bool | None = None, **kwargs: Any) -> Captured:
    """Trace `model(*example_inputs, **kwargs)` with Dynamo; returns the first graph.
    `capture_all` returns every graph when user code has graph breaks."""
    graphs = capture_all(model, *example_inputs, options=options, dynamic=dynamic, **kwargs)
    if not graphs:
        raise RuntimeError("Dynamo produced no graph for this model and input")
    return graphs[0]


def capture_all(model, *example_inputs, options=None, dynamic=None, **kwargs) -> list[Captured]:
    _check_capture(model, example_inputs, kwargs, dynamic)
    opts = Options.from_user(None, options)
    graphs: list[Captured] = []

    def collect(gm, inputs, **_):
        graphs.append(Captured(gm, list(inputs), opts, name=f"captured_{len(graphs):03d}"))
        return gm.forward

    compiled = torch.compile(model, backend=collect, dynamic=dynamic)
    with torch.no_grad():
        compiled(*example_inputs, **kwargs)
    return graphs


def _check_capture(model, example_inputs: tuple, kwargs: dict, dynamic) -> None:
    """A callable model and real example tensors: the passes run the graph on them (the
    calibration sample, SQNR), so a meta tensor or a call without any tensor (Dynamo would
    bake every value in as a constant) would fail deep inside, or capture nothing."""
    fn = "qcompile.capture"
    if not callable(model):
        raise TypeError(f"{fn}: model must be an nn.Module or a callable, got "
                        f"{type(model).__name__}")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"{fn}: dynamic must be True, False or None, got {dynamic!r}")
    leaves = tree_leaves((example_inputs, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        raise TypeError(f"{fn}: example_inputs must include a torch.Tensor (positional or "
                        f"keyword), got {[type(x).__name__ for x in leaves][:5]}")
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError(f"{fn}: example_inputs include a meta tensor, which holds no values: "
                         "the passes run the graph on the example inputs; pass real tensors")


def load_repro(path: str) -> dict:
    """Load what a failing pass left behind (see PassError): graph module, pass, options.

    The reproducer is a pickle (a GraphModule cannot be saved otherwise), and unpickling
    runs code: the directory is checked first like the kernel cache (ours, not writable by
    other users), so nobody else can have put a file there."""
    import os

    from qcompile.lowering.cache_dir import trusted_dir
    from qcompile.serialize import path_arg

    path = path_arg("qcompile.load_repro", path, exists="directory")
    folder = trusted_dir(path, what="reproducer directory",
                         elsewhere="copy the reproducer into a directory of your own")
    return torch.load(os.path.join(folder, "repro.pt"), weights_only=False)
