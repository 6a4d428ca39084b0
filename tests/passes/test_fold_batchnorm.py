"""fold-batchnorm: Before/Expected, float64 equivalence, and batch norms that must stay."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.sites import is_conv
from qcompile.sites import layer_name as conv_name
from tests.helpers import canonical, expect
from tests.models.cnn_zoo import mobilenet_v2, randomize_batchnorm, resnet

PASSES = ("canonicalize-linear", "canonicalize-conv", "fold-batchnorm")


def folded(model, *inputs, passes=PASSES):
    """float64 model and inputs, captured, frozen, then `passes` run by name. Checks that
    the user's tensors did not change."""
    model = randomize_batchnorm(model.double().eval(), seed=7)
    inputs = [x.double() for x in inputs]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = canonical(model, *inputs, until="freeze-params")
    for name in passes:
        cap.run_pass(name)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return model, cap, inputs


def same_function(model, cap, inputs, rtol=1e-10):
    with torch.no_grad():
        ref, out = model(*inputs), cap()
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def counters(cap):
    rec = cap.ctx.history[-1]
    assert rec.name == "fold-batchnorm"
    return rec.counters


class ConvBN(nn.Module):
    def __init__(self, conv, bn=None):
        super().__init__()
        self.conv = conv
        bn_type = nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d
        self.bn = bn or bn_type(conv.out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


CONVS = {
    "plain": lambda: nn.Conv2d(6, 8, 3, bias=False),
    "bias": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "stride dilation padding": lambda: nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(2, 1),
                                                 dilation=(2, 1)),
    "grouped": lambda: nn.Conv2d(6, 12, 3, padding="same", groups=3),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
    "pointwise": lambda: nn.Conv2d(6, 16, 1),
}


@pytest.mark.parametrize("conv", CONVS)
def test_conv2d_batchnorm_folds_exactly_in_float64(conv):
    model, cap, inputs = folded(ConvBN(CONVS[conv]()), torch.randn(2, 6, 9, 9))
    assert counters(cap) == {"conv2d": 1}
    expect(cap.gm, """
        # CHECK-NOT: batch_norm
        # CHECK: = torch.conv2d(
        # CHECK-NEXT: relu = torch.nn.functional.relu(conv2d
    """)
    (conv_node,) = [n for n in cap.gm.graph.nodes if is_conv(n)]
    assert conv_name(conv_node) == "conv"
    assert conv_node.args[2].meta["qc_param_name"] == "conv.bias"  # made if there was none
    assert conv_node.meta["qc_transforms"] == ["fold-batchnorm"]
    same_function(model, cap, inputs)


def test_batchnorm_without_affine_and_float32_weights_stay_float32():
    model = ConvBN(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8, affine=False)).eval()
    randomize_batchnorm(model, seed=1)
    x = torch.randn(2, 4, 7, 7)
    cap = canonical(model, x, until="freeze-params")
    cap.run_pass("canonicalize-conv")
    cap.run_pass("fold-batchnorm")
    assert counters(cap) == {"conv2d": 1}
    (conv_node,) = [n for n in cap.gm.graph.nodes if is_conv(n)]
    assert {getattr(cap.gm, a.target).dtype for a in conv_node.args[1:3]} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(cap()[0], model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 8, 3, stride=2, padding=1),
                                  nn.Conv1d(6, 6, 5, padding="same", dilation=2, groups=6)])
def test_conv1d_batchnorm1d_folds_through_the_squeeze(conv):
    model, cap, inputs = folded(ConvBN(conv), torch.randn(3, 6, 20))
    assert counters(cap) == {"conv1d": 1}
    expect(cap.gm, """
        # CHECK-NOT: batch_norm
        # CHECK: conv2d = torch.conv2d(unsqueeze,
        # CHECK-NEXT: squeeze = conv2d.squeeze(-2)
        # CHECK-NEXT: relu = torch.nn.functional.relu(squeeze)
    """)
    same_function(model, cap, inputs)


