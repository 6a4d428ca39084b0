"""A graph cut into blocks, and one block run on its own (learn-transforms).

Blocks end after the residual add that an MLP down projection writes into (with the norm
of its own output where the model has one, as Gemma's sandwich norms): one transformer
block per segment in pre-norm (LLaMA, GPT-2, OPT, ViT) and post-norm (BERT) graphs alike,
found by the structure analysis, not by module names. What follows the last such add joins
the last block; a graph without one is one block. A segment's inputs are the values
computed before it (placeholders included) that its nodes read; its outputs, the values it
computes that later nodes (or the graph's output) read. Running a segment needs only its
inputs (constants are fetched from the graph module), so a block can be run over and over
on stored inputs, with some of its nodes computed another way (`override`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from qcompile.passes._structure import Structure

Env = dict[Node, Any]
Override = Callable[[Callable[[Node], Any]], Any]  # (value of a node) -> the node's value


@dataclass
class Segment:
    nodes: list[Node]  # in graph order, without placeholders and the output
    inputs: list[Node]  # values from before it that its nodes read (constants excluded)
    outputs: list[Node]  # values it computes that later nodes or the graph output read


def block_ends(gm: GraphModule, structure: Structure) -> list[Node]:
    """The residual add after each MLP down projection (graph order), or [] without one."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    adds = sorted({a for s in structure.streams for a in s.adds}, key=order.__getitem__)
    ends = []
    for down in sorted(structure.mlp_down, key=order.__getitem__):
        after = next((a for a in adds if order[a] > order[down]), None)
        if after is not None and after not in ends:
            ends.append(after)
    return ends


def segments(gm: GraphModule, ends: list[Node]) -> list[Segment]:
    """gm's computation cut after each node of `ends`."""
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut_after = set(ends)
    groups: list[list[Node]] = [[]]
    for n in body:
        groups[-1].append(n)
        if n in cut_after:
            groups.append([])
    groups = [g for g in groups if g]
    if len(groups) > 1 and not any(n.op == "call_function" for n in groups[-1]):
        groups[-2] += groups.pop()
    where = {n: i for i, g in enumerate(groups) for n in g}
    result = []
    for i, g in enumerate(groups):
        inside = set(g)
        inputs: list[Node] = []
        for n in g:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in g if n.op != "get_attr" and any(
            u.op == "output" or where.get(u, i) > i for u in n.users)]
        result.append(Segment(g, inputs, outputs))
    return result


def run_segment(gm: GraphModule, seg: Segment, env: Env,
                override: dict[Node, Override] | None = None) -> Env:
    """seg's outputs computed from env (which holds its inputs); a node in `override` is
    computed by its function, which gets a lookup of node values."""
    local: Env = {}
    override = override or {}

    def value(n: Node) -> Any:
        if n in local:
            return local[n]
        if n in env:
            return env[n]
        if n.op == "get_attr":
            local[n] = _attr(gm, n.target)
            return local[n]
        raise KeyError(f"segment input {n.name} has no value")

    for n in seg.nodes:
        if n in override:
            local[n] = override[n](value)
            continue
        if n.op == "get_attr":
            local[n] = _attr(gm, n.target)
            continue
        args = map_arg(n.args, value)
        kwargs = map_arg(n.kwargs, value)
        if n.op == "call_function":
            local[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            local[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            local[n] = gm.get_submodule(n.target)(*args, **kwargs)
        else:
            raise ValueError(f"cannot run node {n.name} ({n.op}) in a segment")
    return {o: local[o] for o in seg.outputs}


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def release(env: Env, later: list[Segment]) -> None:
    """Drop from env every value no later segment reads (the graph's outputs are not kept:
    a segment's targets are its own outputs)."""
    needed = {n for s in later for n in s.inputs}
    for n in [n for n in env if n not in needed]:
        del env[n]
