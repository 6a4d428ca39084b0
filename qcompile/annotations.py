"""Typed quantization annotations: the state passes hand each other on graph nodes.

As PT2E keeps a `QuantizationAnnotation` in `node.meta["quantization_annotation"]`, each
kind of site has one dataclass here, stored under its own key and read and written only
through `get` / `put` / `take`:

  Layer           a layer's decisions, from select-layers on (on the canonical linear,
                  then on the quantized ops that replace it; attention ops too): its
                  name, quantized or not, its quantized weight, its bias correction
  Sites           a float value calibration observes, by role: input of linears, output of
                  a linear, residual sum, attention q / k / v: the stable site names whose
                  statistics give its quantization parameters
  QParams         an int8-valued node: its real value is (q - zero_point) * scale
  PendingRequant  a requantizing op between the rewrite that makes it and compute-dyadic:
                  the real multipliers its integer (q, shift) arguments will hold
  FloatEpilogue   a requantizing linear whose output may only feed float islands: what it
                  needs to dequantize its accumulator instead (integer-dataflow)
  LayerOutput     the node whose value stands for a layer's output (measure-sqnr)
  Smoothed        a value that smooth shifted and divided per channel: (x - z) / s

Graph facts that are not quantization state stay plain provenance tags in node.meta
(passes/README.md lists them): qc_pass, qc_param_name, qc_source, qc_is_param,
qc_constant, qc_spelling, qc_site, qc_transforms, qc_online_hadamard.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
from torch.fx import Node

T = TypeVar("T")


def _key(cls: type) -> str:
    return "qc_ann_" + cls.__name__.lower()


def get(node: Any, cls: type[T]) -> T | None:
    """The node's annotation of this kind, or None (also for a non-node)."""
    return node.meta.get(_key(cls)) if isinstance(node, Node) else None


def put(node: Node, ann: Any) -> Any:
    """Set (replace) the node's annotation of ann's kind; returns ann."""
    node.meta[_key(type(ann))] = ann
    return ann


def take(node: Node, cls: type[T]) -> T | None:
    """Remove and return the node's annotation of this kind (a pass that consumes it)."""
    return node.meta.pop(_key(cls), None)


def copy(src: Node, dst: Node, *kinds: type) -> None:
    """Carry these kinds of annotation from src over to dst (a rewrite replacing src)."""
    for cls in kinds:
        ann = get(src, cls)
        if ann is not None:
            put(dst, ann)


@dataclass
class Layer:
    name: str  # the weight's parameter path minus ".weight": stable across recompiles
    quantize: bool = True
    qweight: Any = None  # numerics.weights.QuantizedWeight, from quantize-weights
    weight_bits: int | None = None  # narrower than the recipe's, where the CPU route needs it
    # a group-wise int4 weight of an integer-only recipe: its group scales are the row's
    # times an integer in 1..group_levels (numerics QuantSpec.group_levels); fewer than 16
    # where the CPU route needs 7-bit integer weights
    group_levels: int | None = None
    route: str | None = None  # the CPU int8 GEMM route (lowering/cpu_routes.py)
    # the weight transforms the quantized weight was made under (see weight_transforms)
    qweight_transforms: tuple[str, ...] = ()
    # float64 [N], from bias-correct: the quantized layer's mean output shift on the
    # calibration data, which rewrite-linear adds to the float bias (then the integer bias)
    bias_correction: torch.Tensor | None = None
    # float32 [N] in (0, 1], from learn-transforms: each weight row's learned clip ratio,
    # which quantize-weights uses in place of its own clip search
    clip: torch.Tensor | None = None


def weight_transforms(transforms: list[str]) -> tuple[str, ...]:
    """What was done to a layer's float weight before quantize-weights, as a key that is the
    same in every graph where the same was done (a saved weight is only valid under the
    same transforms): the report's transform names, without node names and without what
    quantize-weights itself adds."""
    return tuple(sorted({t.split("(")[0] if t.startswith("fold-norm(") else t
                         for t in transforms if t not in ("gptq", "loaded")}))


def selected(node: Any) -> Layer | None:
    """The Layer of a linear select-layers chose to quantize, else None."""
    layer = get(node, Layer)
    return layer if layer is not None and layer.quantize else None


@dataclass
class Sites:
    """Site names by role; each role is a field (see ROLES)."""

    input: str | None = None  # "in:<layer>": the input of the linears reading this value
    output: str | None = None  # "out:<layer>": this linear's output
    add: str | None = None  # "add:<layer>": a residual sum written by that layer
    attn_q: str | None = None  # "attn:<layer>:q": attention inputs
    attn_k: str | None = None
    attn_v: str | None = None


ROLES = tuple(f.name for f in fields(Sites))


def merge_sites(src: Node, dst: Node) -> None:
    """Give dst the roles src has and dst lacks: src is removed and dst holds the same value
    (an observer taken out of the graph, after a linear's output site was observed on one
    node and the next linear's input site on the observer reading it)."""
    theirs = get(src, Sites)
    if theirs is None:
        return
    mine = get(dst, Sites) or put(dst, Sites())
    for role in ROLES:
        if getattr(mine, role) is None:
            setattr(mine, role, getattr(theirs, role))


def site(node: Any, role: str) -> str | None:
    """The node's site name in that role, or None."""
    sites = get(node, Sites)
    return getattr(sites, role) if sites is not None else None


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int


@dataclass(frozen=True)
class PendingRequant:
    """Real multipliers, in the order the op's (q, shift) argument pairs come: one for
    linear_int8 / linear_w4a8 (float64 [N] per channel) and requant_int8, two for
    add_int8 (one per side)."""

    multipliers: tuple[Any, ...]


@dataclass(frozen=True)
class FloatEpilogue:
    x_scale: float
    w_scale: torch.Tensor  # float32 [N]
    bias: torch.Tensor | None  # float32 [N]
    w_int8: torch.Tensor | None  # int4 weights unpacked to int8 values, for the int8 GEMM
    # a fused activation the requantization clamps to (lo, hi), re-applied in float there
    clamp: tuple[float | None, float | None] | None = None


@dataclass(frozen=True)
class LayerOutput:
    name: str


@dataclass(frozen=True)
class Smoothed:
    divisor: torch.Tensor  # s [C]: the node's values are (x - shift) / s
    explicit: bool = False  # an inserted (x - shift) * (1 / s), not a producer that absorbed it
    shift: torch.Tensor | None = None  # z [C] (Outlier Suppression+), None: no shift
