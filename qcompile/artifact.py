"""The compiled artifact Dynamo calls: one per captured graph.

It runs the compile phase at once, the finalize phase when quantization parameters exist,
and on every call checks (cheaply: identity and `_version` of each frozen input) that the
weights it compiled are the weights it is given. Another instance of the same module
class, or weights changed in place, are compiled afresh: never another model's or stale
weights.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch.fx import GraphModule

from qcompile.config import Options
from qcompile.fx_utils import copy_graph_module, graph_fake_mode, seed_meta_from_dynamo
from qcompile.pass_manager import PassContext, PassManager, pass_name
from qcompile.pipeline import compile_phase, finalize_phase
from qcompile.sites import attention_site
from qcompile.state import ModelState, state_for_tensors

_GRAPH_IDS = itertools.count()


class CalibrationRequiredError(RuntimeError):
    pass


class InferenceOnlyError(RuntimeError):
    pass


class CompiledArtifact:
    def __init__(self, gm: GraphModule, example_inputs: list, options: Options):
        self.options = options
        self.source_gm = gm  # as Dynamo gave it; never modified
        self.name = f"graph_{next(_GRAPH_IDS):03d}"
        self.builds = 0
        self._build(list(example_inputs))

    # -- compilation ---------------------------------------------------------------
    def _build(self, example_inputs: list) -> None:
        ctx = PassContext(self.options, fake_mode=graph_fake_mode(self.source_gm),
                          name=self.name)
        ctx.analysis["example_inputs"] = example_inputs
        gm = copy_graph_module(self.source_gm)
        seed_meta_from_dynamo(gm)
        for node in gm.graph.nodes:
            node.meta["qc_pass"] = "capture"
        passes = _until(compile_phase(self.options), self.options.stop_after)
        self.gm = PassManager(passes, ctx).run(gm)
        self.ctx = ctx
        frozen = ctx.frozen
        self._frozen = list(zip(frozen["indices"], frozen["tensors"]))
        self._versions = list(frozen["versions"])
        frozen_set = set(frozen["indices"])
        self._live = [i for i in range(frozen["num_inputs"]) if i not in frozen_set]
        self.state: ModelState = state_for_tensors(frozen["tensors"])
        ctx.state = self.state
        self.state.artifacts.add(self)
        self.builds += 1
        self.calls_calibrating = 0
        self._sample = [example_inputs[i] for i in self._live]
        self.finalized = False
        if self.options.stop_after is not None:
            self.finalized = True  # debugging: run the graph as it stands
        elif not self.options.needs_calibration or (
                self.options.fingerprint() in self.state.calibrated):
            self.finalize()

    def finalize(self) -> None:
        """Quantization parameters exist: quantize weights, rewrite, lower."""
        if self.finalized:
            return
        self.ctx.analysis["float_gm"] = copy_graph_module(self.gm)  # for per-layer SQNR
        self.ctx.analysis["sample_inputs"] = self._sample
        self.gm = PassManager(finalize_phase(self.options), self.ctx).run(self.gm)
        del self.ctx.analysis["float_gm"], self.ctx.analysis["sample_inputs"]
        self.finalized = True
        self._describe_float_layers()

    def _describe_float_layers(self) -> None:
        import torch.nn.functional as F

        recipe = self.options.recipe_obj
        left = []
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target is F.linear:
                name = node.args[1].meta.get("qc_param_name", node.args[1].target)
                rec = self.ctx.layer(name.removesuffix(".weight"), "linear")
                if not rec.quantized and not rec.reason:
                    rec.reason = (f"recipe {recipe.name!r} quantizes nothing" if not
                                  recipe.quantizes else "no quantization stage rewrote it")
                if not rec.quantized:
                    left.append(rec.name)
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                rec = self.ctx.layer(attention_site(node), "attention")
                if not rec.quantized and not rec.reason:
                    rec.reason = (f"recipe {recipe.name!r} quantizes nothing" if not
                                  recipe.quantizes else "no quantized attention rewrite ran")
        if recipe.quantizes and left:
            warnings.warn(
                f"qcompile ({self.name}): {len(left)} linear layer(s) stay in float "
                f"(e.g. {left[:3]}); qcompile.report(model) says why",
                stacklevel=2,
            )

    # -- running -----------------------------------------------------------------------
    def __call__(self, *args):
        for k, (i, tensor) in enumerate(self._frozen):
            arg = args[i]
            if arg is not tensor or arg._version != self._versions[k]:
                self._build(list(args))  # another model instance, or weights changed
                break
        if torch.is_grad_enabled():
            for i in self._live:
                arg = args[i]
                if isinstance(arg, torch.Tensor) and arg.requires_grad:
                    raise InferenceOnlyError(
                        "qcompile compiles for inference: an input requires grad. Run the "
                        "model under torch.no_grad() / torch.inference_mode(), or compile "
                        "with another backend to train."
                    )
        if not self.finalized:
            if self.state.calibrating:
                self.calls_calibrating += 1
                self.state.batches = max(self.state.batches, self.calls_calibrating)
                self._sample = [args[i] for i in self._live]  # the last batch, for SQNR
                progress = getattr(self.state, "progress", None)
                if progress is not None:
                    progress.update(self.state.batches)
            else:
                raise CalibrationRequiredError(
                    f"recipe {self.options.recipe!r} needs calibration before it can run. "
                    "Run a few representative batches first:\n"
                    "    with qcompile.calibrate(compiled_model):\n"
                    "        for batch in calibration_batches:\n"
                    "            compiled_model(batch)\n"
                    "or choose the dynamic recipe 'w8a8', which needs none."
                )
        live = [args[i] for i in self._live]
        with torch.no_grad():
            return self.gm(*live)


def _until(passes: list, stop_after: str | None) -> list:
    if stop_after is None:
        return passes
    names = [pass_name(p) for p in passes]
    if stop_after not in names:
        raise ValueError(f"stop_after={stop_after!r} is not a compile-phase pass; "
                         f"passes: {names}")
    return passes[: names.index(stop_after) + 1]
