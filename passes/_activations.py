"""Clamping activations that a requantization absorbs (a helper of insert-observers,
rewrite-conv and integer-dataflow, not a pass).

ReLU, ReLU6, hardtanh and clamp with constant bounds are clamps: clamp(x, lo, hi). A
quantizer is monotone, so quantize(clamp(x, lo, hi)) = clamp(quantize(x), quantize(lo),
quantize(hi)) exactly: the activation becomes the [qmin, qmax] bounds of the
requantization that produces its input, provided the scale is the one observed after the
activation (which also spends the int8 range on the values that survive it: a ReLU's
output at the pre-ReLU scale would waste the negative half). PT2E fuses conv-bn-relu the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Node

from qcompile.fx_utils import is_call, is_method, scalar_value


@dataclass(frozen=True)
class Clamp:
    node: Node  # the activation
    lo: float | None
    hi: float | None

    def bounds(self, scale: float, zero_point: int, qmin: int, qmax: int) -> tuple[int, int]:
        """[qmin, qmax] narrowed to quantize(lo), quantize(hi) at (scale, zero_point)."""
        if self.lo is not None:
            qmin = max(qmin, min(qmax, round(self.lo / scale) + zero_point))
        if self.hi is not None:
            qmax = min(qmax, max(qmin, round(self.hi / scale) + zero_point))
        return qmin, qmax


def _arg(node: Node, i: int, name: str, default=None):
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def clamp_of(node: Node) -> Clamp | None:
    """The node as a clamp of its first argument, or None."""
    if is_call(node, F.relu, torch.relu, torch.relu_) or is_method(node, "relu", "relu_"):
        return Clamp(node, 0.0, None)
    if is_call(node, F.relu6):
        return Clamp(node, 0.0, 6.0)
    if is_call(node, F.hardtanh, F.hardtanh_):
        lo, hi = scalar_value(_arg(node, 1, "min_val", -1.0)), scalar_value(
            _arg(node, 2, "max_val", 1.0))
        return Clamp(node, lo, hi) if lo is not None and hi is not None else None
    if is_call(node, torch.clamp, torch.clip) or is_method(node, "clamp", "clip"):
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        lo_v = scalar_value(lo) if lo is not None else None
        hi_v = scalar_value(hi) if hi is not None else None
        if (lo is not None and lo_v is None) or (hi is not None and hi_v is None):
            return None  # tensor bounds
        return Clamp(node, lo_v, hi_v)
    return None


def fused_activation(node: Node) -> Clamp | None:
    """The clamp that is the only reader of `node` (its requantization can absorb it)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    clamp = clamp_of(users[0])
    if clamp is None or clamp.node.args[0] is not node:
        return None
    return clamp
