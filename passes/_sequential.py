"""GPTQ in the model's order, on the inputs the quantized layers before each layer produce
(quantize-weights with options["sequential"]).

Calibration's Hessians H = 2/n X^T X come from the float model: layer l's GPTQ then
minimises ||(W - Q(W)) X_float||, blind to the error every layer before it adds to its
input. GPTQ's own procedure (Frantar et al. 2023: "sequential", within a block "true
sequential") quantizes in order and takes each layer's Hessian from the partly quantized
model. Here: the calibration batches are replayed block by block (passes/_segments.py),
through the float model and through the partly quantized one side by side; within a
block, the linears sharing one input are one stage, in graph order. A stage's input X_q is
gathered with every linear quantized before it running its quantized weight and every
quantized linear's input rounded as the recipe's activation quantizer will round it (the
site's final static parameters; per token for dynamic recipes), the stage's own input
included; X_f is the same input in the float model. GPTQ quantizes, with the Hessian of
X_q, not W but the weight W* that best maps X_q to the float layer's output on X_f
(`target_weight`: asymmetric calibration, as GPTAQ), so that each layer also makes up
for the error coming into it. The block's outputs so computed are the next block's inputs.
Measured (mean cosine to float; bench/results): random LLaMA / Mistral with outlier
channels, w4a8: 0.9918 with the float model's Hessians, 0.9952 sequential; Qwen2 0.9951 ->
0.9963; all-MiniLM-L6-v2 w4a8 groups of 16 0.9892 -> 0.9899, groups of 32 0.9880 -> 0.9878
(X_q's Hessian without the asymmetric target: 0.9869). On wherever GPTQ runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant, is_call
from qcompile.numerics.observers import hessian_shrinkage, row_norm4, shrink_hessian
from qcompile.pass_manager import PassContext
from qcompile.passes._fake_quant import fake_fixed, fake_token
from qcompile.passes._segments import block_ends, release, run_segment, segments
from qcompile.passes._structure import layer_name
from qcompile.passes.analyze_structure import analyze
from qcompile.passes.calibrate_qparams import activation_spec


def act_quantizer(ctx: PassContext, x: Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """x rounded as the quantized linears reading it will round it (dequantized)."""
    act = ctx.options.recipe_obj.act
    if act is None:
        return lambda t: t
    if act.dynamic:
        clip, symmetric, group = (ctx.options.act_clip, ctx.options.act_symmetric,
                                  ctx.options.act_group)
        return lambda t: fake_token(t, act.bits, clip, symmetric, group)
    site = (ctx.analysis.get("calib") or {}).get(ann.site(x, "input") or "")
    spec = activation_spec(ctx)
    if site is None or site.scale is None or site.bits != spec.bits:
        return lambda t: t  # uncalibrated (stays float) or widened to 16 bits
    return lambda t: fake_fixed(t, site.scale, site.zero_point, spec)


def sequential_gptq(gm: GraphModule, ctx: PassContext, batches: list, eligible: set[Node],
                    quantize: Callable[[Node, torch.Tensor, float, torch.Tensor], torch.Tensor]
                    ) -> int:
    """Call `quantize(linear, hessian, shrinkage, weight) -> its dequantized weight` for
    every linear of `eligible`, in the model's order: hessian = 2/n X_q^T X_q of its rounded
    input X_q in the partly quantized model over `batches` (shrinkage: its
    observers.hessian_shrinkage), and weight the float weight moved to make up for the
    error coming in (see target_weight); returns how many were quantized."""
    segs = segments(gm, block_ends(gm, analyze(gm)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    quant_envs = [dict(zip(placeholders, [a.clone() if isinstance(a, torch.Tensor) else a
                                          for a in b], strict=True)) for b in batches]
    float_envs = [dict(e) for e in quant_envs]
    done: dict[Node, torch.Tensor] = {}  # linear -> dequantized weight
    rounders: dict[Node, Callable] = {}
    count = 0

    def rounder(lin: Node) -> Callable:
        if lin not in rounders:
            rounders[lin] = act_quantizer(ctx, lin.args[0]) if (
                lin in eligible or ann.selected(lin) is not None) else (lambda t: t)
        return rounders[lin]

    floats: dict[Node, tuple[torch.Tensor, torch.Tensor | None]] = {}
    few: list[tuple[Node, int, int, float]] = []  # (first linear, rows, K, shrinkage)

    def params(lin: Node) -> tuple[torch.Tensor, torch.Tensor | None]:
        """lin's float weight and bias, read once (every stage replays every batch)."""
        if lin not in floats:
            b = lin.args[2] if len(lin.args) > 2 else None
            b = get_constant(gm, b).float() if isinstance(b, Node) else b
            floats[lin] = (get_constant(gm, lin.args[1]).float(), b)
        return floats[lin]

    def quantized(seen: list | None = None, first: Node | None = None):
        """Linears as the quantized model runs them (the ones done so far; the others in
        float); `seen` collects the input rows of `first`, rounded as it will round them."""
        def linear(value, lin):
            x = value(lin.args[0])
            w, b = params(lin)
            xq = rounder(lin)(x.float()) if lin in done or lin is first else x.float()
            if lin is first and seen is not None:
                seen.append(xq.reshape(-1, xq.shape[-1]).double())
            return F.linear(xq, done.get(lin, w), b).to(x.dtype)
        return linear

    def floating(seen: list, first: Node):
        def linear(value, lin):
            x = value(lin.args[0])
            if lin is first:
                seen.append(x.reshape(-1, x.shape[-1]).double())
            return F.linear(x.float(), *params(lin)).to(x.dtype)
        return linear

    def run(seg, envs, hook, keep: bool, later):
        over = {n: (lambda value, n=n: hook(value, n)) for n in seg.nodes
                if is_call(n, F.linear)}
        for env in envs:
            out = run_segment(gm, seg, env, over)
            if keep:
                env.update(out)
                release(env, later)

    with torch.no_grad():
        for i, seg in enumerate(segs):
            stages: dict[Node, list[Node]] = {}
            for lin in (n for n in seg.nodes if n in eligible):
                stages.setdefault(lin.args[0], []).append(lin)
            for stage in stages.values():
                xq_rows, xf_rows = [], []
                run(seg, quant_envs, quantized(xq_rows, stage[0]), False, None)
                run(seg, float_envs, floating(xf_rows, stage[0]), False, None)
                if not xq_rows:
                    continue
                a = sum(r.T @ r for r in xq_rows)  # X_q^T X_q
                b = sum(q.T @ f for q, f in zip(xq_rows, xf_rows, strict=True))  # X_q^T X_f
                n = sum(r.shape[0] for r in xq_rows)
                h = 2.0 / n * a
                rho = hessian_shrinkage(h, n, sum(row_norm4(r) for r in xq_rows))
                if n < h.shape[0]:
                    few.append((stage[0], n, h.shape[0], rho))
                for lin in stage:
                    target = target_weight(params(lin)[0].double(), a, b, rho)
                    done[lin] = quantize(lin, h.float(), rho, target.float())
                    count += 1
            if i + 1 < len(segs):
                run(seg, quant_envs, quantized(), True, segs[i + 1:])
                run(seg, float_envs, floating([], None), True, segs[i + 1:])
    if few:
        ctx.note(few_rows_note(few))
    return count


