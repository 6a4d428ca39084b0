"""choose-precision: each site's width under a budget (HAWQ-V3), for recipe "mixed".

What: every selected linear's weight may be int8 or int4 (per output channel), every
linear-input activation int8 or int16 (per tensor, static, symmetric at 16 bits), as the
budget allows (config.BUDGET_KEYS: a share of 16-bit activation sites, average weight
bits, weight bytes, bit operations). Each site's sensitivity is the output distortion of
the whole graph with that one site quantized (passes/_sensitivity.py: measured, and
HAWQ-V2's Hessian-trace estimate beside it); an integer linear program (HiGHS, through
scipy.optimize.milp) picks one width per site minimizing the summed distortion under the
budget. Bit operations couple a layer's weight and input widths: one binary variable per
(weight width, input width) pair of each layer, tied to both sites' choices, keeps the
program linear.
The choice is written where the later passes read widths: Layer.weight_bits (4) for
quantize-weights, CalibSite.bits (16) for rewrite-linear, and the model's state, so a
graph compiled later for another shape keeps the same widths. Every configuration stays
integer-only: int16 activations run as two int8 GEMMs (lowering/ops.py linear_a16w8),
int4 weights through the int8 GEMM on their values.
The report gets the plan (per site: width, sensitivities, cost), the predicted
distortion of the choice (the sum of its sites'), the distortion of the whole choice
fake-quantized, and a Pareto frontier over the budget; measure-sqnr adds the distortion
the integer graph really has.
Pre: calibrate-qparams, select-layers. Post: widths chosen; the graph is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes import _sensitivity as sens
from qcompile.passes.calibrate_qparams import loaded_quantization
from qcompile.passes.measure_sqnr import probe_inputs
from qcompile.passes.quantize_weights import preview_weight, weight_spec_for
from qcompile.sites import is_conv, is_linear

WEIGHT_WIDTHS = (8, 4)
ACT_WIDTHS = (8, 16)
FRONTIER_POINTS = 12


class BudgetError(ValueError):
    """A budget no choice of widths can meet."""


@dataclass
class PrecisionPlan:
    """What choose-precision decided for one graph, and why."""

    budget: dict[str, float]
    method: str  # the sensitivity the program minimized: "measured" or "hessian"
    bits: dict[str, int]  # site -> width
    sites: list[dict[str, Any]]  # per site: name, kind, candidates, numel, layers
    measured: dict[tuple[str, int], float] | None = None
    hessian: dict[tuple[str, int], float] | None = None
    rank_correlation: float | None = None  # Spearman, measured vs hessian
    predicted: float = 0.0  # the sum of the chosen sites' distortions
    fake_measured: float | None = None  # the whole choice, fake-quantized
    real_measured: float | None = None  # the integer graph (measure-sqnr)
    all8_measured: float | None = None  # every site at the recipe's default width
    costs: dict[str, tuple[float, float]] = field(default_factory=dict)  # key: (used, limit)
    frontier: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    rows: tuple[int, int] = (0, 0)  # output rows D counts (stable ones), of all rows

    @property
    def sensitivity(self) -> dict[tuple[str, int], float]:
        return self.measured if self.method == "measured" else self.hessian

    def to_text(self) -> str:
        lines = [f"mixed precision (budget {self.budget}; sensitivity minimized: "
                 f"{self.method}; {self.seconds:.1f} s)"]
        for key, (used, limit) in self.costs.items():
            lines.append(f"  {key}: {used:.4g} of {limit:.4g}")
        lines.append(f"  distortion D = mean over {self.rows[0]} of {self.rows[1]} output rows of "
                     f"|y - y_q|^2 / |y|^2: predicted {self.predicted:.3e}"
                     + (f", fake-quantized {self.fake_measured:.3e}"
                        if self.fake_measured is not None else "")
                     + (f", integer graph {self.real_measured:.3e}"
                        if self.real_measured is not None else "")
                     + (f" (all at the default width: {self.all8_measured:.3e})"
                        if self.all8_measured is not None else ""))
        if self.rank_correlation is not None:
            lines.append(f"  rank correlation of measured and Hessian sensitivities: "
                         f"{self.rank_correlation:.3f}")
        lines.append(f"  {'site':<52} {'width':>5}  {'D measured':>22}  {'D hessian':>22}")
        def col(table, site):
            if table is None:
                return f"{'-':>22}"
            return " ".join(f"{b}:{table[(site['name'], b)]:.2e}" for b in site["candidates"])

        for s in self.sites:
            lines.append(f"  {s['name'][:52]:<52} {self.bits[s['name']]:>5}  "
                         f"{col(self.measured, s):>22}  {col(self.hessian, s):>22}")
        return "\n".join(lines)


# ------------------------------------------------------------------ sites and candidates


def _widths(options) -> tuple[tuple[int, ...], tuple[int, ...]]:
    budget = options.budget
    w4 = any(k in budget for k in ("weight_bits", "size", "bops", "latency"))
    a16 = any(k in budget for k in ("a16", "bops", "latency"))
    return (WEIGHT_WIDTHS if w4 else WEIGHT_WIDTHS[:1]), (ACT_WIDTHS if a16 else ACT_WIDTHS[:1])


def _sites(gm: GraphModule, ctx: PassContext) -> tuple[list[sens.Site], dict]:
    """The candidate sites of the graph, and per layer its (weight site, input site, N)."""
    w_widths, a_widths = _widths(ctx.options)
    calib = ctx.analysis.get("calib", {})
    weights: dict[str, sens.Site] = {}
    acts: dict[str, dict] = {}
    layers: dict[str, tuple[str, str | None, int]] = {}
    for node in gm.graph.nodes:
        layer = ann.selected(node) if is_linear(node) else None
        if layer is None:
            continue
        w = get_constant(gm, node.args[1])
        n, k = w.shape[0], w.reshape(w.shape[0], -1).shape[1]
        wname = f"w:{layer.name}"
        if wname not in weights:
            widths = w_widths if k % 2 == 0 else w_widths[:1]  # int4 packs pairs along K
            weights[wname] = sens.Site(wname, "weight", node.args[1], widths, w.numel(),
                                       (layer.name,))
        aname = ann.site(node.args[0], "input")
        site = calib.get(aname) if aname else None
        if site is None or site.scale is None or site.scale16 is None:
            aname = None
        elif aname not in acts:
            acts[aname] = {"node": node.args[0], "layers": []}
        if aname:
            acts[aname]["layers"].append(layer.name)
        layers[layer.name] = (wname, aname, n)
    act_sites = [sens.Site(name, "act", a["node"], a_widths, 0, tuple(a["layers"]))
                 for name, a in acts.items()]
    return list(weights.values()) + act_sites, layers


def _fake_quant(gm: GraphModule, ctx: PassContext, sites: list[sens.Site]) -> sens.FakeQuant:
    calib = ctx.analysis["calib"]
    # 8, or the narrower width select-layers gave a layer for this CPU's kernel
    nodes = {layer.name: node for node in gm.graph.nodes
             if is_linear(node) and (layer := ann.selected(node)) is not None}
    selected = {name: ann.selected(node) for name, node in nodes.items()}
    weights = {}
    for s in sites:
        if s.kind != "weight":
            continue
        w = get_constant(gm, s.node).detach().float()
        shape = w.shape
        w = w.reshape(shape[0], -1)
        layer = selected.get(s.layers[0])
        default = (layer.weight_bits if layer is not None else None) or 8
        for b in s.candidates:
            bits = default if b == 8 else b
            # quantize-weights' spec: int4 in groups where options group_size says so
            spec = weight_spec_for(ctx, w.shape[1], bits,
                                   layer.group_levels if layer is not None else None)[0]
            node = nodes.get(s.layers[0])
            site = calib.get(ann.site(node.args[0], "input")) if node is not None else None
            qw = preview_weight(ctx, w, spec, site, node is None or is_conv(node))
            weights[(s.name, b)] = qw.dequantize().reshape(shape).to(w.dtype)

    def act(name: str, bits: int, x: torch.Tensor) -> torch.Tensor:
        site = calib[name]
        if bits == 16:  # rewrite-linear's quantize_int16: symmetric, zero point 0
            s = torch.tensor(site.scale16, dtype=torch.float32)
            return (torch.round(x.float() / s).clamp(-32768, 32767) * s).to(x.dtype)
        s = torch.tensor(site.scale, dtype=torch.float32)  # ops.quantize's arithmetic
        q = (torch.round(x.float() / s) + site.zero_point).clamp(-128, 127)
        return ((q - site.zero_point) * s).to(x.dtype)

    return sens.FakeQuant(weights, act)


# ------------------------------------------------------------------ the integer program


@dataclass
class _Program:
    sites: list[sens.Site]
    omega: dict[tuple[str, int], float]
    layers: dict[str, tuple[str, str | None, int]]  # layer -> (weight site, act site, N)
    act_numel: dict[str, int]  # act site -> elements of its sample value (for MACs)
    # layer -> {(weight bits, input bits): ms}, measured (budget "latency" only)
    latency: dict[str, dict[tuple[int, int], float]] | None = None
    # bits per weight an int4 weight stores beyond its 4: its group multipliers (int8, one
    # per group of options group_size), 0 per channel
    group_bits: float = 0.0

    def stored_bits(self, b: int) -> float:
        """What a weight of width b costs in the size and weight_bits budgets."""
        return b + self.group_bits if b == 4 else float(b)

    def solve(self, budget: dict[str, float], fixed: dict[str, int] | None = None
              ) -> dict[str, int]:
        from scipy.optimize import Bounds, LinearConstraint, milp

        var = [(s.name, b) for s in self.sites for b in s.candidates]
        index = {v: i for i, v in enumerate(var)}
        pairs = []
        if "bops" in budget or "latency" in budget:
            for layer, (wname, aname, _) in self.layers.items():
                for bw in self._cands(wname):
                    for ba in self._cands(aname):
                        pairs.append((layer, bw, ba))
        n = len(var) + len(pairs)
        c = np.zeros(n)
        for (name, b), i in index.items():
            c[i] = self.omega[(name, b)]
        rows, lo, hi = [], [], []

        def row(coeffs: dict[int, float], lb: float, ub: float):
            r = np.zeros(n)
            for i, v in coeffs.items():
                r[i] += v
            rows.append(r)
            lo.append(lb)
            hi.append(ub)

        for s in self.sites:  # one width per site
            row({index[(s.name, b)]: 1.0 for b in s.candidates}, 1, 1)
        for name, b in (fixed or {}).items():
            if (name, b) in index:
                row({index[(name, b)]: 1.0}, 1, 1)
        weights = [s for s in self.sites if s.kind == "weight"]
        acts = [s for s in self.sites if s.kind == "act"]
        total_w = sum(s.numel for s in weights)
        if "a16" in budget and acts:
            cap = math.floor(budget["a16"] * len(acts) + 1e-9)
            row({index[(s.name, 16)]: 1.0 for s in acts if 16 in s.candidates}, 0, cap)
        bits_row = {index[(s.name, b)]: self.stored_bits(b) * s.numel for s in weights
                    for b in s.candidates}
        if "weight_bits" in budget and weights:
            row(bits_row, 0, budget["weight_bits"] * total_w)
        if "size" in budget and weights:
            size = budget["size"]
            limit_bits = size * 8 * total_w if size <= 1 else size * 8
            row(bits_row, 0, limit_bits)
        if pairs:
            base = len(var)
            macs = {layer: self._macs(layer) for layer in self.layers}
            for layer, (wname, aname, _) in self.layers.items():
                mine = [(base + j, bw, ba) for j, (lay, bw, ba) in enumerate(pairs)
                        if lay == layer]
                for bw in self._cands(wname):  # the pair's weight width is the site's
                    coeffs = {i: 1.0 for i, w_, _ in mine if w_ == bw}
                    if (wname, bw) in index:
                        coeffs[index[(wname, bw)]] = -1.0
                    row(coeffs, 0, 0)
                for ba in self._cands(aname):  # and its input width the input's
                    coeffs = {i: 1.0 for i, _, a_ in mine if a_ == ba}
                    if aname is not None:
                        coeffs[index[(aname, ba)]] = -1.0
                    row(coeffs, 0, 0)
            if "bops" in budget:
                total = sum(64.0 * m for m in macs.values())
                row({base + j: float(macs[lay] * bw * ba)
                     for j, (lay, bw, ba) in enumerate(pairs)}, 0, budget["bops"] * total)
            if "latency" in budget:
                lat = self.latency
                total = sum(lat[layer][(8, 8)] for layer in self.layers)
                row({base + j: lat[lay][(bw, ba)] for j, (lay, bw, ba) in enumerate(pairs)},
                    0, budget["latency"] * total)
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=LinearConstraint(np.array(rows), lo, hi))
        if res.status != 0 or res.x is None:
            raise BudgetError(self._infeasible(budget))
        return {name: b for (name, b), i in index.items() if res.x[i] > 0.5}

    def _cands(self, name: str | None) -> tuple[int, ...]:
        if name is None:
            return (8,)
        return next(s.candidates for s in self.sites if s.name == name)

    def _macs(self, layer: str) -> float:
        _, aname, n = self.layers[layer]
        return float(self.act_numel.get(aname, 1) * n)

    def _infeasible(self, budget) -> str:
        weights = [s for s in self.sites if s.kind == "weight"]
        total = sum(s.numel for s in weights)
        least = sum(self.stored_bits(min(s.candidates)) * s.numel
                    for s in weights) / max(1, total)
        return (f"no choice of widths meets budget {budget}: the narrowest weights average "
                f"{least:g} bits ({least / 8:.3g} of the int8 size); int4 needs an even K, "
                f"and only linears with a calibrated input take 16-bit activations. Raise "
                f"the budget")

    def cost(self, bits: dict[str, int], budget: dict[str, float]) -> dict[str, tuple]:
        weights = [s for s in self.sites if s.kind == "weight"]
        acts = [s for s in self.sites if s.kind == "act"]
        total_w = max(1, sum(s.numel for s in weights))
        avg = sum(self.stored_bits(bits[s.name]) * s.numel for s in weights) / total_w
        out = {}
        if "a16" in budget:
            out["a16"] = (sum(bits[s.name] == 16 for s in acts) / max(1, len(acts)),
                          budget["a16"])
        if "weight_bits" in budget:
            out["weight_bits"] = (avg, budget["weight_bits"])
        if "size" in budget:
            size = budget["size"]
            out["size"] = ((avg / 8, size) if size <= 1 else
                           (sum(self.stored_bits(bits[s.name]) * s.numel
                                for s in weights) / 8, size))
        if "bops" in budget:
            total = sum(64.0 * self._macs(layer) for layer in self.layers)
            used = sum(self._macs(layer) * bits[w] * (bits[a] if a else 8)
                       for layer, (w, a, _) in self.layers.items())
            out["bops"] = (used / max(total, 1.0), budget["bops"])
        if "latency" in budget:
            lat = self.latency
            used = sum(lat[layer][(bits[w], bits[a] if a else 8)]
                       for layer, (w, a, _) in self.layers.items())
            total = sum(lat[layer][(8, 8)] for layer in self.layers)
            out["latency"] = (used / max(total, 1e-12), budget["latency"])
        return out

    def predicted(self, bits: dict[str, int]) -> float:
        return sum(self.omega[(name, b)] for name, b in bits.items())


# ------------------------------------------------------------------ the frontier


def _sweep(budget: dict[str, float], program: _Program) -> list[dict[str, float]]:
    """Budgets along the first key of a16 / weight_bits / size / bops, the others kept."""
    acts = [s for s in program.sites if s.kind == "act"]
    if "a16" in budget and acts:
        n = len(acts)
        counts = sorted({round(i * n / (FRONTIER_POINTS - 1))
                         for i in range(FRONTIER_POINTS)})
        return [budget | {"a16": c / n} for c in counts]
    if "weight_bits" in budget:
        return [budget | {"weight_bits": 4 + 4 * i / (FRONTIER_POINTS - 1)}
                for i in range(FRONTIER_POINTS)]
    if "size" in budget and budget["size"] <= 1:
        return [budget | {"size": 0.5 + 0.5 * i / (FRONTIER_POINTS - 1)}
                for i in range(FRONTIER_POINTS)]
    for key in ("bops", "latency"):
        if key in budget:
            return [budget | {key: 0.5 + 1.5 * i / (FRONTIER_POINTS - 1)}
                    for i in range(FRONTIER_POINTS)]
    return []


def _frontier(program: _Program, budget, measure) -> list[dict[str, float]]:
    points, seen = [], set()
    key = next(k for k in ("a16", "weight_bits", "size", "bops", "latency") if k in budget)
    for b in _sweep(budget, program):
        try:
            bits = program.solve(b)
        except BudgetError:
            continue
        frozen = tuple(sorted(bits.items()))
        cost = program.cost(bits, b)[key][0]
        point = {"key": key, "budget": b[key], "cost": cost,
                 "predicted": program.predicted(bits)}
        if frozen not in seen:
            point["measured"] = measure(bits)
            seen.add(frozen)
        points.append(point)
    return points


# ------------------------------------------------------------------ the pass


def _note_loaded(gm, ctx) -> PassResult:
    calib = ctx.analysis.get("calib", {})
    wide = sorted(n for n, s in calib.items() if s.bits == 16)
    ctx.note(f"mixed precision: widths from the saved quantization ({len(wide)} 16-bit "
             "activation site(s); weight widths as saved)")
    return PassResult(gm, modified=False, counters={"act16": len(wide)})


@graph_pass("choose-precision", requires=("calibrate-qparams", "select-layers"))
def choose_precision(gm: GraphModule, ctx: PassContext) -> PassResult:
    if loaded_quantization(ctx) is not None:
        return _note_loaded(gm, ctx)
    t0 = time.perf_counter()
    opts = ctx.options
    sites, layers = _sites(gm, ctx)
    inputs = ctx.analysis.get("sample_inputs")
    if not sites:
        ctx.note("mixed precision: no quantized linear in this graph, nothing to choose")
        return PassResult(gm, modified=False, counters={})
    earlier = ctx.state.precision.get(opts.fingerprint()) if ctx.state is not None else None
    if earlier is not None and {s.name for s in sites} <= set(earlier["bits"]):
        # another graph of this model (a new shape) decided every site already: the same
        # widths, the same plan (its integer-graph figure is this graph's own)
        bits = {s.name: earlier["bits"][s.name] for s in sites}
        _apply(gm, ctx, sites, layers, bits)
        ctx.analysis["precision"] = dataclasses.replace(earlier["plan"], real_measured=None)
        if inputs is not None:  # measure-sqnr's figure for this graph, on its own rows
            probe = probe_inputs(gm, inputs)
            metric = sens.Distortion(sens.run(gm, probe))
            defaults = {s.name: s.candidates[0] for s in sites}
            metric.leave_out_unstable(metric.relative(sens.run(
                gm, probe, sens.configuration(sites, defaults, _fake_quant(gm, ctx, sites)))))
            ctx.analysis["distortion"] = metric
        return PassResult(gm, modified=False, counters=_counters(sites, bits))
    if inputs is None:
        raise RuntimeError("choose-precision needs sample inputs (the last calibration batch):"
                           " run calibration batches through the compiled model first")
    fake = _fake_quant(gm, ctx, sites)
    probe = probe_inputs(gm, inputs)  # measure-sqnr's rows: its figure compares with ours
    try:
        ref = sens.run(gm, probe)
        inputs = probe
    except Exception:  # noqa: BLE001 - a graph that bakes the batch size: use it all
        if probe is inputs:
            raise
        ref = sens.run(gm, inputs)
    defaults = {s.name: s.candidates[0] for s in sites}
    metric = sens.Distortion(ref)
    baseline = metric.relative(sens.run(gm, inputs, sens.configuration(sites, defaults, fake)))
    act_numel = {}

    def record(name):
        def fn(v, name=name):
            act_numel[name] = v.numel()
            return v
        return fn

    sens.run(gm, inputs, {s.node: record(s.name) for s in sites if s.kind == "act"})
    sites = [sens.Site(s.name, s.kind, s.node, s.candidates, act_numel.get(s.name, s.numel),
                       s.layers) if s.kind == "act" else s for s in sites]
    measured = hessian = None
    if opts.sensitivity in ("measured", "both"):
        rows = sens.measured(gm, inputs, sites, fake, metric)
        metric.leave_out_unstable(baseline, *(rows[(s.name, s.candidates[0])] for s in sites))
        measured = {key: metric.mean(err) for key, err in rows.items()}
    else:
        metric.leave_out_unstable(baseline)
    if opts.sensitivity in ("hessian", "both"):
        try:
            hessian = sens.hessian(gm, inputs, sites, fake, metric, seed=opts.seed)
        except RuntimeError as exc:
            if opts.sensitivity == "hessian":
                raise RuntimeError(f"choose-precision: the Hessian sensitivity cannot be "
                                   f"computed for this graph ({exc}); use "
                                   f"options['sensitivity'] = 'measured'") from exc
            ctx.note(f"mixed precision: no Hessian sensitivity for this graph ({exc})")
    method = "measured" if measured is not None else "hessian"
    omega = measured if measured is not None else hessian
    latency = _latencies(gm, ctx, sites, layers) if "latency" in opts.budget else None
    g = ctx.options.weight_group_size
    program = _Program(sites, omega, layers, act_numel, latency,
                       group_bits=8.0 / g if g else 0.0)
    decided = earlier["bits"] if earlier is not None else {}
    fixed = {s.name: decided[s.name] for s in sites if s.name in decided}
    try:
        bits = program.solve(opts.budget, fixed)
    except BudgetError:
        if not fixed:
            raise
        bits = program.solve(opts.budget)
        ctx.note("mixed precision: the widths another graph of this model chose for the "
                 "sites it shares with this one do not fit this graph's budget; this graph "
                 "chose its own")

    def measure(config: dict[str, int]) -> float:
        return metric(sens.run(gm, inputs, sens.configuration(sites, config, fake)))

    plan = PrecisionPlan(dict(opts.budget), method, bits,
                         [dict(name=s.name, kind=s.kind, candidates=s.candidates,
                               numel=s.numel, layers=s.layers) for s in sites],
                         measured=measured, hessian=hessian)
    if measured is not None and hessian is not None:
        low = [(s.name, b) for s in sites for b in s.candidates if b == min(s.candidates)]
        plan.rank_correlation = sens.spearman([measured[k] for k in low],
                                              [hessian[k] for k in low])
    plan.predicted = program.predicted(bits)
    plan.fake_measured = measure(bits)
    plan.all8_measured = measure(defaults)
    plan.rows = (metric.rows, metric.all_rows)
    plan.costs = program.cost(bits, opts.budget)
    plan.frontier = _frontier(program, opts.budget, measure)
    _apply(gm, ctx, sites, layers, bits)
    plan.seconds = time.perf_counter() - t0
    ctx.analysis["precision"] = plan
    ctx.analysis["distortion"] = metric  # measure-sqnr's figure for the integer graph
    if ctx.state is not None:
        ctx.state.precision[opts.fingerprint()] = {"bits": {**decided, **bits}, "plan": plan}
    return PassResult(gm, modified=False, counters=_counters(sites, bits))


def _counters(sites: list[sens.Site], bits: dict[str, int]) -> dict[str, int]:
    return {"weight4": sum(1 for s in sites if s.kind == "weight" and bits[s.name] == 4),
            "act16": sum(1 for s in sites if s.kind == "act" and bits[s.name] == 16),
            "sites": len(sites)}


def _apply(gm: GraphModule, ctx: PassContext, sites: list[sens.Site], layers: dict,
           bits: dict[str, int]) -> None:
    """Widths where the later passes read them, and in the report. A 16-bit input that
    would run slower than float on this CPU (kernels="auto": never slower than float) makes
    its layers run in float instead: as accurate, and not slower."""
    calib = ctx.analysis["calib"]
    narrow = {name for name, b in bits.items() if b == 4 and name.startswith("w:")}
    slow = _slow_a16(gm, ctx, {s.name for s in sites if s.kind == "act" and bits[s.name] == 16})
    if slow:
        ctx.note(f"mixed precision: {len(slow)} 16-bit input site(s) run their layers in "
                 f"float32, where two int8 GEMMs would be slower than float on this CPU: "
                 f"{sorted(slow)}")
    for node in gm.graph.nodes:
        layer = ann.selected(node) if is_linear(node) else None
        if layer is None:
            continue
        if f"w:{layer.name}" in narrow:
            layer.weight_bits = 4
        site = ann.site(node.args[0], "input")
        if site in slow:
            layer.quantize = False
            ctx.layer(layer.name, "linear").reason = (
                f"the mixed-precision budget gave its input 16 bits, and {slow[site]}: it "
                "runs in float32 (as accurate, not slower)")
    for s in sites:
        if s.kind == "act":
            calib[s.name].bits = bits[s.name]
    for layer, (wname, aname, _) in layers.items():
        rec = ctx.layer(layer, "linear")
        width = "float" if aname in slow else bits[aname] if aname else 8
        rec.detail["precision"] = f"w{bits[wname]}a{width}"


def _latencies(gm: GraphModule, ctx: PassContext, sites: list[sens.Site],
               layers: dict) -> dict[str, dict[tuple[int, int], float]]:
    """Per layer, the measured ms of each (weight bits, input bits) it may get, with the
    kernels it will run (lowering/latency.py, cached per machine); a 16-bit input that
    runs its layer in float on this CPU costs the float layer."""
    from qcompile.lowering import latency
    from qcompile.passes.select_layers import input_rows

    cands = {s.name: s.candidates for s in sites}
    slow = _slow_a16(gm, ctx, {s.name for s in sites if s.kind == "act" and 16 in s.candidates})
    out = {}
    for node in gm.graph.nodes:
        layer = ann.selected(node) if is_linear(node) else None
        if layer is None or layer.name in out or layer.name not in layers:
            continue
        wname, aname, n = layers[layer.name]
        w = get_constant(gm, node.args[1])
        device = w.device.type
        k, m = w.shape[1], input_rows(node)
        table = {}
        for bw in cands[wname]:
            for ba in cands.get(aname, (8,)):
                if ba == 16 and aname in slow:
                    table[(bw, ba)] = latency.linear_ms(device, m, k, n, 8, None)
                else:
                    table[(bw, ba)] = latency.linear_ms(device, m, k, n, bw, ba)
        out[layer.name] = table
    return out


def _slow_a16(gm: GraphModule, ctx: PassContext, wide: set[str]) -> dict[str, str]:
    """The 16-bit sites some reader of which would run slower than float32 on this CPU,
    with the reason (CPU graphs under kernels="auto" only: "cpu" quantizes regardless)."""
    from qcompile.lowering import cpu_routes
    from qcompile.passes.select_layers import input_rows

    if not wide or ctx.options.kernels != "auto":
        return {}
    caps = cpu_routes.cpu_capabilities()
    slow: dict[str, str] = {}
    for node in gm.graph.nodes:
        layer = ann.selected(node) if is_linear(node) else None
        site = ann.site(node.args[0], "input") if layer is not None else None
        if site not in wide or site in slow or layer.route is None:  # route: a CPU graph
            continue
        n, k = node.args[1].meta["val"].shape
        qmax = (1 << ((layer.weight_bits or 8) - 1)) - 1
        plan = cpu_routes.plan_a16(caps, input_rows(node), k, n, (-qmax - 1, qmax))
        if not plan.fast:
            slow[site] = plan.reason
    return slow
