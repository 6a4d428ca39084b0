"""The same compiled graph, lowered to each implementation (the exact int64 reference,
the CPU integer path, the Triton kernels — in the interpreter here, compiled on a GPU),
gives identical integers at every integer op, and identical outputs."""

import pytest
import torch
from torch.fx import Interpreter

import qcompile
from qcompile.config import DEFAULT_ACTIVATION_CLIP
from qcompile.fx_utils import get_constant
from qcompile.lowering import ops, registry
from qcompile.state import state_for_model

INTEGER_OPS = (ops.QUANTIZE, ops.LINEAR_INT8, ops.REQUANT_INT8, ops.ADD_INT8)


class IntegerChain(torch.nn.Module):
    """fc1 -> fc2 stay integer (int8 output flows on); the residual sum feeds fc3, so it is
    an int8 add; fc3's output leaves the integer region (dequantized accumulator)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 40)
        self.fc2 = torch.nn.Linear(40, 40)
        self.fc3 = torch.nn.Linear(40, 8)

    def forward(self, x):
        y = self.fc1(x)
        z = self.fc2(y.reshape(-1, 40)).reshape(y.shape)
        return self.fc3(z + y)


class _Ints(Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.ints = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.target in INTEGER_OPS:
            self.ints[n.name] = out
        return out


def _lowered(kernels):
    torch.manual_seed(0)
    model = IntegerChain().eval()
    torch._dynamo.reset()
    cm = torch.compile(model, backend="qcompile",
                       options={"recipe": "w8a8-static", "kernels": kernels})
    with torch.no_grad(), qcompile.calibrate(cm):
        for _ in range(3):
            cm(torch.randn(3, 5, 24) * 2)
    (variant,) = [v for v in state_for_model(cm).artifacts if v.finalized]
    return variant


@pytest.mark.parametrize("other", ["cpu", "triton"])
def test_implementations_agree_bit_for_bit(other):
    ref, alt = _lowered("reference"), _lowered(other)
    targets = [n.target for n in ref.gm.graph.nodes]
    for op in (ops.QUANTIZE, ops.LINEAR_INT8, ops.ADD_INT8, ops.LINEAR_INT8_DQ):
        assert op in targets, op  # the graph exercises every kind of integer op
    x = torch.randn(3, 5, 24) * 2.5  # beyond the calibrated range too: clamps must agree
    with torch.no_grad():
        a, b = _Ints(ref.gm), _Ints(alt.gm)
        out_a, out_b = a.run(x), b.run(x)
    assert a.ints.keys() == b.ints.keys() and a.ints
    for name, t in a.ints.items():
        assert t.dtype == torch.int8
        assert torch.equal(t, b.ints[name]), name
    assert torch.equal(out_a[0], out_b[0])


def _w4a4_lowered(kernels, **options):
    """IntegerChain under w4a4 (no rotations, RTN: nothing to calibrate), lowered to one
    family: every linear a linear_a4w4_dynamic (per channel unless options group it)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    cm = torch.compile(IntegerChain().eval(), backend="qcompile", options={
        "recipe": "w4a4", "kernels": kernels, "rotate": False, "online_hadamard": False,
        "gptq": False, "smooth": False, "group_size": "channel", **options})  # no calibration
    with torch.no_grad():
        cm(torch.randn(3, 5, 24))
    (variant,) = [v for v in state_for_model(cm).artifacts if v.finalized]
    return variant


class _Outputs(Interpreter):
    def __init__(self, gm, target):
        super().__init__(gm)
        self.target, self.outs = target, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.target is self.target:
            self.outs[n.name] = out
        return out


