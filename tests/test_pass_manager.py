"""The pass manager: ordering errors, failure messages and reproducers, dumps, printing,
timing, provenance, and the pass-by-pass API."""

import os

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.pass_manager import (
    PassContext,
    PassError,
    PassManager,
    PassOrderError,
    PassResult,
    get_pass,
    graph_pass,
)
from tests.helpers import TinyMLP


@graph_pass("test-explode", requires=("freeze-params",))
def _explode(gm, ctx):
    raise ValueError("boom")


@graph_pass("test-add-relu", requires=("freeze-params",))
def _add_relu(gm, ctx):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0][0]
    with gm.graph.inserting_before(out):
        r = gm.graph.call_function(torch.relu, (src,))
    out.args = ((r,),)
    return PassResult(gm, True, {"relus": 1})


def _cap(**options):
    return qcompile.capture(TinyMLP().eval(), torch.randn(2, 16),
                            options={"recipe": "float", **options})


def test_order_error_names_the_missing_prerequisite():
    cap = _cap()
    with pytest.raises(PassOrderError, match="requires \\['freeze-params'\\]"):
        PassManager([get_pass("canonicalize-linear")], cap.ctx)


def test_run_pass_checks_history_not_order():
    cap = _cap()
    with pytest.raises(PassOrderError):
        cap.run_pass("canonicalize-norm")
    cap.run_pass("freeze-params")
    gm = cap.run_pass("canonicalize-norm")  # prerequisites met: runs alone
    assert cap.ctx.passes_run == ["freeze-params", "canonicalize-norm"]
    assert isinstance(gm, torch.fx.GraphModule)


def test_failure_names_pass_and_predecessors_and_leaves_repro(tmp_path):
    cap = _cap(debug_dir=str(tmp_path))
    cap.run(until="canonicalize-linear")
    with pytest.raises(PassError) as info:
        cap.run_pass("test-explode")
    msg = str(info.value)
    assert "'test-explode' failed" in msg and "boom" in msg
    assert "['freeze-params', 'canonicalize-linear']" in msg
    repro = msg.split("reproducer: ")[1].strip()
    assert os.path.exists(os.path.join(repro, "graph.py"))
    loaded = qcompile.load_repro(repro)
    assert loaded["pass"] == "test-explode"
    assert loaded["passes_before"] == ["freeze-params", "canonicalize-linear"]
    assert sum(1 for n in loaded["graph_module"].graph.nodes if n.target is F.linear) == 2


def test_dump_dir_has_numbered_readable_files(tmp_path):
    cap = _cap(debug_dir=str(tmp_path))
    cap.run(until="canonicalize-norm")
    files = sorted(os.listdir(tmp_path / cap.ctx.name))
    assert files == ["001_freeze-params.py", "002_canonicalize-linear.py",
                     "003_canonicalize-conv.py", "004_canonicalize-attention.py",
                     "005_canonicalize-norm.py"]
    text = (tmp_path / cap.ctx.name / "002_canonicalize-linear.py").read_text()
    assert "after pass 002 canonicalize-linear" in text
    assert "torch._C._nn.linear(" in text  # F.linear's own name


def test_print_after_change_only_prints_changes(capsys):
    cap = _cap(print_after="change")
    cap.run(until="canonicalize-norm")
    out = capsys.readouterr().out
    assert "after freeze-params" in out  # it froze the weights
    assert "after canonicalize-norm" not in out  # nothing to change in an MLP


def test_print_after_all(capsys):
    cap = _cap(print_after="all")
    cap.run(until="canonicalize-norm")
    out = capsys.readouterr().out
    assert out.count("# ---- qcompile: graph") == 5


def test_timing_counters_and_provenance():
    cap = _cap()
    cap.run(until="canonicalize-norm")
    cap.run_pass("test-add-relu")
    assert all(r.seconds >= 0 for r in cap.ctx.history)
    assert cap.ctx.counters["freeze-params.frozen"] == 4
    assert cap.ctx.counters["test-add-relu.relus"] == 1
    relu = next(n for n in cap.gm.graph.nodes if n.target is torch.relu)
    assert relu.meta["qc_pass"] == "test-add-relu"
    fc = next(n for n in cap.gm.graph.nodes if n.target is F.linear)
    assert fc.meta["qc_pass"] == "capture"
    assert tuple(relu.meta["val"].shape) == (2, 16)  # metadata re-derived for new nodes


def test_pass_must_return_pass_result():
    @graph_pass("test-bad-return", requires=())
    def bad(gm, ctx):
        return gm

    cap = _cap()
    with pytest.raises(PassError, match="returned GraphModule, not PassResult"):
        cap.run_pass("test-bad-return")


def test_pass_names_are_kebab_case():
    with pytest.raises(ValueError, match="kebab-case"):
        graph_pass("Bad_Name")


def test_context_defaults():
    ctx = PassContext()
    assert ctx.options.recipe == "w8a8" and ctx.passes_run == []
