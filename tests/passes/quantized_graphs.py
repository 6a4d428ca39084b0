"""Two small models run once per recipe through the whole pipeline: the Before/Expected
graphs the tests of the finalize passes read (tests/passes/test_<pass>.py).

kernels="cpu" on a CPU without int8 extensions: every linear is quantized, on the portable
route (fp32-exact), whatever machine runs the tests."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qcompile.lowering import cpu_routes
from tests.helpers import walk

PLAIN_CPU = cpu_routes.CpuCapabilities(arch="x86_64", isa="DEFAULT")


class Chain(torch.nn.Module):
    """fc1, a residual add of fc2(relu(fc1)) onto fc1's output, reshaped into fc3: a float
    island (relu), an add of two int8 values, a layout op, a float output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.fc3 = torch.nn.Linear(16, 8)

    def forward(self, x):  # x [B, S, 16]
        h = self.fc1(x)
        h = h + self.fc2(h.relu())
        return self.fc3(h.reshape(-1, 16))  # [B * S, 8]


class Attention(torch.nn.Module):
    """q / k / v projections viewed into 2 heads of 8, sdpa, o projection."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.o = torch.nn.Linear(16, 16)

    def forward(self, x):  # x [B, S, 16]
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # [B, 2, S, 8]
        return self.o(a.transpose(1, 2).reshape(b, s, 16))


class SharedQKV(torch.nn.Module):
    """Attention over one projection read as q, k and v, plus the projection itself (a
    residual): the projection's int8 output is also read in float, so it keeps its own
    grid and the attention's read is rescaled (one requant_int8 for the three identical
    reads)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Linear(16, 16)

    def forward(self, x):  # x [B, S, 16]
        b, s, _ = x.shape
        h = self.p(x).view(b, s, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(h, h, h) + h  # [B, 2, S, 8]


class ConvBlock(torch.nn.Module):
    """conv1 + BN + ReLU, conv2 + BN, the residual sum with ReLU, global average pooling,
    a classifier: a ResNet block's pieces."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):  # x [B, 8, H, W]
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(y) + x)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))  # [B, 4]


MODELS = {"chain": (Chain, (2, 3, 16)), "attention": (Attention, (2, 5, 16)),
          "conv": (ConvBlock, (2, 8, 6, 6)), "shared-qkv": (SharedQKV, (2, 5, 16))}


@functools.cache
def walked(model: str, recipe: str, **options):
    """(captured after the last pass, {pass: (code before, code after)}); the example
    input is the calibration batch of static recipes; options join the recipe's.
    Read-only: the result is shared."""
    cls, shape = MODELS[model]
    torch.manual_seed(0)
    m, x = cls().eval(), torch.randn(shape)
    with cpu_routes.override_capabilities(PLAIN_CPU):
        # smooth (on by default in w8a8-static) off unless asked: these are the graphs of
        # the other passes' Before/Expected tests (tests/passes/test_smooth.py has its own)
        return walk(m, x, options={"recipe": recipe, "kernels": "cpu", "smooth": False,
                                   **options})