def test_w4a4_lowerings_agree_bit_for_bit(tmp_path):
    """Per-token int4 activations, int4 weights (packed for Triton, unpacked for the CPU
    routes' int8 GEMM), the float epilogue: the same floats from every family. The debug
    dump holds the packed W4A4 kernel each linear runs on CUDA."""
    runs = {}
    for kernels in ("reference", "cpu", "triton"):
        variant = _w4a4_lowered(kernels, **({"debug_dir": str(tmp_path)}
                                            if kernels == "triton" else {}))
        nodes = [n for n in variant.gm.graph.nodes if n.target is ops.LINEAR_A4W4_DYNAMIC]
        assert len(nodes) == 3 and all(n.kwargs["impl"].split("-")[0] == kernels for n in nodes)
        weight = get_constant(variant.gm, nodes[0].args[1])
        assert weight.dtype == (torch.int8 if kernels == "cpu" else torch.uint8)  # prepared
        run = _Outputs(variant.gm, ops.LINEAR_A4W4_DYNAMIC)
        with torch.no_grad():
            out = run.run(torch.linspace(-3, 3, 360).reshape(3, 5, 24))[0]
        runs[kernels] = (run.outs, out)
    dumps = sorted(tmp_path.rglob("kernels/*.py"))
    assert len(dumps) == 3 and all("def gemm_w4a4_kernel" in p.read_text() for p in dumps)
    (ref, ref_out), *others = runs.values()
    for outs, out in others:
        assert outs.keys() == ref.keys()
        assert all(torch.equal(outs[k], ref[k]) for k in ref)
        assert torch.equal(out, ref_out)


@pytest.mark.parametrize("clip", [None, 0.9, 1.0])
def test_w4a4_graph_carries_the_activation_clip(clip):
    """Every linear_a4w4_dynamic of a compiled model holds the option's clip ratio (the
    recipe's where not given), and the outputs it gives are the reference op's at that
    ratio."""
    variant = _w4a4_lowered("cpu", **({} if clip is None else {"activation_clip": clip}))
    want = DEFAULT_ACTIVATION_CLIP if clip is None else clip
    nodes = [n for n in variant.gm.graph.nodes if n.target is ops.LINEAR_A4W4_DYNAMIC]
    assert len(nodes) == 3 and [registry.arg(n, "clip") for n in nodes] == [want] * 3
    first = nodes[0]
    x = torch.linspace(-3, 3, 360).reshape(3, 5, 24)
    run = _Outputs(variant.gm, ops.LINEAR_A4W4_DYNAMIC)
    with torch.no_grad():
        run.run(x)
    w, w_scale, bias, w_sum = (get_constant(variant.gm, registry.arg(first, a))
                               if registry.arg(first, a) is not None else None
                               for a in ("w", "w_scale", "bias", "w_sum"))
    assert w_sum is not None  # the recipe's activations are asymmetric
    ref = ops.linear_a4w4_dynamic(x, w, w_scale, bias, want, w_sum, impl="reference")
    assert torch.equal(run.outs[first.name], ref)
    if want != 1.0:
        assert not torch.equal(ref, ops.linear_a4w4_dynamic(x, w, w_scale, bias, 1.0, w_sum,
                                                            impl="reference"))


def test_w4a4_symmetric_activations_carry_no_weight_sums():
    """activation_symmetric=True: QuaRot's symmetric per-token int4, no zero points, so no
    w_sum argument; the outputs are the reference op's without one."""
    variant = _w4a4_lowered("cpu", activation_symmetric=True)
    nodes = [n for n in variant.gm.graph.nodes if n.target is ops.LINEAR_A4W4_DYNAMIC]
    assert len(nodes) == 3 and all(registry.arg(n, "w_sum") is None for n in nodes)
    first = nodes[0]
    x = torch.linspace(-3, 3, 360).reshape(3, 5, 24)
    run = _Outputs(variant.gm, ops.LINEAR_A4W4_DYNAMIC)
    with torch.no_grad():
        run.run(x)
    w, w_scale, bias = (get_constant(variant.gm, a) if a is not None else None
                        for a in first.args[1:4])
    ref = ops.linear_a4w4_dynamic(x, w, w_scale, bias, DEFAULT_ACTIVATION_CLIP,
                                  impl="reference")
    assert torch.equal(run.outs[first.name], ref)


def test_implementation_is_recorded_in_the_report():
    variant = _lowered("triton")
    kernels = {layer.kernel for layer in variant.ctx.layers.values() if layer.quantized}
    assert kernels == {"linear_int8:triton", "linear_int8_dq:triton"}


