"""What was quantized, how, and why not: `qcompile.report(compiled_model)`.

Per graph: the passes that ran (time, whether they changed the graph, their counters),
notes (transforms skipped and why), and per layer: quantized or not and why, transforms
applied, SQNR against float, kernel and config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qcompile.pass_manager import LayerRecord, PassRecord
from qcompile.state import compile_fingerprint, state_for_model


@dataclass
class GraphReport:
    name: str
    recipe: str
    passes: list[PassRecord]
    layers: list[LayerRecord]
    notes: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    precision: Any = None  # passes.choose_precision.PrecisionPlan (recipe "mixed")

    def to_text(self) -> str:
        lines = [f"== {self.name} (recipe {self.recipe}) =="]
        q = sum(1 for layer in self.layers if layer.quantized)
        lines.append(f"layers: {len(self.layers)}, quantized: {q}, float: {len(self.layers) - q}")
        lines.append(f"{'layer':<48} {'kind':<9} {'quant':<5} {'SQNR dB':>8}  kernel / reason")
        for layer in self.layers:
            sqnr = f"{layer.sqnr_db:8.2f}" if layer.sqnr_db is not None else f"{'-':>8}"
            what = layer.kernel or "" if layer.quantized else layer.reason
            if layer.quantized and layer.config:
                what += f" [{layer.config}]"
            if layer.transforms:
                what += f" (transforms: {', '.join(layer.transforms)})"
            lines.append(f"{layer.name[:48]:<48} {layer.kind:<9} "
                         f"{'yes' if layer.quantized else 'no':<5} {sqnr}  {what}")
        lines.append("passes:")
        for rec in self.passes:
            counters = ", ".join(f"{k}={v}" for k, v in rec.counters.items() if v)
            lines.append(f"  {rec.name:<28} {rec.seconds * 1e3:8.2f} ms "
                         f"{'changed' if rec.modified else 'unchanged':<9} {counters}")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.precision is not None:
            lines.append(self.precision.to_text())
        return "\n".join(lines)


@dataclass
class Report:
    graphs: list[GraphReport]

    @property
    def layers(self) -> list[LayerRecord]:
        """One record per layer name: a graph recompiled for new shapes repeats the layers
        of the graph before it; the latest record stands for the layer."""
        unique: dict[str, LayerRecord] = {}
        for g in self.graphs:
            for layer in g.layers:
                unique[layer.name] = layer
        return list(unique.values())

    @property
    def quantized(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.quantized]

    def plot(self, path: str) -> str:
        """A picture (PNG) of per-layer SQNR, and of each linear's input range and kurtosis
        before and after the transforms. Needs matplotlib (pip install 'qcompile[plot]')."""
        plt = _pyplot()
        layers = [x for x in self.layers if x.kind == "linear"]
        names = [x.name for x in layers]
        pos = range(len(layers))
        fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.28 * len(layers)), 10), sharex=True)
        sq = [x.sqnr_db if x.sqnr_db is not None and x.sqnr_db != float("inf") else 0.0
              for x in layers]
        axes[0].bar(pos, sq, color=["tab:blue" if x.quantized else "tab:gray" for x in layers])
        axes[0].set_ylabel("SQNR vs float (dB)")
        axes[0].set_title("qcompile: per-layer quantization error (gray: left in float)")
        for ax, key, label in ((axes[1], "absmax", "input max|x|"),
                               (axes[2], "kurtosis", "input kurtosis")):
            for offset, when, color in ((-0.2, "before", "tab:red"), (0.2, "after", "tab:green")):
                vals = [x.detail.get(f"input_{when}", {}).get(key, float("nan")) for x in layers]
                ax.bar([p + offset for p in pos], vals, width=0.4, color=color,
                       label=f"{when} transforms")
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.legend()
        axes[2].set_xticks(list(pos))
        axes[2].set_xticklabels(names, rotation=90, fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def precision_plans(self) -> list:
        """The mixed-precision plans of the graphs, each once: a graph compiled later for a
        new shape keeps the widths (and the plan) of the graph before it."""
        plans, seen = [], set()
        for g in self.graphs:
            key = None if g.precision is None else tuple(sorted(g.precision.bits.items()))
            if key is not None and key not in seen:
                seen.add(key)
                plans.append(g.precision)
        return plans

    def plot_precision(self, path: str) -> str:
        """The mixed-precision choice as a picture (PNG): per graph, the Pareto frontier of
        cost (the budget's first key) against output distortion, predicted (summed site
        sensitivities) and measured (the whole choice fake-quantized), with the chosen point
        and the integer graph's own distortion. Needs matplotlib."""
        plans = self.precision_plans()
        if not plans:
            raise ValueError("no mixed-precision choice in this report: compile with "
                             "options={'recipe': 'mixed', 'budget': {...}}")
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(plans), figsize=(6.5 * len(plans), 4.8), squeeze=False)
        for ax, plan in zip(axes[0], plans):
            pts = sorted(plan.frontier, key=lambda p: p["cost"])
            key = pts[0]["key"] if pts else next(iter(plan.costs), "cost")
            ax.plot([p["cost"] for p in pts], [p["predicted"] for p in pts], "o-",
                    label="predicted (sum of site sensitivities)")
            measured = [p for p in pts if "measured" in p]
            ax.plot([p["cost"] for p in measured], [p["measured"] for p in measured], "s--",
                    label="measured (fake-quantized)")
            used = plan.costs.get(key, (None,))[0]
            if used is not None:
                ax.plot([used], [plan.predicted], "r*", markersize=14, label="chosen")
                if plan.real_measured is not None:
                    ax.plot([used], [plan.real_measured], "kx", markersize=10,
                            label="chosen, integer graph")
            ax.set_yscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel("output distortion |y - y_q|^2 / |y|^2")
            ax.set_title(f"qcompile mixed precision: budget {plan.budget}", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def __str__(self) -> str:
        if not self.graphs:
            return "qcompile report: no graph has been compiled yet (run the model once)"
        return "\n\n".join(g.to_text() for g in self.graphs)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the report's pictures need matplotlib: pip install "
                          "'qcompile[plot]'") from exc
    return plt


