"""The compiled artifact Dynamo calls: one per captured graph.

Dynamo reuses one compiled graph for every instance of a module class, and the weights
arrive as inputs on every call. So the artifact keeps one compiled *variant* per set of
weights (identity of each frozen input; a few, least recently used first out), and on
every call checks cheaply (identity and `_version` of each frozen input) which variant
the given weights belong to. Another instance, or weights changed in place, get a
variant compiled afresh: never another model's or stale weights.

A variant runs the compile phase when it is built and the finalize phase once
quantization parameters exist: at once for dynamic and weight-only recipes, and for any
graph with nothing to calibrate (no activation site observed: a graph of norms and
activations after a graph break, say); at the end of `qcompile.calibrate` for the others.
Each variant belongs to its model's ModelState.

Inference only: the outputs carry no autograd history, so a call that would need
gradients (grad mode on and an input or parameter requiring grad) is refused with
InferenceOnlyError, and a graph Dynamo traced for such a call is compiled only when a
call that needs none arrives.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from qcompile.config import RECIPES, Options
from qcompile.fx_utils import copy_graph_module, graph_fake_mode, seed_meta_from_dynamo
from qcompile.pass_manager import PassContext, PassManager
from qcompile.pipeline import Step, steps
from qcompile.sites import attention_site, is_layer, layer_kind, layer_name
from qcompile.state import ModelState, state_for_tensors

_GRAPH_IDS = itertools.count()
MAX_VARIANTS = 4  # weight sets kept compiled per graph (model instances alternating)
MAX_REPLAY_BATCHES = 64  # calibration batches kept for learning and sequential GPTQ to replay
MAX_REPLAY_BYTES = 256 << 20  # and at most this much of them


class CalibrationRequiredError(RuntimeError):
    pass


class InferenceOnlyError(RuntimeError):
    """A call that would need gradients: grad mode is on and an input or a parameter of
    the graph requires grad (a model being trained, or an input to differentiate)."""


class GraphVariant:
    """One graph compiled for one set of weights."""

    def __init__(self, source_gm: GraphModule, example_inputs: list, options: Options,
                 name: str, lock: threading.RLock | None = None):
        self.options, self.name = options, name
        # building and finalizing take this lock: the variants of one graph share its fake
        # tensor mode, which is not thread-safe
        self.lock = lock or threading.RLock()
        ctx = PassContext(options, fake_mode=graph_fake_mode(source_gm), name=name)
        ctx.analysis["example_inputs"] = example_inputs
        # the model's state, found through the graph's parameters: freeze-params asks it
        # for their model-wide names
        self.state: ModelState = state_for_tensors(_module_state(source_gm, example_inputs))
        ctx.state = self.state
        self.stale = False  # set when its names clash in a merged state: compiled again
        gm = copy_graph_module(source_gm)
        for node in gm.graph.nodes:
            node.meta["qc_pass"] = "capture"
        gm = _run_steps(_until(steps(options, "compile"), options.stop_after), ctx, gm)
        self.gm = gm
        self.ctx = ctx
        frozen = ctx.frozen
        self.frozen = list(zip(frozen["indices"], frozen["tensors"]))
        self.versions = list(frozen["versions"])
        self.scalars = list(frozen.get("scalars", ()))
        frozen_set = set(frozen["indices"]) | {i for i, _ in self.scalars}
        self.live = [i for i in range(frozen["num_inputs"]) if i not in frozen_set]
        self.state = ctx.state  # (a merge while compiling may have replaced it)
        self.state.artifacts.add(self)
        self.calls_calibrating = 0
        self.run_graph = None  # Inductor's compiled graph, when options["inductor"]
        self.sample = [_concrete(example_inputs[i]) for i in self.live]
        # batches are kept per set of parameters: the variants of one frame (static,
        # dynamic) share it; another frame whose inputs have the same names does not
        self.replay = Replay(source_gm, self.live, frozenset(frozen.get("names", ())))
        # the activation sites this graph needs calibration statistics for
        self.sites = _observed_sites(gm)
        self.finalized = False
        if options.stop_after is not None:
            self.finalized = True  # debugging: run the graph as it stands
        elif (not options.needs_calibration or not self.sites
              or options.fingerprint() in self.state.calibrated):
            self.finalize()
        elif not self.frozen:
            self._finalize_without_owner()

    def matches(self, args) -> bool:
        return not self.stale and all(args[i] is t and t._version == v
                   for (i, t), v in zip(self.frozen, self.versions)) and all(
            float(args[i]) == value for i, value in self.scalars)

    def replayable(self) -> int:
        """How many kept calibration batches this graph can replay (0 where it replays
        none)."""
        if not self.options.replays_calibration:
            return 0
        return len(self.replay.batches(self.state.calib_batches))

    def finalize(self) -> None:
        """Quantization parameters exist: quantize weights, rewrite, lower. Once, by the
        first thread that asks (calibrate's end, a call after it); the others wait."""
        with self.lock:
            self._finalize()

    def _finalize(self) -> None:
        if self.finalized:
            return
        # the float graph per-layer SQNR compares with: this one, or where smoothing ran the
        # one after it (pipeline.py's snapshot), whose layers' outputs it rescaled
        self.ctx.analysis["float_gm"] = copy_graph_module(self.gm)
        self.ctx.analysis["sample_inputs"] = self.sample
        if self.options.replays_calibration:
            self.ctx.analysis["calib_inputs"] = self.replay.batches(self.state.calib_batches)
        self.gm = _run_steps(steps(self.options, "finalize"), self.ctx, self.gm)
        for key in ["float_gm", "sample_inputs", "calib_inputs"] + [
                s.snapshot for s in steps(self.options) if s.snapshot]:
            self.ctx.analysis.pop(key, None)
        try:
            self._describe_float_layers()
            if self._wants_inductor():
                self._compile_float_remainder()
            if self.options.debug_dir:
                from qcompile.pass_manager import graph_dump_dir
                from qcompile.report import graph_report

                with open(os.path.join(graph_dump_dir(self.ctx), "report.txt"), "w") as f:
                    f.write(graph_report(self).to_text() + "\n")
        finally:
            self.finalized = True  # last: a thread that reads it runs the finished graph

    def _finalize_without_owner(self) -> None:
        """A graph with no parameters of its own (it begins after a graph break) that
        would quantize activations: Dynamo shares it between every model whose code reaches
        it, so its statistics could belong to no one model. It runs without them: the
        layers that need them stay in float, and say so."""
        self.ctx.note(f"{self.name} has no parameters of its own (it begins after a graph "
                      "break), so calibration statistics cannot be tied to one model: "
                      f"{', '.join(self.sites)} stay in float")
        warnings.warn(
            f"qcompile ({self.name}): this graph has no parameters of its own (it begins "
            "after a graph break), so its activations cannot be calibrated for one model: "
            f"{len(self.sites)} site(s) stay in float (e.g. {self.sites[:3]}). Moving the "
            "graph break out of the layer keeps them quantized",
            stacklevel=3,
        )
        self.finalize()

    def _wants_inductor(self) -> bool:
        if self.options.inductor is not None:
            return self.options.inductor
        # auto: the fastest configuration of a CPU graph that runs quantized layers
        on_cpu = all(t.device.type == "cpu" for _, t in self.frozen)
        return (self.options.kernels == "auto" and on_cpu and any(
            layer.quantized for layer in self.ctx.layers.values()))

    def _compile_float_remainder(self) -> None:
        """options["inductor"]: Inductor compiles the graph around the quantized ops, which
        it calls as opaque custom ops (their fake implementations give it the shapes). A
        graph Dynamo traced with symbolic sizes is compiled for symbolic sizes too (from the
        placeholders' fake values), so one compiled graph serves every batch and sequence
        length."""
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._inductor.compile_fx import compile_fx

        from qcompile.lowering.inline import inline_for_inductor

        fake = [n.meta["val"] for n in self.gm.graph.nodes if n.op == "placeholder"]
        # our graph, not Dynamo's: without Dynamo's metadata (which AOTAutograd would
        # read as a promise about parameters it no longer holds); a copy, in which the
        # quantize ops and float epilogues are written out for Inductor to fuse
        graph_module = copy_graph_module(self.gm)
        graph_module.meta = {}
        inlined = inline_for_inductor(graph_module)
        patches = inlined.config_patches  # how Inductor should compile what was written out
        for attempt in range(2):
            try:
                # (a graph without tensor inputs has no fake mode: Inductor makes its own)
                with self.ctx.fake_mode or contextlib.nullcontext():
                    self.run_graph = compile_fx(graph_module, fake, config_patches=patches)
                break
            except TensorifyScalarRestartAnalysis:
                # AOTAutograd asks for what Dynamo does on this signal: trace again, with
                # the float scalars it just marked specialized (the retry reads the marks)
                if attempt:
                    raise
        self.ctx.note("the float remainder of the graph runs compiled by Inductor")
        if inlined.calls:
            calls = ", ".join(f"{n} {name}" for name, n in sorted(inlined.calls.items()))
            self.ctx.note(f"Inductor fuses {calls} call(s) with the ops around them (each "
                          "GEMM stays one call of its CPU route)")
        if inlined.rational_gelus:
            self.ctx.note(f"{inlined.rational_gelus} exact GELU(s) compute erf with a rational "
                          "approximation (max abs error 4.3e-7; lowering/inline.py)")

    def _describe_float_layers(self) -> None:
        recipe = self.options.recipe_obj
        left = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if is_layer(node):
                rec = self.ctx.layer(layer_name(node), layer_kind(node))
                if not rec.quantized and not rec.reason:
                    rec.reason = "no quantization stage rewrote it"
                left.append(rec.name)
            elif node.target is F.scaled_dot_product_attention:
                rec = self.ctx.layer(attention_site(node), "attention")
                if not rec.quantized and not rec.reason:
                    rec.reason = (f"recipe {recipe.name!r} quantizes nothing" if not
                                  recipe.quantizes else "no quantized attention rewrite ran")
            elif recipe.quantizes and getattr(node.target, "__name__", "") in _UNSUPPORTED:
                kind = _UNSUPPORTED[node.target.__name__]
                rec = self.ctx.layer(f"{kind}:{node.name}", kind.split()[-1])
                rec.reason = (f"{kind} is not quantized: qcompile rewrites linear, attention "
                              "and 1-D / 2-D convolutions with constant weights")
                left.append(rec.name)
        if recipe.quantizes and left:
            warnings.warn(
                f"qcompile ({self.name}): {len(left)} layer(s) stay in float "
                f"(e.g. {left[:3]}); qcompile.report(model) says why",
                stacklevel=4,  # _describe_float_layers, _finalize, finalize, its caller
            )

    def _before_unfinalized_call(self) -> None:
        """A call reaching the graph before it is finalized. While another thread holds a
        calibrate block of the model it is refused: only that thread's batches are
        observed. Once calibration has finished, it finalizes the graph (or waits for the
        thread doing so) instead of failing."""
        owner = self.state.calibrating_thread
        if owner is not None and owner != threading.get_ident():
            from qcompile.calibration import CalibrationError

            raise CalibrationError(
                f"qcompile ({self.name}): this model is being calibrated in another thread "
                f"(qcompile.calibrate entered in thread {owner}), and only that thread's "
                "calls are calibration batches: call it from other threads once the block "
                "has ended")
        if self.options.fingerprint() in self.state.calibrated:
            self.finalize()

    def run(self, args):
        if self.state.calibrating:
            # finalized graphs count too: the block tells "no batch ran" apart from
            # "the batches ran, but through graphs with nothing left to calibrate"
            self.calls_calibrating += 1
        if not self.finalized:
            self._before_unfinalized_call()
        if not self.finalized:
            if not self.state.calibrating:
                raise CalibrationRequiredError(
                    f"qcompile ({self.name}): {_needs_what(self.options)}, and this graph "
                    f"was not calibrated: {len(self.sites)} activation site(s) need "
                    f"statistics (e.g. {self.sites[:3]}). Run a few representative batches "
                    "first:\n"
                    "    with qcompile.calibrate(compiled_model):\n"
                    "        for batch in calibration_batches:\n"
                    "            compiled_model(batch)\n"
                    f"or {_without_calibration(self.options)}."
                )
            self.state.batches = max(self.state.batches, self.calls_calibrating)
            live = [args[i] for i in self.live]
            if not any(isinstance(a, torch.Tensor) and not a.numel() for a in live):
                self.sample = live  # the last batch with rows, for SQNR
                if self.options.replays_calibration:
                    self.replay.keep(self.state.calib_batches, live)
            progress = getattr(self.state, "progress", None)
            if progress is not None:
                progress.update(self.state.batches)
        with torch.no_grad():
            graph = self.run_graph if self.run_graph is not None else self.gm
            return graph(*[args[i] for i in self.live])


class CompiledArtifact:
    def __init__(self, gm: GraphModule, example_inputs: list, options: Options):
        self.options = options
        self.source_gm = gm  # as Dynamo gave it; only its metadata is pinned, once
        seed_meta_from_dynamo(gm)
        self.base_name = f"graph_{next(_GRAPH_IDS):03d}"
        self.builds = 0
        self.variants: OrderedDict[tuple, GraphVariant] = OrderedDict()
        self._inputs = _input_names(gm)
        self._current: GraphVariant | None = None
        self._lock = threading.RLock()  # choosing and building variants; their finalizing
        # A graph traced for a call that needs gradients is not compiled now (that call is
        # refused): the first call that needs none builds it.
        if not (torch.is_grad_enabled() and _needing_grad(example_inputs) is not None):
            self._current = self._build(list(example_inputs))

    def _build(self, example_inputs: list) -> GraphVariant:
        name = self.base_name if not self.builds else f"{self.base_name}_v{self.builds}"
        variant = GraphVariant(self.source_gm, example_inputs, self.options, name, self._lock)
        self.builds += 1
        key = tuple(id(t) for _, t in variant.frozen)
        self.variants[key] = variant
        while len(self.variants) > MAX_VARIANTS:
            self.variants.popitem(last=False)
        return variant

    # the current variant's graph and context, for tests and debugging
    @property
    def gm(self) -> GraphModule:
        return self._variant_for_debugging().gm

    @property
    def ctx(self) -> PassContext:
        return self._variant_for_debugging().ctx

    def _variant_for_debugging(self) -> GraphVariant:
        if self._current is None:
            raise RuntimeError(f"qcompile ({self.base_name}): not compiled yet: every call so "
                               "far needed gradients (see InferenceOnlyError)")
        return self._current

    def __call__(self, *args):
        if torch.is_grad_enabled():
            self._refuse_gradients(args)
        variant = self._current
        if variant is None or not variant.matches(args):
            with self._lock:  # other threads may be choosing (and evicting) variants too
                variant = self._select(args)
        return variant.run(args)

    def _refuse_gradients(self, args) -> None:
        """Eager PyTorch would record autograd history for this call; the quantized graph
        cannot (its outputs carry none), so a training step would silently get no
        gradients. Whether the model is in train() mode is not visible here (Dynamo does
        not even recompile when it changes, unless an op reads it): the parameters that
        require grad under grad mode are what a model being trained looks like."""
        i = _needing_grad(args)
        if i is None:
            return
        kind, name = self._inputs[i] if i < len(self._inputs) else ("input", f"#{i}")
        raise InferenceOnlyError(
            f"qcompile compiles for inference, but this call would need gradients: grad "
            f"mode is on and {kind} {name!r} requires grad (a model in training, or an "
            "input to differentiate). The quantized outputs carry no autograd history, so "
            "the parameters would get no gradient. For inference, call model.eval() and "
            "run the model under torch.no_grad() or torch.inference_mode() (or freeze its "
            "weights: model.requires_grad_(False)); to train, compile with another backend."
        )

    def _select(self, args) -> GraphVariant:
        """The variant compiled for these weights, or a new one (another instance of the
        module, or weights changed in place since; or the first one, when the call Dynamo
        traced the graph for needed gradients)."""
        if self._current is None:
            self._current = self._build(list(args))
            return self._current
        key = tuple(id(args[i]) for i, _ in self._current.frozen)
        variant = self.variants.get(key)
        if variant is None or not variant.matches(args):
            if variant is not None and variant.stale:  # its replacement reports its layers
                variant.state.artifacts.discard(variant)
            variant = self._build(list(args))
        self.variants.move_to_end(key)
        self._current = variant
        return variant


def _module_state(gm: GraphModule, example_inputs: list) -> list[torch.Tensor]:
    """The parameters and buffers among a Dynamo graph's inputs (those freeze-params
    freezes)."""
    from qcompile.passes.freeze_params import is_module_state

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [x for node, x in zip(placeholders, example_inputs)
            if isinstance(x, torch.Tensor) and is_module_state(node, x)]


def _observed_sites(gm: GraphModule) -> list[str]:
    """The sites of the graph's observers (insert-observers), in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith("observe_"):
            site = gm.get_submodule(node.target).site
            if site not in sites:
                sites.append(site)
    return sites


CALIBRATED_OPTIONS = ("smooth", "gptq", "bias_correction")  # options that need data


def _needs_what(options: Options) -> str:
    """What in these options needs calibration data."""
    act = options.recipe_obj.act
    needs = [f"recipe {options.recipe!r} quantizes activations with static scales"] if (
        act is not None and not act.dynamic) else []
    needs += [f"option {name!r} needs activation statistics" for name in CALIBRATED_OPTIONS
              if options.transform_on(name)]
    return " and ".join(needs) or f"recipe {options.recipe!r} needs calibration"


def _without_calibration(options: Options) -> str:
    """The nearest configuration that needs no calibration."""
    act = options.recipe_obj.act
    off = [f"{name!r}: False" for name in CALIBRATED_OPTIONS if options.transform_on(name)]
    if act is not None and not act.dynamic:
        name = "w4a16" if options.recipe_obj.weight.bits == 4 else "w8a8"
        recipe = (f"the weight-only recipe {name!r}" if name == "w4a16"
                  else f"the dynamic recipe {name!r}")
        # what would still be on there: the user's own switches, and that recipe's defaults
        off = [f"{t!r}: False" for t in CALIBRATED_OPTIONS
               if (getattr(options, t) if getattr(options, t) is not None
                   else getattr(RECIPES[name], t))]
        return (f"choose {recipe}"
                + (f" with options {{{', '.join(off)}}}" if off else "") + ", which needs none")
    return f"turn off what needs data: options {{{', '.join(off)}}}"


def _needing_grad(args) -> int | None:
    """The index of the first tensor argument that requires grad, or None."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and arg.requires_grad:
            return i
    return None


OWNER = "<parameters>"  # a kept batch's key for the parameter names of the graph it ran


def _nbytes(batch: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values()
               if isinstance(t, torch.Tensor))


class Replay:
    """A graph's live inputs by name, to keep calibration batches in the model's state and
    give them back to any graph of the model with the same named inputs. Symbolic sizes
    (a dynamic graph's SymInt inputs) are not kept: each is read back from the dim of a
    tensor input whose size it is."""

    def __init__(self, source_gm: GraphModule, live: list[int], owner: frozenset):
        from qcompile.passes.freeze_params import source_name

        self.owner = owner  # the graph's parameter names
        placeholders = [n for n in source_gm.graph.nodes if n.op == "placeholder"]
        self.names: list[str] = []
        self.sizes: dict[int, tuple[str, int]] = {}  # live position -> (tensor input, dim)
        # tensor input -> (dtype, each dim's size: an int where the graph was specialized to
        # it, else its symbol, which must take one value across the inputs (duck sizing
        # gives equal sizes one symbol))
        self.expect: dict[str, tuple[torch.dtype, list[Any]]] = {}
        symbols: dict[Any, list[int]] = {}  # a size's symbol -> the live positions holding it
        for pos, i in enumerate(live):
            node = placeholders[i]
            self.names.append(source_name(node) or node.name)
            val = node.meta.get("val", node.meta.get("example_value"))
            if isinstance(val, torch.SymInt):
                symbols.setdefault(val.node.expr, []).append(pos)
        for pos, i in enumerate(live):
            val = placeholders[i].meta.get("val", placeholders[i].meta.get("example_value"))
            if isinstance(val, torch.Tensor):
                self.expect[self.names[pos]] = (val.dtype, [
                    s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in val.shape])
                for dim, size in enumerate(val.shape):
                    held = symbols.get(size.node.expr, []) if isinstance(
                        size, torch.SymInt) else []
                    for found in held:
                        self.sizes.setdefault(found, (self.names[pos], dim))

    def keep(self, kept: list[dict[str, Any]], live: list) -> None:
        """Add this call's tensor inputs to `kept`, within the batch and byte caps."""
        batch = {name: a.detach().clone() for name, a in zip(self.names, live, strict=True)
                 if isinstance(a, torch.Tensor)}
        batch[OWNER] = self.owner
        used = sum(_nbytes(b) for b in kept)
        size = _nbytes(batch)
        if len(kept) < MAX_REPLAY_BATCHES and used + size <= MAX_REPLAY_BYTES:
            kept.append(batch)

    def batches(self, kept: list[dict[str, Any]]) -> list[list]:
        """The kept batches this graph can run: its live inputs in order, sizes filled in."""
        out = []
        for batch in kept:
            if batch.get(OWNER) != self.owner or not self._fits(batch):
                continue
            args = []
            for pos, name in enumerate(self.names):
                if pos in self.sizes:
                    src, dim = self.sizes[pos]
                    args.append(batch[src].shape[dim] if src in batch else None)
                else:
                    args.append(batch.get(name))
            if all(a is not None for a in args):
                out.append(args)
        return out

    def _fits(self, batch: dict[str, Any]) -> bool:
        """The batch can be this graph's input: dtypes, ranks, specialized sizes, one value
        per size symbol."""
        values: dict[Any, int] = {}
        for name, (dtype, sizes) in self.expect.items():
            t = batch.get(name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != len(sizes):
                return False
            for s, d in zip(sizes, t.shape, strict=True):
                if isinstance(s, int):
                    if s != d:
                        return False
                elif values.setdefault(s, d) != d:
                    return False
        return True


def _input_names(gm: GraphModule) -> list[tuple[str, str]]:
    """(kind, name) per placeholder, for errors: ("parameter", "fc1.weight") for module
    state (by Dynamo's source, as freeze-params names it), else ("input", "x")."""
    from qcompile.passes.freeze_params import is_module_state, param_path, source_name

    names = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            example = node.meta.get("val")
            kind = "parameter" if is_module_state(node, example) else "input"
            names.append((kind, param_path(source_name(node) or node.name)))
    return names


def _concrete(x):
    """Dynamo hands symbolic sizes as SymInts among the example inputs; a real run of
    the graph (the SQNR probe) needs their example values."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return x.node.hint
    return x


_UNSUPPORTED = {"conv1d": "convolution", "conv2d": "convolution", "conv3d": "convolution",
                "conv_transpose1d": "transposed convolution",
                "conv_transpose2d": "transposed convolution", "bmm": "batched matmul",
                "baddbmm": "batched matmul", "einsum": "einsum"}


def _run_steps(run: list[Step], ctx: PassContext, gm: GraphModule) -> GraphModule:
    """The steps' passes on gm, in order, keeping a copy of the graph after each step that
    names a snapshot (pipeline.py says which, and which later pass reads it)."""
    manager = PassManager([s.fn for s in run], ctx)
    for step in run:
        gm = manager.run_one(step.fn, gm)
        if step.snapshot:
            ctx.analysis[step.snapshot] = copy_graph_module(gm)
    return gm


def _until(compile_steps: list[Step], stop_after: str | None) -> list[Step]:
    if stop_after is None:
        return compile_steps
    names = [s.name for s in compile_steps]
    if stop_after not in names:
        raise ValueError(f"stop_after={stop_after!r} is not a compile-phase pass; "
                         f"passes: {names}")
    return compile_steps[: names.index(stop_after) + 1]
