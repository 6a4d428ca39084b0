"""learn-transforms: weight clipping and per-channel shift and scale, learned block by block.

What: the graph is cut into transformer blocks (passes/_segments.py: after the residual
add each MLP down projection writes). For each block in order, with the calibration
batches replayed through it, Adam fits
  - each quantized linear's clip ratios, one per weight row, c in [CLIP_MIN, 1] (projected
    after each step; OmniQuant's learnable weight clipping, LWC, without its sigmoid, which
    near 1 moves a ratio too little in the few steps there are): the row's quantization
    range is c times its min-max range, as quantize-weights' clip search sets it;
  - for each input x read only by quantized linears whose producer can absorb it (a norm,
    a linear, a gated product's linear factor: smooth's `absorber`), a per-channel scale s
    and, where the producer takes one, a shift z (OmniQuant's learnable equivalent
    transformation, LET; Outlier Suppression+'s shift and scale, learned instead of
    searched): x~ = (x - z) / s, W~ = W diag(s), b~ = b + W z,
to minimise the block's output error against float, sum over outputs of
||f_q(x_q) - f(x)||^2 / ||f(x)||^2, where f is the float block on the float model's inputs
and f_q the block with every quantized linear fake-quantized as the recipe will run it
(weights round-to-nearest under their learned clip, on the row grid for group-wise int4;
activations per-tensor static from the transformed per-channel calibration ranges, or
per-token dynamic) with straight-through rounding, fed x_q, the outputs of the blocks
before it as learned and fake-quantized (so each block also makes up for the error of
those before it). A block keeps what it learned only if that cuts its error on all the
batches against its starting point (no shift or scale; each row's clip from
numerics.weights.clip_search where weight clipping is on, else none), so it never makes a
block worse by its own measure.
Then s and z are folded as smooth folds its own (producer and linears; exact in real
arithmetic, so the float graph computes the same function), the node annotations compose
with smooth's (smooth-qparams recomputes the activation parameters, the Hessians and the
means from them), and the clip ratios go to quantize-weights (Layer.clip), which uses them
for RTN and GPTQ alike. A saved quantization brings the learned shift and scale (the
input site's `learned`) and its weights, and nothing is learned again.
Measured: on all-MiniLM-L6-v2 and on the random outlier models it gains little or loses
(bench/results): from the Hessian clip search's starting point, straight-through gradients
of a few dozen steps rarely find better clip ratios, the ratios are learned through
round-to-nearest while GPTQ, where it runs, rounds otherwise, and BERT's post-norm
blocks leave no producer to absorb a shift or scale. Off by default.
Why: the data-free and one-shot transforms choose per layer; a block's output error
depends on how its layers' errors combine and on the error coming in, which only a
block-level objective sees (OmniQuant, Shao et al. 2024).
Time: options.learn_steps Adam steps per block, each on one calibration batch; with
options.learn_time_s, blocks share that many seconds and a block out of time stops early
(the report says so). One line per block on stderr shows progress.
Pre: calibrate-qparams (the ranges; insert-observers keeps per-channel ones and means when
learning), select-layers; after smooth where it runs (it starts from smooth's result).
Post: same float function; learned linears record "learn(...)" transforms; inputs that
were shifted and scaled carry a composed `Smoothed` annotation.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qcompile import annotations as ann
from qcompile.fx_utils import get_constant, is_call
from qcompile.numerics.specs import QuantSpec
from qcompile.numerics.weights import clip_search
from qcompile.pass_manager import PassContext, PassResult, graph_pass
from qcompile.passes._fake_quant import fake_fixed, fake_static, fake_token, fake_weight
from qcompile.passes._migration import Migration
from qcompile.passes._segments import Segment, block_ends, release, run_segment, segments
from qcompile.passes._structure import Skips, WeightEditor, layer_name, linear_params
from qcompile.passes.analyze_structure import analyze
from qcompile.passes.calibrate_qparams import activation_spec, loaded_quantization
from qcompile.passes.quantize_weights import weight_spec_for
from qcompile.passes.smooth import absorber, fold_producer, linear_groups, scale_readers

# Adam's rates: OmniQuant's (1e-2 clip, 5e-3 shift / scale) moved every parameter of
# all-MiniLM-L6-v2's blocks by more than a few dozen steps of straight-through gradients can
# justify (block errors rose from their start); a fifth to a half of them did not
LR_CLIP = 5e-3
LR_SHIFT_SCALE = 2e-3
CLIP_MIN = 0.5  # the lowest clip ratio, as numerics.weights.clip_search's
MIN_GAIN = 1e-3  # what a block learned must cut its error by this fraction to be kept


@dataclass
class _Group:
    """The linears reading one input x, and its learnable shift and scale."""

    x: Node
    linears: list[Node]
    log_s: torch.Tensor  # [K]; s = exp(log_s)
    z: torch.Tensor | None  # [K], where the producer takes a shift

    def scale(self) -> torch.Tensor:
        return self.log_s.exp()


@dataclass
class _Block:
    seg: Segment
    linears: list[Node]
    groups: dict[Node, _Group] = field(default_factory=dict)  # by x
    clip: dict[Node, torch.Tensor] = field(default_factory=dict)  # clip ratios by linear
    spec: dict[Node, QuantSpec] = field(default_factory=dict)
    kept: bool = False  # learning cut its error (or an earlier graph's did): fold it

    def let(self) -> list[torch.Tensor]:
        """The shift / scale parameters."""
        return [g.log_s for g in self.groups.values()] + [
            g.z for g in self.groups.values() if g.z is not None]

    def params(self) -> list[torch.Tensor]:
        return self.let() + list(self.clip.values())


class _Quantized:
    """A block's quantized linears as the recipe will run them, under its parameters."""

    def __init__(self, gm: GraphModule, ctx: PassContext, block: _Block):
        self.block = block
        self.act = ctx.options.recipe_obj.act
        self.act_spec = activation_spec(ctx)
        self.act_clip = ctx.options.act_clip
        self.act_symmetric = ctx.options.act_symmetric
        self.act_group = ctx.options.act_group
        calib = ctx.analysis.get("calib") or {}
        ed = WeightEditor(gm)
        self.weights = {lin: tuple(None if t is None else t.float() for t in
                                   linear_params(ed, lin)) for lin in block.linears}
        self.ranges: dict[Node, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.fixed: dict[Node, tuple[float, int] | None] = {}
        for lin in block.linears:
            x = lin.args[0]
            site = calib.get(ann.site(x, "input") or "")
            rng = getattr(site, "channel_range", None)
            if rng is not None:
                lo, hi = (t.double() for t in rng)
                prior = ann.get(x, ann.Smoothed)  # smooth's, before smooth-qparams
                if prior is not None:
                    z1 = prior.shift.double() if prior.shift is not None else 0.0
                    lo, hi = ((t - z1) / prior.divisor.double() for t in (lo, hi))
                rng = (lo.float(), hi.float())
            self.ranges[lin] = rng
            self.fixed[lin] = (site.scale, site.zero_point) if getattr(
                site, "scale", None) is not None else None

    def override(self) -> dict[Node, object]:
        return {lin: (lambda value, lin=lin: self.linear(lin, value))
                for lin in self.block.linears}

    def linear(self, lin: Node, value) -> torch.Tensor:
        b = self.block
        x = value(lin.args[0])
        w, bias = self.weights[lin]
        g = b.groups.get(lin.args[0])
        rng = self.ranges[lin]
        if g is not None:
            s = g.scale()
            x = x / s if g.z is None else (x - g.z) / s
            if g.z is not None:
                bias = (bias if bias is not None else 0.0) + w @ g.z
            w = w * s
            if rng is not None:
                z = 0.0 if g.z is None else g.z
                rng = ((rng[0] - z) / s, (rng[1] - z) / s)
        xq = self._act(lin, x, rng)
        wq = fake_weight(w, b.clip[lin], b.spec[lin])
        return F.linear(xq.to(wq.dtype), wq, bias)

    def _act(self, lin: Node, x: torch.Tensor, rng) -> torch.Tensor:
        if self.act is None:
            return x
        if self.act.dynamic:
            return fake_token(x, self.act.bits, self.act_clip, self.act_symmetric,
                              self.act_group)
        if rng is not None:
            return fake_static(x, rng[0], rng[1], self.act_spec)
        fixed = self.fixed[lin]
        if fixed is None:
            return x
        return fake_fixed(x, *fixed, self.act_spec)


def _error(out: dict, target: dict) -> torch.Tensor:
    """sum over floating outputs of ||out - target||^2 / ||target||^2."""
    total = torch.zeros(())
    for n, t in target.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            o = out[n].float()
            total = total + (o - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp(
                min=1e-12)
    return total


@graph_pass("learn-transforms", requires=("select-layers", "calibrate-qparams"))
def learn_transforms(gm: GraphModule, ctx: PassContext) -> PassResult:
    # finalizing may run under no_grad or inference_mode (the first call after calibrate)
    with torch.inference_mode(False), torch.enable_grad():
        return _learn_transforms(gm, ctx)


def _learn_transforms(gm: GraphModule, ctx: PassContext) -> PassResult:
    counters = {"blocks": 0, "learned": 0, "kept_start": 0, "reused": 0, "groups": 0,
                "linears": 0, "out_of_time": 0}
    skips = Skips(ctx, "learn-transforms")
    if loaded_quantization(ctx) is not None:
        counters["groups"] = _apply_saved(gm, ctx)
        return PassResult(gm, modified=counters["groups"] > 0, counters=counters)
    cache = ctx.state.learned if ctx.state is not None else {}
    prefix = ctx.options.fingerprint() + "|"
    batches = ctx.analysis.get("calib_inputs") or []
    segs = segments(gm, block_ends(gm, analyze(gm)))
    blocks = [_block(gm, ctx, seg, skips) for seg in segs]
    todo = [b for b in blocks if b is not None and not _reuse(b, cache, prefix)]
    counters["reused"] = sum(b is not None for b in blocks) - len(todo)
    if todo and not batches:
        ctx.note(f"learn-transforms: no calibration batch reached this graph, so "
                 f"{len(todo)} block(s) learned nothing (quantized as without learning)")
        todo = []
    if todo:
        for b in todo:
            _start_clips(gm, ctx, b)
        _learn_blocks(gm, ctx, segs, blocks, set(map(id, todo)), batches, counters)
        for b in todo:
            _remember(b, cache, prefix)
    for block in blocks:
        if block is not None and block.kept:
            _fold(gm, ctx, block, counters)
    skips.flush()
    ctx.note(f"learn-transforms: {counters['blocks']} block(s) learned on {len(batches)} "
             f"calibration batch(es), {counters['learned']} kept what they learned, "
             f"{counters['reused']} reused what an earlier graph of the model learned; "
             f"{counters['groups']} input(s) shifted and scaled, {counters['linears']} "
             "linears' clip ratios learned")
    return PassResult(gm, modified=counters["groups"] > 0,
                      counters={k: v for k, v in counters.items() if v})


def _learn_blocks(gm: GraphModule, ctx: PassContext, segs: list[Segment],
                  blocks: list[_Block | None], todo: set[int], batches: list,
                  counters: dict) -> None:
    """Replay the batches block by block: the float model's outputs are each block's
    targets, the quantized model's (as learned so far) its inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    float_env = [dict(zip(placeholders, [a.clone() if isinstance(a, torch.Tensor) else a
                                         for a in b], strict=True)) for b in batches]
    quant_env = [dict(e) for e in float_env]
    budget = ctx.options.learn_time_s
    for i, (seg, block) in enumerate(zip(segs, blocks, strict=True)):
        with torch.no_grad():
            targets = [run_segment(gm, seg, e) for e in float_env]
        if block is not None and id(block) in todo:
            counters["blocks"] += 1
            share = None if budget is None else budget / len(todo)
            block.kept, line = _learn(gm, ctx, block, quant_env, targets, share, counters)
            print(f"qcompile: learn-transforms, block {counters['blocks']}/{len(todo)} "
                  f"({len(block.linears)} linears): {line}", file=sys.stderr, flush=True)
        if i + 1 == len(segs):
            break
        with torch.no_grad():
            quantized = _Quantized(gm, ctx, block).override() if block is not None else None
            for fe, qe, t in zip(float_env, quant_env, targets, strict=True):
                fe.update(t)
                qe.update(run_segment(gm, seg, qe, quantized))
                release(fe, segs[i + 1:])
                release(qe, segs[i + 1:])


def _reuse(block: _Block, cache: dict, prefix: str) -> bool:
    """Set block's parameters to what an earlier graph of the model learned for all its
    linears; False where it learned nothing for one of them."""
    keys = [f"{prefix}clip|{layer_name(lin)}" for lin in block.linears]
    if not all(k in cache for k in keys):
        return False
    block.kept = cache[keys[0]] is not None
    with torch.no_grad():
        for lin, key in zip(block.linears, keys, strict=True):
            if cache[key] is not None:
                block.clip[lin].copy_(cache[key].float())
        for g in block.groups.values():
            m = cache.get(f"{prefix}let|{ann.site(g.x, 'input')}")
            if m is not None and m.scale.shape == g.log_s.shape:
                g.log_s.copy_(m.scale.log().float())
                if g.z is not None and m.shift is not None:
                    g.z.copy_(m.shift.float())
    return True


def _remember(block: _Block, cache: dict, prefix: str) -> None:
    for lin, clip in block.clip.items():
        cache[f"{prefix}clip|{layer_name(lin)}"] = clip.detach().clone() if block.kept else None
    for g in block.groups.values():
        site = ann.site(g.x, "input")
        if block.kept and site is not None:
            cache[f"{prefix}let|{site}"] = Migration(
                "learned", g.scale().detach().double(),
                g.z.detach().double() if g.z is not None else None)


def _block(gm: GraphModule, ctx: PassContext, seg: Segment, skips: Skips) -> _Block | None:
    """seg's learnable parameters at their starting point, or None: nothing to learn."""
    inside = set(seg.nodes)
    linears = [n for n in seg.nodes if is_call(n, F.linear) and ann.selected(n) is not None
               and get_constant(gm, n.args[1]) is not None]
    if not linears:
        return None
    block = _Block(seg, linears)
    ed = WeightEditor(gm)
    for lin in linears:
        w = linear_params(ed, lin)[0]
        sel = ann.selected(lin)
        block.spec[lin] = weight_spec_for(ctx, w.shape[1], sel.weight_bits,
                                          sel.group_levels)[0]
        block.clip[lin] = torch.ones(w.shape[0], requires_grad=True)
    for x in dict.fromkeys(lin.args[0] for lin in linears):
        if not isinstance(x, Node):
            continue
        readers = [u for u in x.users if is_call(u, F.linear) and u.args[0] is x]
        names = "/".join(layer_name(u) for u in readers)
        if any(u not in inside or u not in block.clip for u in readers):
            skips.add(names, "not every linear reading its input is quantized in this block: "
                      "no shift or scale learned for it")
            continue
        shifted = absorber(x, readers, True) is not None
        if not shifted and absorber(x, readers, False) is None:
            skips.add(names, "nothing before it can absorb a shift and scale (an explicit "
                      "op would cost a float pass): clip ratios only")
            continue
        k = linear_params(ed, readers[0])[0].shape[1]
        block.groups[x] = _Group(x, readers, torch.zeros(k, requires_grad=True),
                                 torch.zeros(k, requires_grad=True) if shifted else None)
    return block


def _start_clips(gm: GraphModule, ctx: PassContext, block: _Block) -> None:
    """Where weight clipping is on, start each row from quantize-weights' own clip search
    (only for blocks that learn: a reused block takes what was learned)."""
    if not ctx.options.transform_on("weight_clip"):
        return
    calib = ctx.analysis.get("calib") or {}
    ed = WeightEditor(gm)
    with torch.no_grad():
        for lin, clip in block.clip.items():
            spec = block.spec[lin]
            if spec.granularity == "per_tensor":
                continue
            site = calib.get(ann.site(lin.args[0], "input") or "")
            start = clip_search(linear_params(ed, lin)[0].float(), spec,
                                getattr(site, "hessian", None))
            clip.copy_(start.float().clamp(CLIP_MIN, 1.0))


def _learn(gm: GraphModule, ctx: PassContext, block: _Block, inputs: list[dict],
           targets: list[dict], seconds: float | None, counters: dict) -> tuple[bool, str]:
    """Fit block's parameters on all batches but the last, which decides: what was learned
    is kept only if it cuts the block's error there and on the others (with one batch,
    there). (kept, a summary line)."""
    start = [p.detach().clone() for p in block.params()]
    override = _Quantized(gm, ctx, block).override()
    train = list(range(len(inputs) - 1)) or [0]
    held = len(inputs) - 1

    def error(which: list[int]) -> float:
        with torch.no_grad():
            return sum(float(_error(run_segment(gm, block.seg, inputs[i], override),
                                    targets[i])) for i in which)

    before = (error(train), error([held]))
    let = block.let()
    groups = [{"params": list(block.clip.values()), "lr": LR_CLIP}]
    if let:
        groups.append({"params": let, "lr": LR_SHIFT_SCALE})
    opt = torch.optim.Adam(groups)
    t0 = time.perf_counter()
    steps = ctx.options.learn_steps
    done = 0
    for step in range(steps):
        if seconds is not None and time.perf_counter() - t0 > seconds:
            counters["out_of_time"] += 1
            break
        opt.zero_grad(set_to_none=True)
        i = train[step % len(train)]
        _error(run_segment(gm, block.seg, inputs[i], override), targets[i]).backward()
        opt.step()
        with torch.no_grad():
            for c in block.clip.values():
                c.clamp_(CLIP_MIN, 1.0)
        done += 1
    after = (error(train), error([held]))
    took = time.perf_counter() - t0
    cut = f" (time cap: {done} of {steps} steps)" if done < steps else ""
    checked = (f"held-out batch {before[1]:.4g} -> {after[1]:.4g}" if train != [held] else
               "one calibration batch: no held-out check")
    line = (f"output error {before[0]:.4g} -> {after[0]:.4g} ({checked}) in {done} steps, "
            f"{took:.1f} s{cut}")
    if all(a < b * (1 - MIN_GAIN) for a, b in zip(after, before, strict=True)):
        counters["learned"] += 1
        return True, line
    with torch.no_grad():
        for p, s in zip(block.params(), start, strict=True):
            p.copy_(s)
    counters["kept_start"] += 1
    for lin in block.linears:
        ctx.layer(layer_name(lin), "linear").detail["learn"] = (
            f"nothing learned kept: {line}")
    return False, line + ": kept the start"


def _fold(gm: GraphModule, ctx: PassContext, block: _Block, counters: dict) -> None:
    """The block's shifts and scales into the graph (as smooth folds its own), its clip
    ratios onto the layers."""
    for lin, clip in block.clip.items():
        ann.selected(lin).clip = clip.detach().float().clone()
        ctx.layer(layer_name(lin), "linear").detail["learn"] = (
            f"clip ratios learned (mean {float(ann.selected(lin).clip.mean()):.3f})")
        counters["linears"] += 1
    ed = WeightEditor(gm)
    calib = ctx.analysis.get("calib") or {}
    for g in block.groups.values():
        s = g.scale().detach().double()
        z = g.z.detach().double() if g.z is not None else None
        if bool((s == 1).all()) and (z is None or not bool(z.any())):
            continue
        m = Migration("learned", s, z)
        _fold_group(ctx, ed, g.x, g.linears, m)
        site = calib.get(ann.site(g.x, "input") or "")
        if site is not None:
            site.learned = m
        counters["groups"] += 1


def _fold_group(ctx: PassContext, ed: WeightEditor, x: Node, linears: list[Node],
                m: Migration) -> None:
    """Fold m for x's linears, composing it with smooth's Smoothed annotations."""
    found = absorber(x, linears, m.shift is not None)
    if found is None:
        raise RuntimeError(f"learn-transforms: nothing absorbs the learned shift and scale of "
                           f"{x.name} any more")
    prior = {n: ann.get(n, ann.Smoothed) for n in (x, found[1])}
    weights = [linear_params(ed, lin)[0] for lin in linears]
    how = fold_producer(ed, x, linears, m)
    for n, before in prior.items():
        now = ann.get(n, ann.Smoothed)
        if before is not None and now is not None and now is not before:
            # (x - z1) / s1, then (. - z2) / s2: (x - z1 - s1 z2) / (s1 s2)
            s1 = before.divisor.double()
            z1 = before.shift.double() if before.shift is not None else None
            z2 = now.shift.double() if now.shift is not None else None
            shift = None if z1 is None and z2 is None else (
                (z1 if z1 is not None else 0) + (s1 * z2 if z2 is not None else 0))
            ann.put(n, ann.Smoothed(s1 * now.divisor.double(), shift=shift))
    scale_readers(ed, linears, weights, m)
    for lin in linears:
        ctx.layer(layer_name(lin), "linear").transforms.append(
            f"learn({'shift and scale' if m.shift is not None else 'scale'}, into={how})")


def _apply_saved(gm: GraphModule, ctx: PassContext) -> int:
    """A saved quantization's learned shifts and scales, folded again; how many."""
    calib = ctx.analysis.get("calib") or {}
    ed = WeightEditor(gm)
    done = 0
    for x, linears in linear_groups(gm).items():
        site = calib.get(ann.site(x, "input") or "")
        if site is not None and site.learned is not None:
            _fold_group(ctx, ed, x, linears, site.learned)
            done += 1
    return done