def few_rows_note(few: list[tuple[Node, int, int, float]]) -> str:
    """What the report says when GPTQ saw fewer calibration rows than some inputs' width;
    few: (a linear, its rows, K, shrinkage), linears that share an input counted once."""
    lin, n, k, rho = max(few, key=lambda f: f[2] - f[1])
    inputs = len({f[0].args[0] for f in few})
    return (f"gptq: {inputs} input(s) saw fewer calibration rows (tokens) than their width "
            f"K, e.g. {layer_name(lin)}: {n:,} rows, K = {k:,}: their Hessians are rank-"
            f"deficient, so they were shrunk toward their mean diagonal ({rho:.2f} of the "
            "way there), which leaves GPTQ close to round-to-nearest. Calibrate on more "
            "tokens for GPTQ to gain (its reference setting is 128 x 2,048; Gemma 3 270M "
            "w4a8 went from 1.063x to 1.044x float perplexity with 6,100 calibration "
            "tokens instead of 1,000)")


# lambda / mean(diag X_q^T X_q). The shipped all-MiniLM-L6-v2 calibration (64 sentences,
# about 1,100 tokens, fewer than the FFN's 1,536 inputs) over-fits a weakly held W*: w4a8
# groups of 32, mean cosine 0.9807 (0.01), 0.9865 (0.1), 0.9878 (1.0); GPTQ on the float
# model's Hessians 0.9880
DAMP = 1.0


def target_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  shrinkage: float = 0.0) -> torch.Tensor:
    """The weight W* [N, K] whose output on the quantized model's input X_q comes closest to
    the float layer's on the float model's input X_f, held near W:
        min ||X_q W*^T - X_f W^T||^2 + lambda ||W* - W||^2
        W* = (W B^T + lambda W) (A + lambda I)^-1,  A = X_q^T X_q, B = X_q^T X_f
    (GPTQ's asymmetric calibration, as GPTAQ: the layer also makes up for the error its
    input brings). GPTQ then quantizes W* with the Hessian of X_q: since the least-squares
    residual is orthogonal to X_q, the two errors add. float64.
    shrinkage (observers.hessian_shrinkage of A): A and B are each shrunk that far toward
    their mean diagonal first, as estimates of the inputs' true moments: from rows too few
    to say much, W* stays near W (at 1, W* = W up to the ratio of their mean diagonals)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    a, b = shrink_hessian(a, shrinkage), shrink_hessian(b, shrinkage)
    lam = DAMP * float(a.diagonal().mean().clamp(min=1e-12))
    rhs = w @ b.T + lam * w  # [N, K]
    return torch.linalg.solve(a + lam * eye, rhs.T).T  # A + lambda I is symmetric