@pytest.mark.parametrize("big", [False, True])
def test_dynamic_linear_cpu_path_matches_reference(big):
    """linear_dynamic on CPU (per-token quantization fused by Inductor on large inputs)
    equals the reference path bit for bit, ties and all-zero rows included."""
    torch.manual_seed(0)
    rows = 4096 if big else 24
    x = torch.randn(rows, 96) * 3
    x[0] = 0.0  # all-zero row: the scale guard
    x[1, :8] = torch.arange(8) + 0.5  # exact ties after scaling by 127/7.5
    w = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    ws, b = torch.rand(64) * 0.01, torch.randn(64)
    ref = ops.linear_dynamic(x, w, ws, b, impl="reference")
    cpu = ops.linear_dynamic(x, w, ws, b, impl="cpu")
    assert torch.equal(ref, cpu)


def test_int4_weights_run_through_the_int8_gemm_on_cpu():
    """w4a8 lowered to the CPU path: the CPU implementation's prepare hook unpacks the int4
    weights to int8 values for the int8 GEMM once, at lowering (the reference keeps them
    packed), and the integers equal the reference lowering's."""
    outs = {}
    for kernels in ("reference", "cpu"):
        torch._dynamo.reset()
        torch.manual_seed(0)  # the same weights and calibration data for both lowerings
        model = IntegerChain().eval()
        cm = torch.compile(model, backend="qcompile", options={
            "recipe": "w4a8", "kernels": kernels, "rotate": False, "online_hadamard": False})
        with torch.no_grad(), qcompile.calibrate(cm):
            cm(torch.randn(3, 5, 24))
        (variant,) = [v for v in state_for_model(cm).artifacts if v.finalized]
        w4 = [n for n in variant.gm.graph.nodes if n.target is ops.LINEAR_W4A8]
        assert w4
        for node in w4:
            weight = get_constant(variant.gm, node.args[1])
            assert weight.dtype == (torch.uint8 if kernels == "reference" else torch.int8)
            assert node.kwargs["impl"].split("-")[0] == kernels  # the family; CPU: a route
        with torch.no_grad():
            outs[kernels] = variant.gm(torch.linspace(-3, 3, 360).reshape(3, 5, 24))[0]
    assert torch.equal(outs["reference"], outs["cpu"])


@pytest.mark.parametrize("recipe", ["w4a8", "w4a4"])
def test_grouped_int4_weights_give_the_same_integers_in_every_implementation(recipe):
    """options group_size: the fc layers run linear_w4a8_grouped (w4a8) or
    linear_a4w4_grouped_dynamic (w4a4), packed int4 values with one integer multiplier per
    group of 8 columns; the CPU and Triton implementations' prepare hooks hold the int8
    values q * mult once, at lowering (the reference keeps them packed), and every lowering
    gives the reference's outputs bit for bit."""
    target = {"w4a8": ops.LINEAR_W4A8_GROUPED, "w4a4": ops.LINEAR_A4W4_GROUPED_DYNAMIC}[recipe]
    outs = {}
    for kernels in ("reference", "cpu", "triton"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = IntegerChain().eval()
        with torch.no_grad():  # groups of different ranges: multipliers that differ
            model.fc1.weight[:, :8] *= 6
            model.fc2.weight[:, 16:24] *= 6
        cm = torch.compile(model, backend="qcompile", options={
            "recipe": recipe, "kernels": kernels, "group_size": 8, "rotate": False,
            "online_hadamard": False, "gptq": False})
        with torch.no_grad(), qcompile.calibrate(cm):
            cm(torch.randn(3, 5, 24))
        (variant,) = [v for v in state_for_model(cm).artifacts if v.finalized]
        grouped = [n for n in variant.gm.graph.nodes if n.target is target]
        assert grouped
        for node in grouped:
            weight = get_constant(variant.gm, node.args[1])
            mult = get_constant(variant.gm, node.args[2])
            assert weight.dtype == (torch.uint8 if kernels == "reference" else torch.int8)
            assert mult.dtype == torch.int8 and mult.shape[1] == weight.shape[1] * (
                2 if kernels == "reference" else 1) // 8
            assert 1 <= int(mult.min()) < int(mult.max()) <= 16
            assert node.kwargs["impl"].split("-")[0] == kernels
        with torch.no_grad():
            outs[kernels] = variant.gm(torch.linspace(-3, 3, 360).reshape(3, 5, 24))[0]
    assert torch.equal(outs["reference"], outs["cpu"])
    assert torch.equal(outs["reference"], outs["triton"])
