"""How much the model's output moves when one quantization site is quantized: the numbers
choose-precision's integer program spends its budget on.

A site is a layer's weight ("w:<layer>") or an activation a recipe quantizes (its site
name, "in:<layer>"), with candidate widths. Distortion is measured on the graph's float
outputs against the float graph on the same sample inputs, row by row (a row: an output's
vector along its last dim, e.g. one token's hidden state or logits):

    D = mean over stable rows r of ||y_r - y_q,r||^2 / ||y_r||^2

Each row counts alike, whatever its norm. Only stable rows count: rows that the all-default
configuration, or any one site at its default width, changes wholesale (relative error
above STABLE_ROW_ERROR) are left out. Those are the rows of padded positions in a batch
(the graph does not know the attention mask): on all-MiniLM-L6-v2 they change by ~100%
under any perturbation, and 2 of them in 272 rows made one weight's 7-bit rounding look
13x worse than it is on the real tokens. If no row is stable, every row counts.

Two estimates of D for "only site s quantized, at b bits", side by side:
- measured: the float graph run with that one site fake-quantized (the same rounding and
  clamping as the integer kernels: per-channel symmetric weights, the calibrated
  per-tensor activation parameters); one forward per (site, width). The ground truth.
- hessian (HAWQ-V2): Tr(H_s) / n_s * ||Q_b(t_s) - t_s||^2, with H_s = J_s^T M J_s the
  Gauss-Newton Hessian of D with respect to the site's tensor t_s (n_s elements; M the
  diagonal row weights of D). Hutchinson's estimate in the output space,
  Tr(J^T M J) = E ||J^T M^1/2 r||^2 for Rademacher r, gives every site's block trace from
  one backward pass per probe, so its cost does not grow with the number of sites.
Both assume the sites' errors add up; choose-precision reports the prediction for the
chosen configuration beside the distortion measured on the real integer graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Interpreter, Node


@dataclass(frozen=True)
class Site:
    name: str  # "w:<layer>" for a weight, the activation site's name for an activation
    kind: str  # "weight" | "act"
    node: Node  # the weight's get_attr node, or the activation's value node
    candidates: tuple[int, ...]  # widths in bits, the recipe's default first
    numel: int  # weights: elements of the weight; activations: of the sample's value
    layers: tuple[str, ...]  # the layers it belongs to (an activation: every reader)


class FakeQuant:
    """The fake-quantized value of each (site, width): weights precomputed once, activations
    from the value at run time."""

    def __init__(self, weights: dict[tuple[str, int], torch.Tensor], act_fn):
        self.weights = weights  # (site name, bits) -> dequantized weight, float
        self.act_fn = act_fn  # (site name, bits, x) -> fake-quantized x

    def __call__(self, site: Site, bits: int, value: torch.Tensor) -> torch.Tensor:
        if site.kind == "weight":
            return self.weights[(site.name, bits)]
        return self.act_fn(site.name, bits, value)


class _Substitute(Interpreter):
    """Runs the graph with some nodes' values replaced: {node: value -> new value}."""

    def __init__(self, gm: GraphModule, subs: dict[Node, object]):
        super().__init__(gm)
        self.subs = subs

    def run_node(self, n):
        out = super().run_node(n)
        fn = self.subs.get(n)
        return fn(out) if fn is not None else out


def float_outputs(out) -> list[torch.Tensor]:
    """The floating-point tensors among a graph's outputs (nested lists and tuples)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in float_outputs(o)]
    return []


STABLE_ROW_ERROR = 0.25


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double()
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)


class Distortion:
    """D of a configuration's outputs against the float outputs (module docstring): the
    mean relative error of the rows kept, each output's rows flattened into one list."""

    def __init__(self, ref: list[torch.Tensor]):
        self.ref = [_rows(r) for r in ref]
        self.norms = torch.cat([r.pow(2).sum(-1) for r in self.ref])
        self.keep = self.norms > 0
        self.all_rows = len(self.norms)

    @property
    def rows(self) -> int:
        return int(self.keep.sum())

    def matches(self, test: list[torch.Tensor]) -> bool:
        """Outputs of the same rows (the same sample inputs, another configuration)."""
        return len(test) == len(self.ref) and all(
            _rows(t).shape == r.shape for t, r in zip(test, self.ref))

    def relative(self, test: list[torch.Tensor]) -> torch.Tensor:
        """||y_r - y_q,r||^2 / ||y_r||^2 of every row (0 for a row of zeros)."""
        if not self.matches(test):
            raise ValueError("Distortion: outputs of other rows than the reference's")
        err = torch.cat([(_rows(t) - r).pow(2).sum(-1) for t, r in zip(test, self.ref)])
        return torch.where(self.norms > 0, err / self.norms.clamp(min=1e-300), 0.0)

    def leave_out_unstable(self, *row_errors: torch.Tensor) -> None:
        """Keep only rows whose relative error stays below STABLE_ROW_ERROR in each of
        these (small) perturbations; all rows if none would be left."""
        stable = self.norms > 0
        for err in row_errors:
            stable &= err < STABLE_ROW_ERROR
        if stable.any():
            self.keep = stable

    def mean(self, row_error: torch.Tensor) -> float:
        return (row_error * self.keep).sum().item() / max(1, self.rows)

    def weights(self) -> torch.Tensor:
        """Each row's weight in D: 1 / (R ||y_r||^2) on the R rows kept, else 0."""
        return torch.where(self.keep, 1.0 / (self.norms.clamp(min=1e-300) * max(1, self.rows)),
                           0.0)

    def __call__(self, test: list[torch.Tensor]) -> float:
        return self.mean(self.relative(test))


