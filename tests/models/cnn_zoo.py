"""Small CNN / ViT test models built here (no downloads), and helpers that make their
weights look trained: non-trivial batch-norm statistics and outlier channels.

Every builder takes size options (tests use tiny configs, benchmarks the defaults), a
`seed`, and returns the model in eval() mode; the same arguments give the same weights,
and the global RNG is left as it was.

    resnet()                      ResNet-18 shape (block="bottleneck", depths=(3, 4, 6, 3):
                                  ResNet-50); input [B, 3, 224, 224]
    mobilenet_v2()                MobileNetV2 shape; input [B, 3, 224, 224]
    vit()                         a small ViT; input [B, 3, image_size, image_size]
    randomize_batchnorm(model)    running stats and affine params far from (0, 1, 1, 0)
    inject_outlier_channels(model)  a few channels of some norm outputs 10-30x larger
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _seeded(build):
    """Run `build` with torch's CPU RNG seeded, restoring the caller's RNG afterwards."""
    def wrapper(*args, seed: int = 0, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(*args, **kwargs).eval()

    wrapper.__name__, wrapper.__doc__ = build.__name__, build.__doc__
    return wrapper


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout))


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 3, stride)
        self.conv2 = _conv_bn(width, cout, 3)
        self.downsample = (_conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout
                           else None)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 1)
        self.conv2 = _conv_bn(width, width, 3, stride)  # stride on the 3x3 (ResNet v1.5)
        self.conv3 = _conv_bn(width, cout, 1)
        self.downsample = (_conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout
                           else None)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(y) + shortcut)


class ResNet(nn.Module):
    def __init__(self, depths, widths, block: str, num_classes: int, stem: bool):
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"block must be one of {sorted(blocks)}, got {block!r}")
        if len(depths) != len(widths):
            raise ValueError(f"one depth per width: depths={depths}, widths={widths}")
        Block = blocks[block]
        cin = widths[0]
        if stem:  # 7x7 stride 2 + 3x3 max pool: / 4
            self.stem = nn.Sequential(nn.Conv2d(3, cin, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:  # CIFAR-style 3x3 stride 1: for tiny inputs
            self.stem = nn.Sequential(nn.Conv2d(3, cin, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        stages = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            layers = []
            for j in range(depth):
                layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * Block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # [B, 3, H, W] -> [B, num_classes]
        y = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@_seeded
def resnet(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), block: str = "basic",
           num_classes: int = 1000, stem: bool = True) -> ResNet:
    """ResNet-18 by default; block="bottleneck", depths=(3, 4, 6, 3) is ResNet-50."""
    return ResNet(tuple(depths), tuple(widths), block, num_classes, stem)


# --------------------------------------------------------------------------- MobileNetV2

# (expansion t, channels c, repeats n, first stride s), as in the paper's Table 2
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(v: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of 8, never below 90% of v (torchvision's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:  # 1x1 expansion
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   nn.ReLU6(inplace=True), *_conv_bn(hidden, cout, 1)]  # linear projection
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float, num_classes: int, settings):
        super().__init__()
        cin = _divisible(32 * width_mult)
        self.last = _divisible(1280 * max(1.0, width_mult))
        layers = [*_conv_bn(3, cin, 3, 2), nn.ReLU6(inplace=True)]
        for t, c, n, s in settings:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, self.last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.last, num_classes)

    def forward(self, x):  # [B, 3, H, W] -> [B, num_classes]
        y = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(y, 1))


@_seeded
def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000,
                 settings=MOBILENET_V2_SETTINGS) -> MobileNetV2:
    """MobileNetV2; `settings` (t, c, n, s) rows can be cut down for tiny tests."""
    return MobileNetV2(width_mult, num_classes, tuple(settings))


# --------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, S, D]
        b, s, d = x.shape

        def heads(t):  # [B, S, D] -> [B, H, S, D/H]
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)))
        return self.o_proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x):  # pre-norm
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int,
                 num_classes: int, mlp_ratio: int):
        super().__init__()
        if image_size % patch or dim % heads:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch} "
                             f"and dim {dim} of heads {heads}")
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # [B, 3, H, W] -> [B, num_classes]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, N + 1, D]
        return self.head(self.norm(self.blocks(x))[:, 0])


@_seeded
def vit(image_size: int = 32, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4,
        num_classes: int = 10, mlp_ratio: int = 4) -> ViT:
    """A ViT with a Conv2d patch embedding (kernel = stride = patch) and pre-norm blocks."""
    return ViT(image_size, patch, dim, depth, heads, num_classes, mlp_ratio)


# --------------------------------------------------------------------------- weights


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every batch norm gets running mean in [-0.5, 0.5], running var in [0.25, 4] (log-
    uniform), gamma in [0.5, 1.5] and beta in [-0.5, 0.5]: folding it is then not an
    identity. In place; returns the model."""
    g = _generator(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        c = bn.num_features
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            bn.running_var.copy_(torch.exp((torch.rand(c, generator=g) * 2 - 1) * math.log(4)))
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


@torch.no_grad()
def inject_outlier_channels(model: nn.Module, seed: int = 0, n: int = 2,
                            factor: tuple[float, float] | float = (10.0, 30.0),
                            fraction: float = 0.5) -> nn.Module:
    """A few output channels of some norms become outliers: in a random `fraction` of the
    batch norms and layer norms (at least one), `n` channels get gamma and beta scaled by
    a factor drawn from `factor` (a number or a (low, high) range). Nothing compensates:
    the point is activations with outlier channels, which random weights do not have. A
    model without norms gets the output channels of its convolutions scaled instead.
    In place; returns the model, with `model.outlier_channels` = {module name: channels}."""
    g = _generator(seed)
    low, high = (factor, factor) if isinstance(factor, (int, float)) else factor
    norms = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))]
    if not norms:
        norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not norms:
        raise ValueError("inject_outlier_channels: the model has no norm or convolution")
    count = max(1, round(fraction * len(norms)))
    chosen = sorted(torch.randperm(len(norms), generator=g)[:count].tolist())
    injected = {}
    for i in chosen:
        name, module = norms[i]
        params = [p for p in (module.weight, module.bias) if p is not None]
        if not params:
            continue
        channels = torch.randperm(params[0].shape[0], generator=g)[:n]
        scale = low + (high - low) * torch.rand(len(channels), generator=g)
        for p in params:
            p[channels] *= scale.to(p.dtype).reshape(-1, *[1] * (p.dim() - 1))
        injected[name] = sorted(channels.tolist())
    model.outlier_channels = injected
    return model
