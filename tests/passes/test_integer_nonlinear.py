"""integer-nonlinear: GELU, LayerNorm and attention softmax as I-BERT integer ops between
int8 ops (passes/integer_nonlinear.py), on BERT and on small graphs, with the error
against float measured with and without the option."""

import math

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.config import Options
from qcompile.lowering import cpu_routes, int_ops, ops
from qcompile.pipeline import steps
from qcompile.state import state_for_model
from tests.helpers import expect, stage
from tests.models.zoo import MODELS, output
from tests.passes.quantized_graphs import PLAIN_CPU


def _compile(model, make, calib_shapes, **options):
    cm = torch.compile(model, backend="qcompile", dynamic=True,
                       options={"recipe": "w8a8-static", **options})
    with torch.no_grad(), qcompile.calibrate(cm):
        for shape in calib_shapes:
            cm(*make(*shape))
    return cm


def _artifact(cm):
    """The compiled graph with integer_nonlinear on (two compiles of one model share its
    state, and so its list of graphs)."""
    (art,) = [a for a in state_for_model(cm).artifacts
              if a.finalized and a.options.integer_nonlinear]
    return art


def _cos(ref, out):
    return F.cosine_similarity(ref.flatten(1).double(), out.flatten(1).double()).min().item()


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def test_pipeline_has_the_pass_only_when_asked_for_integer_recipes():
    def names(**kw):
        return [s.name for s in steps(Options.from_user(None, kw), "finalize")]

    on = names(recipe="w8a8-static", integer_nonlinear=True)
    assert on.index("rewrite-attention") < on.index("integer-nonlinear")
    assert on.index("integer-nonlinear") == on.index("integer-dataflow") - 1
    assert "integer-nonlinear" in names(recipe="w4a8", integer_nonlinear=True)
    assert "integer-nonlinear" not in names(recipe="w8a8-static")  # off by default
    assert "integer-nonlinear" not in names(recipe="w8a8", integer_nonlinear=True)  # float


pytest.importorskip("transformers")


def test_bert_gelu_layernorm_softmax_become_integer():
    build, make, key = MODELS["bert"]
    torch.manual_seed(0)
    model = build().eval()
    calib = [(2, 8), (2, 9), (2, 10)]
    cm_int = _compile(model, make, calib, integer_nonlinear=True)
    cm_flt = _compile(model, make, calib)
    torch.manual_seed(1)
    x = make(3, 11)  # a shape never seen in calibration
    with torch.no_grad():
        ref = output(model(*x), key)
        cos_int, cos_flt = _cos(ref, output(cm_int(*x), key)), _cos(ref, output(cm_flt(*x), key))
    print(f"\nBERT w8a8-static output cosine vs float: integer islands {cos_int:.6f}, "
          f"float islands {cos_flt:.6f}")
    assert cos_int > 0.99 and cos_int > cos_flt - 5e-3

    art = _artifact(cm_int)
    gm, counters = art.gm, art.ctx.counters
    assert counters["integer-nonlinear.gelu"] == 2
    assert counters["integer-nonlinear.layernorm"] == 3  # 2 layers x 2, minus the last
    assert counters["integer-nonlinear.residual_layernorm"] == 3  # all post-norm, fused
    assert counters["integer-nonlinear.softmax"] == 2
    assert counters["integer-nonlinear.float"] == 2  # embedding LN (float input), final LN
    fused = int_ops.LINEAR_RESIDUAL_LAYERNORM_INT8
    assert _count(gm, F.gelu) == 0 and _count(gm, ops.ATTENTION_INT8) == 0
    assert _count(gm, int_ops.GELU_INT8) == 2 and _count(gm, fused) == 3
    assert _count(gm, int_ops.ATTENTION_INT8_ISOFTMAX) == 2
    assert _count(gm, ops.ADD_INT8) == 0  # the residual adds live inside the fused op
    integer = {ops.LINEAR_INT8, int_ops.GELU_INT8, fused}
    for n in gm.graph.nodes:  # int8 straight from integer op to integer op
        if n.target is int_ops.GELU_INT8:
            assert n.args[0].target is ops.LINEAR_INT8
            # output.dense: fused with the residual LayerNorm, or (last block, whose LN
            # stays float) a quantized linear with a float output
            assert all(str(u.target).startswith("qcompile.linear") for u in n.users)
        if n.target is fused:
            assert n.args[0].meta["val"].dtype == torch.int8  # the linear's input
            assert n.args[6].meta["val"].dtype == torch.int8  # the residual
            # integer consumers; the last block's output also enters the float final LN
            assert all(u.target in integer | {ops.DEQUANTIZE} for u in n.users)
            assert any(u.target in integer for u in n.users)
            assert n.kwargs["impl"].startswith("cpu")  # bound by lower: a CPU route
    notes = "\n".join(art.ctx.notes)
    assert "embeddings_2 stays in float: its input has no int8 scale" in notes
    assert "its output is not quantized for a linear" in notes
    rep = {layer.name: layer for layer in qcompile.report(cm_int).layers}
    assert "int-gelu" in rep["encoder.layer.0.output.dense"].transforms
    assert "int-layernorm" in rep["encoder.layer.1.attention.self.query"].transforms
    assert rep["encoder.layer.0.output.dense"].kernel.startswith(
        "linear_residual_layernorm_int8:cpu")  # a CPU route
    assert any("int-softmax" in r.transforms for r in rep.values() if r.kind == "attention")


