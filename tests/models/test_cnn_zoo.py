"""The CNN / ViT test models: each builds at a tiny config, is deterministic, runs, and
Dynamo traces it in one graph."""

import pytest
import torch
from torch import nn

from tests.models.cnn_zoo import (
    inject_outlier_channels,
    mobilenet_v2,
    randomize_batchnorm,
    resnet,
    vit,
)

TINY = {
    "resnet-basic": (lambda: resnet(depths=(1, 1), widths=(8, 16), num_classes=10, stem=False),
                     (2, 3, 16, 16)),
    "resnet-bottleneck": (lambda: resnet(depths=(1, 1), widths=(4, 8), block="bottleneck",
                                         num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: mobilenet_v2(width_mult=0.25, num_classes=10,
                                          settings=((1, 16, 1, 1), (6, 24, 2, 2))),
                     (2, 3, 32, 32)),
    "vit": (lambda: vit(image_size=16, patch=4, dim=32, depth=1, heads=2), (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_runs_and_traces_in_one_graph(name):
    build, shape = TINY[name]
    model = randomize_batchnorm(build(), seed=1)
    assert not model.training
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (2, 10) and torch.isfinite(ref).all()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, \
            explained.break_reasons
        torch._dynamo.reset()
        out = torch.compile(model, backend="eager")(x)
    torch.testing.assert_close(out, ref)


def test_builders_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = vit(seed=3), vit(seed=3)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    c = vit(seed=4)
    assert not torch.equal(a.patch_embed.weight, c.patch_embed.weight)


def test_default_shapes():
    r18 = resnet(widths=(4, 8, 16, 32))  # ResNet-18 layout at a small width
    convs = [m for m in r18.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 2 per basic block, 3 downsample shortcuts
    assert convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)
    r50 = resnet(depths=(3, 4, 6, 3), widths=(2, 4, 8, 16), block="bottleneck")
    assert r50.fc.in_features == 64
    assert sum(isinstance(m, nn.Conv2d) for m in r50.modules()) == 1 + 3 * 16 + 4
    mb = mobilenet_v2()
    depthwise = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
    assert sum(getattr(m, "residual", False) for m in mb.modules()) == 10


def test_randomize_batchnorm_and_outliers():
    model = randomize_batchnorm(resnet(depths=(1,), widths=(8,), stem=False), seed=0)
    bn = model.stem[1]
    assert (bn.running_var - 1).abs().max() > 0.3 and bn.running_mean.abs().max() > 0.1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_outlier_channels(model, seed=0, n=2, factor=20.0, fraction=1.0)
    assert len(model.outlier_channels) == 3  # every batch norm: stem, conv1, conv2
    for name, channels in model.outlier_channels.items():
        w = model.get_submodule(name).weight
        ratio = w / before[f"{name}.weight"]
        assert len(channels) == 2
        torch.testing.assert_close(ratio[channels], torch.full((2,), 20.0))
        assert torch.equal(ratio[[c for c in range(len(w)) if c not in channels]],
                           torch.ones(len(w) - 2))
    vit_model = inject_outlier_channels(vit(depth=1), seed=0, fraction=0.5)
    assert len(vit_model.outlier_channels) == 2  # half of the 3 layer norms, rounded
