"""Named graph passes and the manager that runs them.

A pass is a plain function `def p(gm: GraphModule, ctx: PassContext) -> PassResult`,
declared with `@graph_pass("kebab-name", requires=(...))`. The manager checks that every
prerequisite ran earlier (it never reorders), and around each pass it:

- tags every node the pass created with `node.meta["qc_pass"]` (provenance);
- re-derives shape/dtype metadata (`meta["val"]`) for nodes that lack it;
- runs the stage verifier when `options.verify` is on (the tests turn it on);
- prints the graph after every pass or after every change (`print_after`);
- dumps the graph after every pass to `debug_dir/NNN_<pass>.py`;
- times the pass and keeps its counters;
- on failure raises PassError naming the pass and those before it, and writes a
  reproducer (the graph before the pass, pickled, plus a readable copy).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from qcompile.config import Options
from qcompile.lowering.cache_dir import open_atomic, write_atomic

PassFn = Callable[[GraphModule, "PassContext"], "PassResult"]
_REGISTRY: dict[str, PassFn] = {}


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    counters: dict[str, int]


@dataclass
class LayerRecord:
    """What the report says about one linear / attention site."""

    name: str
    kind: str  # "linear" | "attention"
    quantized: bool = False
    reason: str = ""
    transforms: list[str] = field(default_factory=list)
    sqnr_db: float | None = None
    kernel: str | None = None
    config: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class PassContext:
    """State shared by the passes of one compilation: options, analyses, counters, report."""

    def __init__(self, options: Options | None = None, *, fake_mode=None, name: str = "graph"):
        self.options = options or Options()
        self.fake_mode = fake_mode
        self.name = name
        self.history: list[PassRecord] = []
        self.counters: Counter[str] = Counter()
        self.analysis: dict[str, Any] = {}  # results that later passes read
        self.layers: dict[str, LayerRecord] = {}
        self.notes: list[str] = []  # transforms skipped and why, and the like
        self.frozen: dict[str, Any] = {}  # set by freeze-params: which inputs were frozen
        self.state: Any = None  # the calibration / weight state shared across recompiles

    @property
    def passes_run(self) -> list[str]:
        return [r.name for r in self.history]

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def layer(self, name: str, kind: str) -> LayerRecord:
        if name not in self.layers:
            self.layers[name] = LayerRecord(name, kind)
        return self.layers[name]

    def note(self, text: str) -> None:
        self.notes.append(text)


class QuantizationAccuracyWarning(UserWarning):
    """A quantized graph whose outputs are no closer to float than zeros would be
    (measure-sqnr)."""


class PassError(RuntimeError):
    """A pass failed; the message names it, the passes before it, and the reproducer."""


class PassOrderError(RuntimeError):
    """A pipeline lists a pass before one it requires."""


def graph_pass(name: str, *, requires: tuple[str, ...] = ()) -> Callable[[PassFn], PassFn]:
    """Declare a pass: its kebab-case name and the passes that must have run before it."""
    if name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"pass names are kebab-case, got {name!r}")

    def wrap(fn: PassFn) -> PassFn:
        fn.pass_name = name  # type: ignore[attr-defined]
        fn.requires = tuple(requires)  # type: ignore[attr-defined]
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"two passes are named {name!r}")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get_pass(name: str) -> PassFn:
    _import_all_passes()

    if name not in _REGISTRY:
        raise KeyError(f"no pass named {name!r}; known passes: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


@functools.cache
def _import_all_passes() -> None:
    """Passes register themselves on import; one module per pass in qcompile.passes (a
    module whose name starts with an underscore is a helper of some passes, not a pass)."""
    import importlib
    import pkgutil

    import qcompile.passes

    for info in pkgutil.iter_modules(qcompile.passes.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"qcompile.passes.{info.name}")


def pass_name(fn: PassFn) -> str:
    return getattr(fn, "pass_name", getattr(fn, "__name__", repr(fn)))


class PassManager:
    def __init__(self, passes: list[PassFn], ctx: PassContext):
        self.passes = list(passes)
        self.ctx = ctx
        self._check_order()

    def _check_order(self) -> None:
        seen = set(self.ctx.passes_run)
        for fn in self.passes:
            missing = [r for r in getattr(fn, "requires", ()) if r not in seen]
            if missing:
                raise PassOrderError(
                    f"pass {pass_name(fn)!r} requires {missing} to run before it; "
                    f"order given: {[pass_name(p) for p in self.passes]} "
                    f"(already run: {self.ctx.passes_run})"
                )
            seen.add(pass_name(fn))

    def run(self, gm: GraphModule) -> GraphModule:
        for fn in self.passes:
            gm = self.run_one(fn, gm)
        return gm

    def run_one(self, fn: PassFn, gm: GraphModule) -> GraphModule:
        from qcompile.fx_utils import propagate_meta
        from qcompile.verify import verify_graph

        ctx, name = self.ctx, pass_name(fn)
        before = set(gm.graph.nodes)
        t0 = time.perf_counter()
        try:
            result = fn(gm, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {name!r} returned {type(result).__name__}, not PassResult")
            gm = result.graph_module
            for node in gm.graph.nodes:
                if node not in before:
                    node.meta.setdefault("qc_pass", name)
            if result.modified:
                gm.graph.lint()
                gm.recompile()
                propagate_meta(gm, ctx)
            if ctx.options.verify:
                verify_graph(gm, ctx, after=name)
        except Exception as exc:
            repro = _write_repro(gm, ctx, name)
            raise PassError(
                f"qcompile pass {name!r} failed on graph {ctx.name!r}: "
                f"{type(exc).__name__}: {exc}\n"
                f"  passes before it: {ctx.passes_run or '(none)'}\n"
                f"  reproducer: {repro}"
            ) from exc
        seconds = time.perf_counter() - t0
        for k, v in result.counters.items():
            ctx.count(f"{name}.{k}", v)
        ctx.history.append(PassRecord(name, seconds, result.modified, dict(result.counters)))
        self._debug_output(gm, name, result)
        return gm

    def _debug_output(self, gm: GraphModule, name: str, result: PassResult) -> None:
        opts = self.ctx.options
        if opts.print_after == "all" or (opts.print_after == "change" and result.modified):
            print(f"# ---- qcompile: graph {self.ctx.name!r} after {name} ----")
            print(gm.print_readable(print_output=False))
        if opts.debug_dir:
            dump_graph(gm, self.ctx, name, result)


def graph_dump_dir(ctx: PassContext) -> str:
    path = os.path.join(ctx.options.debug_dir, ctx.name)
    os.makedirs(path, exist_ok=True)
    return path


def dump_graph(gm: GraphModule, ctx: PassContext, name: str, result: PassResult) -> str:
    index = len(ctx.history)
    path = os.path.join(graph_dump_dir(ctx), f"{index:03d}_{name}.py")
    rec = ctx.history[-1]
    header = (
        f"# qcompile graph {ctx.name!r} after pass {index:03d} {name}\n"
        f"# modified: {result.modified}; {rec.seconds * 1e3:.2f} ms; "
        f"counters: {dict(result.counters)}\n"
        f"# passes so far: {ctx.passes_run}\n"
    )
    text = header + gm.print_readable(print_output=False, include_stride=False) + "\n"
    # Renamed into place: a reader (or a second process on the same debug_dir) sees a
    # whole dump, never half of one.
    write_atomic(path, text, mode=0o644)
    return path


def _write_repro(gm: GraphModule, ctx: PassContext, name: str) -> str:
    """Save the graph the failing pass received, so `qcompile.debug.load_repro` reruns it."""
    import tempfile

    root = ctx.options.debug_dir or tempfile.mkdtemp(prefix="qcompile-repro-")
    path = os.path.join(root, f"repro_{ctx.name}_{name}")
    os.makedirs(path, exist_ok=True)
    # Each file is renamed into place whole: load_repro never unpickles half a file.
    write_atomic(
        os.path.join(path, "graph.py"),
        f"# graph {ctx.name!r} as pass {name!r} received it (maybe partly rewritten)\n"
        f"# passes before it: {ctx.passes_run}\n"
        + gm.print_readable(print_output=False)
        + "\n# traceback:\n# " + traceback.format_exc().replace("\n", "\n# "),
        mode=0o644,
    )
    try:
        with open_atomic(os.path.join(path, "repro.pt"), mode=0o644) as f:
            torch.save(
                {"graph_module": gm, "pass": name, "passes_before": ctx.passes_run,
                 "options": dataclasses.asdict(ctx.options)},
                f,
            )
    except Exception as exc:  # a graph with unpicklable targets still leaves graph.py
        write_atomic(os.path.join(path, "repro.pt.failed"),
                     f"could not pickle the graph module: {exc}\n", mode=0o644)
    return path
