"""Every architecture with Inductor compiling the quantized graph (kernels="auto" on CPU
does this): the quantize ops and dequantizing epilogues are written out for it
(lowering/inline.py), and the model computes what the uncompiled quantized graph does."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from tests.models.test_quantized_models import STATIC
from tests.models.zoo import MODELS, output

pytest.importorskip("transformers")

# slow tier (each case compiles twice with dynamic shapes; tests/lowering/test_inline.py
# covers the rewrite in the fast one, and tests/test_debug_outputs.py a static BERT): GPT-2,
# whose graph breaks leave a graph without tensor inputs
MATRIX = [pytest.param("gpt2", "w8a8", id="gpt2-w8a8", marks=pytest.mark.slow)]


def _run(name, recipe, inductor):
    build, make, key = MODELS[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build().eval()
    cm = torch.compile(model, backend="qcompile", dynamic=True,
                       options={"recipe": recipe, "kernels": "cpu", "inductor": inductor})
    if recipe in STATIC:
        with torch.no_grad(), qcompile.calibrate(cm):
            for seq in (8, 9, 10):
                cm(*make(2, seq))
    torch.manual_seed(1)
    with torch.no_grad():
        outs = [output(cm(*make(b, s)), key) for b, s in ((3, 11), (1, 6))]
    notes = [n for g in qcompile.report(cm).graphs for n in g.notes]
    return outs, notes


@pytest.mark.parametrize("name, recipe", MATRIX)
def test_inductor_runs_the_quantized_model_written_out(name, recipe):
    plain, _ = _run(name, recipe, inductor=False)
    fused, notes = _run(name, recipe, inductor=True)
    op = "linear_dynamic" if recipe == "w8a8" else "linear_int8_dq"
    assert any("Inductor fuses" in n and op in n for n in notes), notes
    for a, b in zip(plain, fused):
        # the integer ops are the same; Inductor's float ops (LayerNorm, softmax, GELU)
        # may differ from eager's in the last bit, and an input that lands on a rounding
        # boundary of the quantizer then moves one step
        cos = F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double())
        assert cos.min() > 0.9999, cos