class Spellings(nn.Module):
    """Keyword F.batch_norm, torch.batch_norm (statistics after the affine parameters), and
    BatchNorm1d after a Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc, self.bn3 = nn.Linear(8, 16), nn.BatchNorm1d(16)

    def forward(self, x):
        b1, b2 = self.bn1, self.bn2
        y = F.batch_norm(self.c1(x), b1.running_mean, b1.running_var, weight=b1.weight,
                         bias=b1.bias, training=False, eps=1e-3)
        y = torch.batch_norm(self.c2(y), b2.weight, b2.bias, b2.running_mean, b2.running_var,
                             False, 0.1, 1e-5, False)
        return self.bn3(self.fc(y.mean((2, 3))))


def test_spellings_and_linear():
    model, cap, inputs = folded(Spellings(), torch.randn(2, 4, 5, 5))
    assert counters(cap) == {"conv2d": 2, "linear": 1}
    expect(cap.gm, """
        # CHECK-NOT: batch_norm
        # CHECK: torch.conv2d(l_x_, c1_weight, c1_bias,
        # CHECK: torch._C._nn.linear(mean, fc_weight, fc_bias)
    """)
    same_function(model, cap, inputs)


class SharedConv(nn.Module):
    """One convolution read twice, each read followed by its own batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_b(self.conv(self.bn_a(self.conv(x))))


def test_a_shared_weight_gets_a_copy_per_fold():
    model, cap, inputs = folded(SharedConv(), torch.randn(2, 4, 6, 6))
    assert counters(cap) == {"conv2d": 2}
    a, b = [n for n in cap.gm.graph.nodes if is_conv(n)]
    assert a.args[1].target != b.args[1].target
    assert conv_name(a) == conv_name(b) == "conv"
    same_function(model, cap, inputs)


class NotFolded(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn1d = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x, mean):
        if self.how == "conv read twice":
            y = self.conv(x)
            return self.bn(y) + y
        if self.how == "after relu":
            return self.bn(F.relu(self.conv(x)))
        if self.how == "statistics are inputs":
            return F.batch_norm(self.conv(x), mean, self.bn.running_var)
        if self.how == "linear 3-D":  # BatchNorm1d normalizes dim 1, not the linear's output
            return self.bn1d(self.fc(x[:, :, 0]))  # [B, 4, 6] -> [B, 4, 4]
        raise AssertionError(self.how)


NOT_FOLDED = {
    "conv read twice": "read by other nodes too",
    "after relu": "not a canonical convolution or linear",
    "statistics are inputs": "its running_mean is not a constant",
    "linear 3-D": "a linear output that is not 2-D",
}


@pytest.mark.parametrize("how", NOT_FOLDED)
def test_left_alone_with_a_note(how):
    model = randomize_batchnorm(NotFolded(how).eval(), seed=0)
    x = torch.randn(2, 4, 5, 6)
    cap = canonical(model, x, torch.randn(4), until="freeze-params")
    for name in PASSES[:2]:
        cap.run_pass(name)
    code = cap.gm.code
    cap.run_pass("fold-batchnorm")
    assert not cap.ctx.history[-1].modified and counters(cap) == {}
    assert cap.gm.code == code
    (note,) = [n for n in cap.ctx.notes if n.startswith("fold-batchnorm")]
    assert NOT_FOLDED[how] in note


def test_training_mode_batchnorm_left_alone():
    """freeze-params rejects training-mode graphs; were one to reach this pass, it stays."""
    model = randomize_batchnorm(ConvBN(nn.Conv2d(4, 4, 3)).eval())
    cap = canonical(model, torch.randn(2, 4, 5, 5), until="freeze-params")
    cap.run_pass("canonicalize-conv")
    (bn,) = [n for n in cap.gm.graph.nodes if n.target is F.batch_norm]
    bn.args = (*bn.args[:5], True, *bn.args[6:])
    cap.run_pass("fold-batchnorm")
    assert not cap.ctx.history[-1].modified
    assert any("training mode" in n for n in cap.ctx.notes)


@pytest.mark.slow
@pytest.mark.parametrize("build", [
    lambda: resnet(depths=(1, 1), widths=(4, 8), block="bottleneck", num_classes=10),
    lambda: mobilenet_v2(width_mult=0.25, num_classes=10,
                         settings=((1, 16, 1, 1), (6, 24, 2, 2))),
], ids=["resnet-bottleneck", "mobilenet_v2"])
def test_every_batchnorm_of_a_cnn_folds(build):
    model = build()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model, cap, inputs = folded(model, torch.randn(2, 3, 32, 32))
    assert counters(cap) == {"conv2d": n_bn}
    expect(cap.gm, "# CHECK-NOT: batch_norm")
    same_function(model, cap, inputs)
