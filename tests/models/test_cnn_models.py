"""End to end on CNNs (tests/models/cnn_zoo.py): convolutions quantized under every
activation recipe, batch norm folded, integer-only dataflow through ReLU, max pooling and
residual adds for w8a8-static, and the same integers from every implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.lowering import conv_ops, ops
from qcompile.state import state_for_model
from tests.models import cnn_zoo

TINY = {
    "resnet": lambda: cnn_zoo.resnet(depths=(1, 1), widths=(16, 32), num_classes=10,
                                     stem=False),
    "resnet-bottleneck": lambda: cnn_zoo.resnet(depths=(1, 1), widths=(8, 16),
                                                block="bottleneck", num_classes=10,
                                                stem=False),
    "mobilenet_v2": lambda: cnn_zoo.mobilenet_v2(
        width_mult=0.5, num_classes=10, settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))),
    "vit": lambda: cnn_zoo.vit(image_size=16, patch=4, dim=32, depth=1, heads=2),
}
CLOSE = {"w8a8": 0.999, "w8a8-static": 0.995, "w4a8": 0.97}
STATIC = {"w8a8-static", "w4a8"}


def build(name: str, outliers: bool = False):
    model = TINY[name]()
    if name != "vit":
        cnn_zoo.randomize_batchnorm(model, 0)
    if outliers:
        cnn_zoo.inject_outlier_channels(model, 0)
    return model.eval().requires_grad_(False)


def images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def compiled(model, recipe: str, **options):
    cm = torch.compile(model, backend="qcompile", options={"recipe": recipe, **options})
    if recipe in STATIC:
        with torch.no_grad(), qcompile.calibrate(cm):
            for seed in range(4):
                cm(images(4, seed=100 + seed))
    return cm


def lowered(cm):
    """The graph that ran last (a new batch size after calibration compiles another)."""
    return [a for a in state_for_model(cm).artifacts if a.finalized][-1]


MATRIX = [pytest.param(name, recipe, id=f"{name}-{recipe}",
                       marks=() if recipe == "w8a8-static" or name == "resnet"
                       else pytest.mark.slow)
          for name in TINY for recipe in CLOSE]


@pytest.mark.parametrize("name, recipe", MATRIX)
def test_cnn_recipe(name, recipe):
    # outlier channels in the CNNs' batch norms; the ViT's LayerNorm outliers are the
    # transformer recipes' problem (per-token activations), not its patch embedding's
    model = build(name, outliers=name != "vit")
    cm = compiled(model, recipe)
    with torch.no_grad():
        x = images(3, seed=7)  # a batch size calibration never saw
        ref, out = model(x), cm(x)
    assert out.shape == ref.shape
    cos = F.cosine_similarity(ref.double(), out.double())
    # a 1-block ViT with random weights: 4-bit weights cost its 10 logits more
    close = 0.9 if (name, recipe) == ("vit", "w4a8") else CLOSE[recipe]
    assert cos.min() > close, (name, recipe, cos)
    assert not torch.equal(ref, out)  # it really is quantized
    rep = qcompile.report(cm)
    convs = [layer for layer in rep.layers if layer.kind == "conv"]
    assert convs and all(layer.quantized for layer in convs), str(rep)
    assert all(layer.sqnr_db is not None and layer.sqnr_db > 10 for layer in convs), str(rep)


def test_resnet_static_is_integer_only_between_boundaries():
    """w8a8-static on a ResNet: every BN folded, every conv an int8 op reading int8, ReLUs
    absorbed as clamps, residual sums added in integers (add_int8), max and global average
    pooling on int8, one quantize at the input, and only the classifier's accumulator
    dequantized (to the float logits)."""
    model = cnn_zoo.resnet(depths=(1, 1), widths=(16, 32), num_classes=10)  # 7x7 stem, max pool
    cnn_zoo.randomize_batchnorm(model, 0)
    model = model.eval().requires_grad_(False)
    cm = compiled(model, "w8a8-static")
    with torch.no_grad():
        cm(images(2))
    art = lowered(cm)
    nodes = list(art.gm.graph.nodes)
    count = {t: sum(n.target is t for n in nodes) for t in (
        conv_ops.CONV2D_INT8, conv_ops.CONV2D_INT8_DQ, conv_ops.MAX_POOL2D_INT8,
        conv_ops.AVG_POOL2D_INT8, ops.ADD_INT8, ops.QUANTIZE, ops.DEQUANTIZE,
        ops.LINEAR_INT8_DQ)}
    assert art.ctx.counters["fold-batchnorm.conv2d"] == 6
    assert not any(n.target in (torch.conv2d, F.batch_norm, F.relu, torch.relu,
                                F.adaptive_avg_pool2d, F.max_pool2d) for n in nodes)
    assert count[conv_ops.CONV2D_INT8] == 6 and count[conv_ops.CONV2D_INT8_DQ] == 0
    assert count[conv_ops.MAX_POOL2D_INT8] == 1  # one, read by the block and its shortcut
    assert count[conv_ops.AVG_POOL2D_INT8] == 1 and count[ops.ADD_INT8] == 2
    assert count[ops.QUANTIZE] == 1 and count[ops.DEQUANTIZE] == 0  # the image only
    assert count[ops.LINEAR_INT8_DQ] == 1  # the classifier: float logits
    clamped = 0  # ReLUs absorbed: qmin = the output zero point
    for n in nodes:
        if n.target is conv_ops.CONV2D_INT8:
            assert n.args[0].meta["val"].dtype == torch.int8
            assert art.gm.get_buffer(n.args[4].target).dtype == torch.int64  # dyadic q
            clamped += n.args[7] == n.args[6]
        if n.target is ops.ADD_INT8:
            clamped += n.args[9] == n.args[8]
    assert clamped == 5  # the stem's, each block's first conv's and each block's sum's


@pytest.mark.slow  # the Triton interpreter runs every convolution; each kernel's own
# bit-exactness against the reference is in the fast tier (tests/lowering/test_conv_kernel.py)
def test_every_implementation_gives_the_same_outputs():
    """kernels="reference", "cpu" and "triton" (the interpreter here) run the same
    integers: a tiny CNN's outputs are equal bit for bit."""
    model = build("mobilenet_v2")
    outs = []
    for kernels in ("reference", "cpu", "triton"):
        cm = compiled(model, "w8a8-static", kernels=kernels, inductor=False)
        with torch.no_grad():
            outs.append(cm(images(2, seed=9)))
        torch._dynamo.reset()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_weight_only_recipe_leaves_convolutions_float_and_says_why():
    model = build("resnet")
    cm = torch.compile(model, backend="qcompile", options={"recipe": "w4a16"})
    with torch.no_grad():
        cm(images(2))
    convs = [layer for layer in qcompile.report(cm).layers if layer.kind == "conv"]
    assert convs and not any(layer.quantized for layer in convs)
    assert all("weight-only" in layer.reason for layer in convs)


