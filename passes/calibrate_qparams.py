"""calibrate-qparams: observers become quantization parameters, and leave the graph.

What: for every Observe node, the site's range observer gives a static per-tensor
(scale, zero point) for the recipe's activation bits (asymmetric, full signed range); the
per-channel ranges (smoothing), Hessians (GPTQ) and means (bias correction) are kept for
the passes that need them; a row sample (bias correction) becomes the per-channel mean
rounding error E[x - Q(x)] under the parameters just computed, and is dropped (kept on the
site where smooth measures its candidates on it; smooth-qparams drops it).
A site that saw no calibration data gets no parameters: the layers that need it stay in
float, and the report says so. Each Observe node is replaced by its input. A model given a
saved quantization (qcompile.load) takes its sites' parameters from it instead.
Pre: insert-observers, and calibration ran (ctx.state). Post: no Observe node remains;
ctx.analysis["calib"][site] holds a CalibSite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.numerics.specs import SCALE_EPS, QuantSpec, fake_quantize
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._migration import Migration
from qcompile.passes.insert_observers import observer_key

INT16_MAX = 32767


@dataclass
class CalibSite:
    scale: float | None = None
    zero_point: int | None = None
    channel_range: tuple[torch.Tensor, torch.Tensor] | None = None  # per-channel min, max
    hessian: torch.Tensor | None = None
    # how far GPTQ shrinks `hessian` toward its mean diagonal (observers.hessian_shrinkage)
    hessian_shrinkage: float = 0.0
    hessian_rows: int = 0  # the rows (tokens) `hessian` was gathered from
    seen: bool = False
    absmax: float | None = None  # max |x| seen: the symmetric 16-bit scale's range
    bits: int = 8  # the activation's width: 16 where choose-precision widened it
    mean: torch.Tensor | None = None  # float64 per-channel E[x] (bias correction)
    # float64 per-channel E[x - Q(x)] under (scale, zero_point) at `bits`, over a row sample
    act_error: torch.Tensor | None = None
    # float32 [n, K]: the row sample itself, kept (until smooth-qparams) only where smooth
    # measures candidates on it
    rows: torch.Tensor | None = None
    # what smooth chose for the linears reading this input (saved with the quantization, so
    # a loaded model needs no rows to redo the search)
    migration: Migration | None = None
    # what learn-transforms learned for them after that (saved likewise)
    learned: Migration | None = None

    @property
    def scale16(self) -> float | None:
        """The symmetric 16-bit scale, max|x| / 32767 (zero point 0); None uncalibrated."""
        if self.absmax is None:
            return None
        return max(self.absmax / INT16_MAX, SCALE_EPS)


def observed_absmax(obs, spec: QuantSpec) -> float:
    """max |x| over everything the range observer saw (its exact min and max where it keeps
    them; a clipping observer's range otherwise)."""
    lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    if lo is None or hi is None:
        lo, hi = obs.range(spec)
    return max(abs(float(lo)), abs(float(hi)))


def activation_error(rows: torch.Tensor, scale: float, zero_point: int,
                     spec: QuantSpec) -> torch.Tensor:
    """E[x - Q(x)] per channel over rows [n, K], float64 [K]: what the static quantizer
    (scale, zero point; the quantize op's arithmetic, clipping included) takes off x on
    average."""
    q = fake_quantize(rows, torch.tensor(scale), torch.tensor(zero_point), spec)
    return (rows.double() - q.double()).mean(dim=0)


def loaded_quantization(ctx: PassContext):
    """The saved quantization qcompile.load gave this model for these options, or None."""
    state = ctx.state
    return state.loaded.get(ctx.options.fingerprint()) if state is not None else None


def activation_spec(ctx: PassContext) -> QuantSpec:
    act = ctx.options.recipe_obj.act
    return QuantSpec(bits=act.bits if act is not None else 8, symmetric=False)


@graph_pass("calibrate-qparams", requires=("insert-observers",))
def calibrate_qparams(gm: GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    spec = activation_spec(ctx)
    calib: dict[str, CalibSite] = ctx.analysis.setdefault("calib", {})
    loaded = loaded_quantization(ctx)
    counters = {"sites": 0, "no_data": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.target.startswith("observe_"):
            continue
        module = gm.get_submodule(node.target)
        if loaded is not None:
            saved = loaded.sites.get(module.site)
            calib[module.site] = dataclasses.replace(saved) if saved else CalibSite()
        site = calib.setdefault(module.site, CalibSite())
        samples = None
        for kind in module.kinds if loaded is None else ():
            obs = state.observers.get(observer_key(ctx, module.site, kind)) if state else None
            if obs is None or obs.count == 0:
                continue
            site.seen = True
            if kind == "range":
                scale, zp = obs.qparams(spec)
                site.scale, site.zero_point = float(scale), int(zp)
                site.absmax = observed_absmax(obs, spec)
            elif kind == "channels":
                site.channel_range = obs.range(QuantSpec(granularity="per_channel", axis=-1))
            elif kind == "hessian":
                site.hessian, site.hessian_shrinkage = obs.hessian, obs.shrinkage
                site.hessian_rows = obs.count
            elif kind == "mean":
                site.mean = obs.mean
            elif kind == "sample":
                samples = obs.rows
        if samples is not None and site.scale is not None:
            site.act_error = activation_error(samples, site.scale, site.zero_point, spec)
        if samples is not None and ctx.options.smooth_search:
            site.rows = samples
        counters["sites"] += 1
        counters["no_data"] += not site.seen
        if not site.seen:
            ctx.note(f"site {module.site!r} saw no calibration data; its layers stay in float")
        ann.merge_sites(node, node.args[0])  # the observer's roles stay on its value
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    return PassResult(gm, modified=counters["sites"] > 0, counters=counters)