class _Block(torch.nn.Module):
    """linear -> GELU (tanh, or GPT-2's spelled-out form) -> linear -> LayerNorm -> linear,
    plus a GELU whose output leaves the model (it must stay float)."""

    def __init__(self, spelled: bool):
        super().__init__()
        self.spelled = spelled
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.norm, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        if self.spelled:
            g = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 *
                                                                          torch.pow(h, 3.0))))
        else:
            g = F.gelu(h, approximate="tanh")
        y = self.head(self.norm(self.fc2(g)))
        return y, F.gelu(self.head(x.new_ones(16)))


@pytest.mark.parametrize("spelled", [False, True])
def test_small_block(spelled):
    torch.manual_seed(0)
    model = _Block(spelled).eval()

    def make(b, s):
        return (torch.randn(b, s, 16),)

    cm = _compile(model, make, [(4, 8), (4, 9)], integer_nonlinear=True)
    x = make(3, 7)
    with torch.no_grad():
        ref, out = model(*x), cm(*x)
    assert _cos(ref[0], out[0]) > 0.99
    art = _artifact(cm)
    counters = art.ctx.counters
    assert counters["integer-nonlinear.gelu"] == 1
    assert counters["integer-nonlinear.layernorm"] == 1  # input: fc2's dequantized int8
    assert counters["integer-nonlinear.float"] == 1  # the GELU that leaves the model
    assert _count(art.gm, torch.tanh) == 0
    (ln,) = [n for n in art.gm.graph.nodes if n.target is int_ops.LAYERNORM_INT8]
    assert ln.args[0].target is ops.LINEAR_INT8  # no float round trip on either side
    assert all(str(u.target).startswith("qcompile.linear") for u in ln.users)


def test_gelu_and_layernorm_between_int8_ops_become_integer_ops():
    torch.manual_seed(0)
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap = stage(_Block(False).eval(), torch.randn(4, 8, 16), before="integer-nonlinear",
                    options={"recipe": "w8a8-static", "kernels": "cpu",
                             "integer_nonlinear": True})
        expect(cap.gm, """
            # CHECK: linear_int8_default = torch.ops.qcompile.linear_int8.default(
            # CHECK-SAME: fc1_wq,
            # CHECK-NEXT: dequantize_default = torch.ops.qcompile.dequantize.default(
            # CHECK-NEXT: g = torch._C._nn.gelu(dequantize_default, approximate = 'tanh')
            # CHECK-NEXT: quantize_default_1 = torch.ops.qcompile.quantize.default(g,
            # CHECK: linear_int8_default_1 = torch.ops.qcompile.linear_int8.default(
            # CHECK-SAME: fc2_wq,
            # CHECK-NEXT: dequantize_default_1 = torch.ops.qcompile.dequantize.default(
            # CHECK-NEXT: layer_norm = torch.nn.functional.layer_norm(dequantize_default_1, (16,),
            # CHECK-SAME: norm_weight, norm_bias, 1e-05)
            # CHECK-NEXT: quantize_default_2 = torch.ops.qcompile.quantize.default(layer_norm,
            # CHECK: gelu_1 = torch._C._nn.gelu(dequantize_default_3)
            # CHECK-NEXT: return (dequantize_default_2, gelu_1)
        """)
        cap.run(until="integer-nonlinear")
    # Expected: GELU and LayerNorm read the linears' int8 outputs and write int8 with the
    # scale the float op's output was quantized with (integer constants: I-BERT); the
    # dequantize / quantize round trips left on their outputs are integer-dataflow's. The
    # GELU whose output leaves the graph stays float.
    expect(cap.gm, """
        # CHECK: linear_int8_default = torch.ops.qcompile.linear_int8.default(
        # CHECK-SAME: fc1_wq,
        # CHECK-NEXT: = torch.ops.qcompile.gelu_int8.default(linear_int8_default,
        # CHECK-NEXT: = torch.ops.qcompile.dequantize.default(gelu_int8_default,
        # CHECK-NEXT: quantize_default_1 = torch.ops.qcompile.quantize.default(
        # CHECK: linear_int8_default_1 = torch.ops.qcompile.linear_int8.default(
        # CHECK-SAME: fc2_wq,
        # CHECK: = torch.ops.qcompile.layernorm_int8.default(linear_int8_default_1,
        # CHECK-SAME: layer_norm_int_gamma, layer_norm_int_beta,
        # CHECK-NEXT: = torch.ops.qcompile.dequantize.default(layernorm_int8_default,
        # CHECK-NEXT: quantize_default_2 = torch.ops.qcompile.quantize.default(
        # CHECK: gelu_1 = torch._C._nn.gelu(dequantize_default_3)
        # CHECK-NEXT: return (dequantize_default_2, gelu_1)
    """)
    expect(cap.gm, """
        # CHECK-NOT: approximate = 'tanh'
        # CHECK-NOT: layer_norm(
    """)
    assert cap.ctx.history[-1].counters == {"gelu": 1, "layernorm": 1, "residual_layernorm": 0,
                                            "softmax": 0, "float": 1}
