"""Small models and graph helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import torch
import torch.nn.functional as F
from torch.testing import FileCheck

import qcompile
from qcompile.fx_utils import copy_graph_module
from qcompile.pipeline import steps
from qcompile.state import ModelState


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def count(gm, target) -> int:
    return sum(1 for t in targets(gm) if t is target or t == target)


def canonical(model, *inputs, until="canonicalize-norm", options=None):
    """Capture `model` and run the pipeline up to `until`; returns the Captured."""
    cap = qcompile.capture(model, *inputs, options={"recipe": "float", **(options or {})})
    cap.run(until=until)
    return cap


def expect(graph, checks: str) -> None:
    """FileCheck `checks` against a graph's Python code (`gm.code`, or that text): one
    directive a line, `# CHECK: ...`, `# CHECK-NEXT:`, `# CHECK-NOT:`, `# CHECK-COUNT-2:`
    (torch.testing.FileCheck). Node names vary between graphs; check targets, constants
    (named after the model's parameters), their order, and what is absent."""
    text = graph if isinstance(graph, str) else graph.code
    FileCheck().run(textwrap.dedent(checks), text)


def stage(model, *inputs, before: str, options=None):
    """Capture `model` and run its pipeline up to, not including, the pass `before`: the
    Before graph of that pass is `cap.gm`, and `cap.run(until=before)` gives its Expected.
    Between the phases it does what the compiled artifact does (`_between_phases`)."""
    cap = _captured(model, inputs, options)
    for name in _pipeline(cap):
        if name == before:
            return cap
        cap.run_pass(name)
    raise KeyError(f"no pass {before!r} in this pipeline; passes: {cap.pipeline}")


def walk(model, *inputs, options=None):
    """Capture `model` and run its whole pipeline; returns (captured, graphs) with
    graphs[pass] = (code before the pass, code after it)."""
    cap = _captured(model, inputs, options)
    graphs = {}
    for name in _pipeline(cap):
        code = cap.gm.code
        cap.run_pass(name)
        graphs[name] = (code, cap.gm.code)
    return cap, graphs


class _CalibrationBatch(ModelState):
    """The state of a captured model whose example inputs are its calibration batch: a
    graph with observers feeds them whenever it runs (a compiled model's state does only
    inside `qcompile.calibrate`). Only `_between_phases` runs such a graph."""

    # always calibrating: a value ModelState itself assigns is ignored
    calibrating = property(lambda self: True, lambda self, value: None)


def _captured(model, inputs, options):
    cap = qcompile.capture(model, *inputs, options=options)
    cap.ctx.state = _CalibrationBatch()  # where the observers keep what they saw
    return cap


def _pipeline(cap):
    """The names of cap's passes, in order, with `_between_phases` before the first
    finalize pass."""
    compile_phase = len(steps(cap.options, "compile"))
    for i, name in enumerate(cap.pipeline):
        if i == compile_phase:
            _between_phases(cap)
        yield name


def _between_phases(cap) -> None:
    """What the compiled artifact does before finalizing: the graph runs on the example
    inputs (static recipes: the calibration batch), and the float graph and the sample
    inputs are kept for measure-sqnr."""
    cap()
    cap.ctx.analysis["float_gm"] = copy_graph_module(cap.gm)
    cap.ctx.analysis["sample_inputs"] = cap.inputs()


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


# the children of concurrency tests run Triton in the interpreter unless told otherwise
CHILD_ENV = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}


def run_together(script: str, folder, procs: int, count: int, timeout: float) -> None:
    """Runs `python -c script folder i count` in `procs` processes released at once: each
    child touches folder/ready<i>, waits for folder/go, does its work and prints "ok"."""
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(folder), str(i), str(count)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=CHILD_ENV)
        for i in range(procs)
    ]
    try:
        deadline = time.time() + timeout
        while not all((folder / f"ready{i}").exists() for i in range(procs)):
            assert time.time() < deadline and all(c.poll() is None for c in children), [
                c.communicate() for c in children if c.poll() is not None
            ]
            time.sleep(0.01)
        (folder / "go").touch()
        outs = [c.communicate(timeout=timeout) for c in children]
    finally:
        for c in children:
            c.kill()
    assert [(c.returncode, out) for c, (out, _) in zip(children, outs)] == [(0, "ok\n")] * procs, \
        [err for _, err in outs]