def test_cpu_plan_keeps_slow_convolutions_float_with_a_reason():
    """kernels="auto" on CPU: a layer no exact int8 convolution runs faster than float32
    (the 3-channel stem, tiny or depthwise layers without VNNI) stays float, and says why."""
    model = build("mobilenet_v2")
    cm = compiled(model, "w8a8-static", kernels="auto")
    with torch.no_grad():
        cm(images(2))
    convs = [layer for layer in qcompile.report(cm).layers if layer.kind == "conv"]
    floats = [layer for layer in convs if not layer.quantized]
    assert floats and all("faster than float32" in layer.reason for layer in floats)


class _Branchy(torch.nn.Module):
    """Inception / MobileNetV3-style pieces: two branches concatenated, hardswish and SiLU
    between convolutions, a 2x2 average pooling of the concatenation, a residual sum read
    by a hardswish, global average pooling by mean."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = torch.nn.Sequential(conv(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                        torch.nn.Hardswish())
        self.a, self.b = conv(16, 8, 1), conv(16, 8, 3, padding=1)
        self.mix = conv(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a(x), F.silu(self.b(x))], dim=1)  # [B, 16, H, W]
        y = F.avg_pool2d(y, 2)
        y = F.hardswish(self.mix(y) + y)
        return self.head(y.mean((2, 3)))


def test_concat_tables_and_pooling_stay_integer():
    """w8a8-static: concatenation requantizes each part to the sum's scale, hardswish and
    SiLU between int8 values are 256-entry tables computed with the float ops themselves,
    average pooling sums in integers; nothing between the image and the classifier runs
    in float, and the outputs match float closely."""
    torch.manual_seed(0)
    model = _Branchy().eval().requires_grad_(False)
    cnn_zoo.randomize_batchnorm(model, 0)
    cm = compiled(model, "w8a8-static")
    with torch.no_grad():
        x = images(3, seed=7)
        ref, out = model(x), cm(x)
    assert F.cosine_similarity(ref, out).min() > 0.995
    nodes = list(lowered(cm).gm.graph.nodes)
    assert sum(n.target is conv_ops.LUT_INT8 for n in nodes) == 3  # stem, SiLU, the sum's
    assert sum(n.target is conv_ops.AVG_POOL2D_INT8 for n in nodes) == 2
    assert sum(n.target is ops.ADD_INT8 for n in nodes) == 1
    assert any(n.target is torch.cat and n.meta["val"].dtype == torch.int8 for n in nodes)
    assert sum(n.target is ops.QUANTIZE for n in nodes) == 1
    assert not any(n.target in (F.hardswish, F.silu, F.avg_pool2d, torch._C._nn.avg_pool2d,
                                torch.conv2d, torch.cat) and n.meta["val"].is_floating_point()
                   for n in nodes)


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8"])
def test_save_and_load_a_quantized_cnn(tmp_path, recipe):
    """qcompile.save / load carry conv weights (kept as the GEMM's [N, K]) and activation
    scales: a fresh model loaded from the file computes the same outputs bit for bit."""
    cm = compiled(build("resnet", outliers=True), recipe)
    x = images(3, seed=7)
    with torch.no_grad():
        want = cm(x)
    path = tmp_path / "resnet.qc"
    qcompile.save(cm, path)
    torch._dynamo.reset()
    fresh = torch.compile(build("resnet", outliers=True), backend="qcompile",
                          options={"recipe": recipe})
    qcompile.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


class _SqueezeExcite(torch.nn.Module):
    """A gate multiplying two activations (squeeze-and-excitation): no integer form."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Conv2d(16, 16, 1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))  # [B, 16, 1, 1]
        return self.c2(y * g)


def test_float_between_int8_values_is_reported():
    """What stays float between two integer ops (here the gate's product) is said in the
    report's notes, with how often: nothing runs in float silently."""
    torch.manual_seed(0)
    cm = compiled(_SqueezeExcite().eval().requires_grad_(False), "w8a8-static")
    with torch.no_grad():
        cm(images(2))
    notes = [n for n in lowered(cm).ctx.notes if "float between int8 values" in n]
    assert notes == ["integer-dataflow: float between int8 values (no integer form): "
                     "sigmoid -> mul (x1)"]


def test_debug_dump_writes_the_convolution_kernels(tmp_path):
    """debug_dir: each conv op's file is the generated convolution kernel it runs (not the
    GEMM template), naming the node it serves."""
    cm = compiled(build("resnet"), "w8a8-static", debug_dir=str(tmp_path))
    with torch.no_grad():
        cm(images(2))
    files = sorted(tmp_path.glob("*/kernels/conv2d_int8_default*.py"))
    assert files
    for f in files:
        text = f.read_text()
        assert "def conv2d_int8_kernel(" in text and "def gemm_int8_kernel(" not in text
        assert "# serves:   graph_" in text and ":conv2d_int8_default" in text
