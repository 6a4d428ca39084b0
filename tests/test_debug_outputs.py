"""What options["debug_dir"] leaves behind, options["inductor"], and the CLI."""

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import FileCheck

import qcompile
from tests.helpers import TinyMLP


def test_debug_dir_has_graphs_kernels_and_report(tmp_path):
    m = TinyMLP().eval()
    cm = torch.compile(m, backend="qcompile",
                       options={"recipe": "w8a8-static", "debug_dir": str(tmp_path)})
    with torch.no_grad(), qcompile.calibrate(cm):
        cm(torch.randn(8, 16))
    (graph,) = os.listdir(tmp_path)
    files = sorted(os.listdir(tmp_path / graph))
    assert files[0] == "001_freeze-params.py" and "report.txt" in files
    assert any(f.endswith("_lower.py") for f in files)
    kernels = sorted(os.listdir(tmp_path / graph / "kernels"))
    assert len(kernels) == 2  # fc1 and fc2: one generated GEMM each
    for name in kernels:
        src = (tmp_path / graph / "kernels" / name).read_text()
        FileCheck().check("# serves:").check(f"{graph}:").check("@triton.jit").run(src)
        if "requant" in name:  # fc1's int8 output feeds fc2: an integer-only epilogue
            epilogue = src[src.index("# Epilogue, generated"):]
            FileCheck().check("acc.to(tl.int64)").check_not("float").run(epilogue)
    report = (tmp_path / graph / "report.txt").read_text()
    assert "fc1" in report and "linear_int8" in report


def test_inductor_compiles_the_float_remainder():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    x = torch.randn(8, 16)
    outs = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        cm = torch.compile(m, backend="qcompile", options={"recipe": "w8a8", "inductor": inductor})
        with torch.no_grad():
            outs[inductor] = cm(x)
        if inductor:
            (variant,) = [v for v in qcompile.report(cm).graphs]
            assert any("Inductor" in note for note in variant.notes)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qcompile.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_lists_and_tunes():
    out = _cli("recipes")
    assert out.returncode == 0 and "w8a8-static" in out.stdout and "w4a4" in out.stdout
    out = _cli("options")
    assert out.returncode == 0 and "debug_dir" in out.stdout
    out = _cli("tune", "--shapes", "64x128x96")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "64x128x96" in out.stdout


def test_report_picture_and_transform_effect(tmp_path):
    """On a LLaMA with an outlier channel, the report's before/after input statistics show
    the rotations at work, and the picture is written."""
    from tests.models.zoo import MODELS

    build, make, _ = MODELS["llama"]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0  # one outlier channel
    cm = torch.compile(model, backend="qcompile", options={"recipe": "w4a8"})
    with torch.no_grad(), qcompile.calibrate(cm):
        for seq in (8, 8):
            cm(*make(2, seq))
    rep = qcompile.report(cm)
    q = next(x for x in rep.layers if x.name.endswith("layers.0.self_attn.q_proj"))
    before, after = q.detail["input_before"], q.detail["input_after"]
    assert after["kurtosis"] < before["kurtosis"] / 3  # the outlier is spread out
    path = rep.plot(str(tmp_path / "report.png"))
    assert os.path.getsize(path) > 10_000


@pytest.mark.slow  # 12-18 s; the fast tier keeps test_inductor_compiles_the_float_remainder
def test_inductor_remainder_on_a_transformer():
    """Inductor checks the strides the quantized ops' fake implementations promise."""
    from tests.models.zoo import MODELS

    build, make, key = MODELS["bert"]
    torch.manual_seed(0)
    m = build().eval()
    cm = torch.compile(m, backend="qcompile", options={"recipe": "w8a8", "inductor": True})
    x = make(2, 8)
    with torch.no_grad():
        out, ref = getattr(cm(*x), key), getattr(m(*x), key)
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.999


@pytest.mark.slow  # 21 s; the fast tier's dynamic shapes: test_equivalence's GPT-2
def test_inductor_remainder_serves_every_shape_of_a_dynamic_graph():
    """The float remainder of a graph Dynamo traced with symbolic sizes is compiled for
    symbolic sizes: later batches and sequence lengths run the same compiled graph, with
    the same results as the uncompiled remainder (static recipe: calibrated first)."""
    from tests.models.zoo import MODELS

    build, make, key = MODELS["bert"]
    outs = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = build().eval()
        cm = torch.compile(m, backend="qcompile", dynamic=True,
                           options={"recipe": "w8a8-static", "inductor": inductor})
        with torch.no_grad(), qcompile.calibrate(cm):
            for seq in (8, 9, 10):
                cm(*make(2, seq))
        with torch.no_grad():
            outs[inductor] = [getattr(cm(*make(b, s)), key) for b, s in ((3, 11), (1, 6))]
        notes = [n for g in qcompile.report(cm).graphs for n in g.notes]
        assert any("Inductor" in n for n in notes) == inductor
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