def run(gm: GraphModule, inputs: list, subs: dict[Node, object] | None = None):
    with torch.no_grad():
        return float_outputs(_Substitute(gm, subs or {}).run(*inputs))


def configuration(sites: list[Site], bits: dict[str, int], fake: FakeQuant):
    """The substitutions that quantize every site at its width in `bits`."""
    return {s.node: (lambda v, s=s: fake(s, bits[s.name], v)) for s in sites}


def measured(gm: GraphModule, inputs: list, sites: list[Site], fake: FakeQuant,
             metric: Distortion) -> dict[tuple[str, int], torch.Tensor]:
    """Every row's relative error with only site s fake-quantized at width b, for every
    site and candidate width (metric.mean of one is its D)."""
    out = {}
    for s in sites:
        for b in s.candidates:
            test = run(gm, inputs, {s.node: lambda v, s=s, b=b: fake(s, b, v)})
            out[(s.name, b)] = metric.relative(test)
    return out


class _Leaves(Interpreter):
    """The graph with every site's tensor a leaf of autograd: weights as tensors that
    require grad, activations plus a zero perturbation that does (its gradient is the
    activation's)."""

    def __init__(self, gm: GraphModule, sites: list[Site]):
        super().__init__(gm)
        self.by_node = {s.node: s for s in sites}
        self.leaves: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        site = self.by_node.get(n)
        if site is None or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        self.values[site.name] = out.detach()
        if site.kind == "weight":
            leaf = out.detach().clone().requires_grad_(True)
            self.leaves[site.name] = leaf
            return leaf
        pert = torch.zeros_like(out, requires_grad=True)
        self.leaves[site.name] = pert
        return out + pert


def hessian_traces(gm: GraphModule, inputs: list, sites: list[Site], metric: Distortion,
                   probes: int = 8, seed: int = 0
                   ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(Tr(J_s^T M J_s) per site, each site's float value): Hutchinson's estimate
    E ||J^T M^1/2 r||^2 over `probes` Rademacher vectors r in the output space (M: the
    metric's row weights), one forward and `probes` backward passes in all."""
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        interp = _Leaves(gm, sites)
        outs = float_outputs(interp.run(*inputs))
        weights = metric.weights().split([len(r) for r in metric.ref])
        scales = [w.sqrt() for w in weights]
        live = [(o, sc) for o, sc in zip(outs, scales) if o.requires_grad]
        if not live:
            raise RuntimeError("no floating-point output of the graph depends on a "
                               "quantization site")
        names = list(interp.leaves)
        leaves = [interp.leaves[n] for n in names]
        traces = dict.fromkeys(names, 0.0)
        for i in range(probes):
            rs = []
            for o, sc in live:
                r = torch.randint(0, 2, o.shape, generator=g).double() * 2 - 1
                rows = r.reshape(-1, o.shape[-1]) if o.dim() else r.reshape(1, 1)
                rs.append((rows * sc[:, None]).reshape(o.shape).to(o.dtype))
            grads = torch.autograd.grad([o for o, _ in live], leaves, grad_outputs=rs,
                                        allow_unused=True, retain_graph=i < probes - 1)
            for n, gr in zip(names, grads):
                if gr is not None:
                    traces[n] += gr.double().pow(2).sum().item() / probes
    return traces, interp.values


def hessian(gm: GraphModule, inputs: list, sites: list[Site], fake: FakeQuant,
            metric: Distortion, probes: int = 8, seed: int = 0
            ) -> dict[tuple[str, int], float]:
    """HAWQ-V2's estimate of D for every site and candidate width: Tr(H_s) / n_s times the
    squared quantization error of the site's tensor."""
    traces, values = hessian_traces(gm, inputs, sites, metric, probes, seed)
    out = {}
    for s in sites:
        x = values.get(s.name)
        for b in s.candidates:
            if x is None:  # the site's value never reached an output that needs it
                out[(s.name, b)] = 0.0
                continue
            err = (fake(s, b, x).double() - x.double()).pow(2).sum().item()
            out[(s.name, b)] = traces[s.name] / max(1, x.numel()) * err
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); None for fewer than 3."""
    if len(a) < 3:
        return None

    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # ties: the mean of their ranks
            tied = t == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt().item()
    return (ra * rb).sum().item() / denom if denom else None
