"""canonicalize-conv: Before/Expected for each spelling, and graphs that must not change."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.sites import is_conv
from qcompile.sites import layer_name as conv_name
from qcompile.verify import GraphVerificationError, verify_graph
from tests.helpers import canonical, expect


def after(model, *inputs, passes=("canonicalize-conv",)):
    """Capture, freeze, then run `passes` by name (wherever the pipeline lists them)."""
    cap = canonical(model, *inputs, until="freeze-params")
    for name in passes:
        cap.run_pass(name)
    return cap


def same_function(model, cap, *inputs):
    """Bit-identical: conv1d through conv2d is what ATen does inside conv1d."""
    with torch.no_grad():
        ref, out = model(*inputs), cap()
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(ref, out), (ref - out).abs().max()


class Spelling(torch.nn.Module):
    def __init__(self, how, c=8, n=16, k=3, groups=1):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn(n, c // groups, k, k))  # [N, C/g, kh, kw]
        self.w_rect = torch.nn.Parameter(torch.randn(n, c, 3, 5))
        self.w1 = torch.nn.Parameter(torch.randn(n, c // groups, k))  # [N, C/g, k]
        self.b = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        how, w, b = self.how, self.w, self.b
        if how == "F.conv2d keywords":
            return F.conv2d(x, w, b, stride=2, padding=1)
        if how == "all keywords":
            return F.conv2d(input=x, weight=w, bias=b, stride=(1, 2), padding=[0, 1],
                            dilation=2, groups=1)
        if how == "defaults":
            return torch.conv2d(x, w)
        if how == "lists":
            return torch.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1)
        if how == "valid":
            return F.conv2d(x, w, b, padding="valid")
        if how == "same":
            return F.conv2d(x, w, b, padding="same")
        if how == "same dilated rect":
            return F.conv2d(x, self.w_rect, padding="same", dilation=2)
        if how == "conv1d":
            return torch.conv1d(x.flatten(2), self.w1, b, 2, 1)
        if how == "conv1d same dilated":
            return F.conv1d(x.flatten(2), self.w1, padding="same", dilation=2)
        if how == "conv1d keywords grouped":
            return F.conv1d(input=x.flatten(2), weight=self.w1, bias=b, groups=4,
                            padding="valid", stride=(3,))
        if how == "conv1d unbatched":
            return F.conv1d(x[0].flatten(1), self.w1, b, padding=1)  # [C, L]
        if how == "conv2d unbatched":
            return F.conv2d(x[0], w, b, padding=(0, 1))  # [C, H, W]
        raise AssertionError(how)


# how -> (groups, Expected conv line, counters)
SPELLINGS = {
    "F.conv2d keywords": (1, "torch.conv2d(l_x_, w, b, (2, 2), (1, 1), (1, 1), 1)",
                          {"conv2d": 1}),
    "all keywords": (1, "torch.conv2d(l_x_, w, b, (1, 2), (0, 1), (2, 2), 1)", {"conv2d": 1}),
    "defaults": (1, "torch.conv2d(l_x_, w, None, (1, 1), (0, 0), (1, 1), 1)", {"conv2d": 1}),
    "lists": (1, "torch.conv2d(l_x_, w, b, (1, 1), (1, 1), (1, 1), 1)", {"conv2d": 1}),
    "valid": (1, "torch.conv2d(l_x_, w, b, (1, 1), (0, 0), (1, 1), 1)",
              {"conv2d": 1, "padding_valid": 1}),
    "same": (1, "torch.conv2d(l_x_, w, b, (1, 1), (1, 1), (1, 1), 1)",
             {"conv2d": 1, "padding_same": 1}),
    "same dilated rect": (1, "torch.conv2d(l_x_, w_rect, None, (1, 1), (2, 4), (2, 2), 1)",
                          {"conv2d": 1, "padding_same": 1}),
    "conv1d": (1, "torch.conv2d(unsqueeze, w1_2d, b, (1, 2), (0, 1), (1, 1), 1)",
               {"conv1d": 1}),
    "conv1d same dilated": (1, "torch.conv2d(unsqueeze, w1_2d, None, (1, 1), (0, 2), (1, 2), 1)",
                            {"conv1d": 1, "padding_same": 1}),
    "conv1d keywords grouped": (4, "torch.conv2d(unsqueeze, w1_2d, b, (1, 3), (0, 0), (1, 1), 4)",
                                {"conv1d": 1, "padding_valid": 1}),
    "conv1d unbatched": (1, "torch.conv2d(unsqueeze, w1_2d, b, (1, 1), (0, 1), (1, 1), 1)",
                         {"conv1d": 1}),
    "conv2d unbatched": (1, "torch.conv2d(getitem, w, b, (1, 1), (0, 1), (1, 1), 1)",
                         {"conv2d": 1}),
}


@pytest.mark.parametrize("how", SPELLINGS)
def test_spelling_becomes_canonical_conv2d_bit_exact(how):
    groups, line, counters = SPELLINGS[how]
    model = Spelling(how, groups=groups).eval()
    x = torch.randn(2, 8, 6, 6)
    cap = after(model, x)
    rec = cap.ctx.history[-1]
    assert (rec.name, rec.modified, rec.counters) == ("canonicalize-conv", True, counters)
    expect(cap.gm, f"""
        # CHECK-NOT: torch.conv1d
        # CHECK: {line}
        # CHECK-NOT: torch.conv
    """)
    if "conv1d" in how:  # [B, C, L] -> [B, C, 1, L] -> conv2d -> [B, N, L']
        expect(cap.gm, """
            # CHECK: unsqueeze = flatten.unsqueeze(-2)
            # CHECK-NEXT: conv2d = torch.conv2d(unsqueeze,
            # CHECK-NEXT: squeeze = conv2d.squeeze(-2)
            # CHECK-NEXT: return (squeeze,)
        """)
    (conv,) = [n for n in cap.gm.graph.nodes if is_conv(n)]
    assert conv.meta["qc_spelling"] == ("conv1d" if "conv1d" in how else "conv2d")
    assert getattr(cap.gm, conv.args[1].target).dim() == 4
    same_function(model, cap, x)


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.proj = torch.nn.Conv1d(8, 8, 3, stride=2, dilation=2)
        self.reuse = torch.nn.Conv1d(8, 8, 1, bias=False)

    def forward(self, x):
        y = self.proj(self.conv(x).flatten(2))
        return self.reuse(self.reuse(y))  # one weight read by two convolutions


def test_module_convs_and_helpers():
    model = Layers().eval()
    x = torch.randn(2, 4, 5, 5)
    cap = after(model, x)
    assert cap.ctx.history[-1].counters == {"conv1d": 3}  # nn.Conv2d is canonical already
    convs = [n for n in cap.gm.graph.nodes if is_conv(n)]
    assert [conv_name(c) for c in convs] == ["conv", "proj", "reuse", "reuse"]
    assert [tuple(c.args[3:7]) for c in convs] == [
        ((1, 1), (1, 1), (1, 1), 2), ((1, 2), (0, 0), (1, 2), 1),
        ((1, 1), (0, 0), (1, 1), 1), ((1, 1), (0, 0), (1, 1), 1)]
    assert "qc_spelling" not in convs[0].meta  # untouched
    # one [N, C, 1, k] constant per conv1d weight: a view of the parameter, not a copy
    assert convs[2].args[1] is convs[3].args[1]
    w2d = getattr(cap.gm, convs[1].args[1].target)
    assert w2d.shape == (8, 8, 1, 3) and w2d.data_ptr() == model.proj.weight.data_ptr()
    assert convs[1].args[1].meta["qc_param_name"] == "proj.weight"
    assert "proj_weight" not in dict(cap.gm.named_buffers())  # the 3-D constant is gone
    same_function(model, cap, x)


def test_dynamic_shapes_stay_symbolic():
    model = Spelling("conv1d").eval()
    cap = qcompile.capture(model, torch.randn(3, 8, 6, 6), options={"recipe": "float"},
                           dynamic=True)
    cap.run(until="freeze-params")
    cap.run_pass("canonicalize-conv")  # the verifier rejects baked-in sizes
    assert cap.ctx.history[-1].counters == {"conv1d": 1}
    (conv,) = [n for n in cap.gm.graph.nodes if is_conv(n)]
    assert not isinstance(conv.meta["val"].shape[0], int)


class LeftAlone(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.t = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c3 = torch.nn.Conv3d(4, 4, 1)
        self.w = torch.nn.Parameter(torch.randn(4, 4, 4, 4))

    def forward(self, x, w):
        if self.how == "transposed":
            return self.t(x)
        if self.how == "conv3d":
            return self.c3(x.unsqueeze(2))
        if self.how == "activation weight":
            return F.conv2d(x, w, stride=1, padding=[1, 1])
        if self.how == "computed weight":
            return F.conv2d(x, self.w * 2, padding=1)
        if self.how == "same asymmetric":
            return F.conv2d(x, self.w, padding="same")  # k = 4: 3 to split over 2 sides
        raise AssertionError(self.how)


LEFT_ALONE = {
    "transposed": "transposed convolutions are not canonicalized",
    "conv3d": "conv3d is not canonicalized",
    "activation weight": "its weight is not a constant",
    "computed weight": "its weight is not a constant",
    "same asymmetric": "pads one side more than the other",
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("how", LEFT_ALONE)
def test_left_alone_with_a_note(how):
    model = LeftAlone(how).eval()
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 4, 3, 3)
    cap = canonical(model, x, w, until="freeze-params")
    code = cap.gm.code
    cap.run_pass("canonicalize-conv")
    assert not cap.ctx.history[-1].modified and cap.ctx.history[-1].counters == {}
    assert cap.gm.code == code
    (note,) = [n for n in cap.ctx.notes if n.startswith("canonicalize-conv")]
    assert LEFT_ALONE[how] in note and "kept in float" in note


def test_verifier_rejects_a_spelling_left_behind():
    cap = after(Spelling("lists").eval(), torch.randn(2, 8, 6, 6))
    (conv,) = [n for n in cap.gm.graph.nodes if is_conv(n)]
    conv.args = (*conv.args[:3], [1, 1], *conv.args[4:])  # stride as a list again
    with pytest.raises(GraphVerificationError, match="no spelling of conv1d / conv2d"):
        verify_graph(cap.gm, cap.ctx, after="canonicalize-conv")