def graph_report(artifact, names: dict[int, str] | None = None) -> GraphReport:
    """The report of one compiled graph; with `names` (id of each model tensor -> its path in
    the model), layers are named by their weights' paths in that model."""
    ctx = artifact.ctx
    layers = list(ctx.layers.values())
    if names:
        layers = _qualified(layers, ctx.frozen, names)
    return GraphReport(artifact.name, artifact.options.recipe, list(ctx.history),
                       layers, list(ctx.notes), dict(ctx.counters),
                       ctx.analysis.get("precision"))


def _qualified(layers: list[LayerRecord], frozen: dict, names: dict[int, str]):
    """Layer names as paths from the model given to `report`. A graph's own names are
    relative to the module whose frame Dynamo compiled: after a graph break inside a
    submodule (or a loop over layers) that is the submodule, so two layers of one model can
    share a name ("weight", "self_attn.q_proj") there."""
    by_path = dict(zip(frozen.get("names", ()), frozen.get("tensors", ())))

    def qualify(name: str) -> str:
        for path in (f"{name}.weight", name):
            tensor = by_path.get(path)
            if tensor is not None and id(tensor) in names:
                return names[id(tensor)].removesuffix(".weight")
        return name

    out = []
    for layer in layers:
        kind, sep, rest = layer.name.partition(":")
        name = f"{kind}:{qualify(rest)}" if sep and kind == "attn" else qualify(layer.name)
        out.append(layer if name == layer.name else dataclasses.replace(layer, name=name))
    return out


def _tensor_names(model) -> dict[int, str]:
    module = getattr(model, "_orig_mod", model)
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    names: dict[int, str] = {}
    for name, tensor in named:
        names.setdefault(id(tensor), name)  # a tied weight: its first path
    return names


def report(model) -> Report:
    """What was quantized in the graphs `model` (the model torch.compile returned, or its
    nn.Module) compiled, layer by layer, with layers named by their paths in the model."""
    state = state_for_model(model)
    artifacts = sorted(state.artifacts, key=lambda a: a.name)
    fingerprint = compile_fingerprint(model)
    if fingerprint is not None:  # only the graphs this compiled model made
        artifacts = [a for a in artifacts if a.options.fingerprint() == fingerprint]
    names = _tensor_names(model)
    return Report([graph_report(a, names) for a in artifacts])
