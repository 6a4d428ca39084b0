"""Where w4a4 loses perplexity on Gemma 3 270M: a float simulation, linear type by type.

    python bench/gemma_w4a4_budget.py [--out bench/results/gemma3-270m-w4a4-budget.json]

Every linear of the decoder layers is simulated as recipe w4a4 runs it, in float: the
input rotated by its Hadamard (the o projections' per head, as rotate-heads does; every
other input by the whole-width online Hadamard, Gemma 3 being a post-norm graph here),
quantized per token to int4 with a zero point and the recipe's clip ratio (qcompile's own
fake quantizer, the one smooth and learn-transforms use), against the rotated weight
rounded to int4 per output channel as the recipe rounds it (round to nearest, no GPTQ,
no clip search). Then
perplexity on bench/gemma_perplexity.py's text windows (and its first 512 tokens) with
  - activations only (weights float), weights only, both;
  - activations only, one linear type at a time (which inputs cost the most);
  - activations only at other clip ratios; the o projections' inputs rotated whole-width;
  - activations only, each linear's clip ratio the one of CLIPS with the least output error
    ||(Q(x) - x) W^T||^2 on rows of its inputs over the calibration windows (12, with
    gemma_perplexity's --more-calibration texts): a per-layer clip search;
  - activations only, quantized per token in groups of G along K with float group scales
    (Atom's group-wise activations): what a finer activation grid would buy;
  - activations only, in groups as options activation_group_size runs them
    (quantize_int4_groups: symmetric, each group's scale the token's times an integer in
    1..15), at several clip ratios.
It answers how much of the 1.15x budget int4 activations alone take before any weight is
rounded; the compiled recipe's own numbers are in gemma3-270m-perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections import Counter

import _gemma
import _machine
import torch
from gemma_perplexity import (
    TEXT,
    more_calibration_windows,
    text_perplexities,
    text_windows,
    token_windows,
)

from qcompile.config import DEFAULT_ACTIVATION_CLIP
from qcompile.hadamard import hadamard_matrix
from qcompile.numerics.specs import QuantSpec
from qcompile.passes._fake_quant import fake_token, fake_token_groups, fake_weight

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rotation(n: int) -> torch.Tensor:
    return (hadamard_matrix(n, torch.float64) / math.sqrt(n)).float()


def int4_rows(w: torch.Tensor) -> torch.Tensor:
    """w4a4's weights, int4 per output channel, round to nearest, dequantized: qcompile's
    own fake quantizer under the recipe's spec, no clip."""
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    return fake_weight(w, torch.ones(w.shape[0]), spec)


class Simulation:
    def __init__(self, model, head_dim: int):
        self.linears = {n: m for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in n}
        self.weights = {n: m.weight.data.clone() for n, m in self.linears.items()}
        self.head_dim = head_dim
        self.hooks = []

    def rotation_for(self, name: str, k: int, whole_width_o: bool) -> torch.Tensor:
        if name.endswith("o_proj") and not whole_width_o:
            return torch.block_diag(*[rotation(self.head_dim)] * (k // self.head_dim))
        return rotation(k)

    def set(self, which=lambda name: True, weights=True, activations=True,
            clip=DEFAULT_ACTIVATION_CLIP, whole_width_o=False, group=None,
            int_groups=None) -> None:
        """clip: one ratio, or a dict linear name -> ratio; group: activations quantized in
        groups of that many along K with float scales and zero points (None: the whole
        row); int_groups: in groups of that many as quantize_int4_groups rounds them."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for name, m in self.linears.items():
            m.weight.data = self.weights[name].clone()
            if not which(name):
                continue
            r = self.rotation_for(name, m.in_features, whole_width_o)
            w = self.weights[name] @ r
            m.weight.data = int4_rows(w) if weights else w

            ratio = clip[name] if isinstance(clip, dict) else clip

            def rotate_and_quantize(_mod, args, r=r, c=ratio):
                x = args[0] @ r
                if not activations:
                    return (x,)
                if int_groups is not None:
                    return (fake_token_groups(x, int_groups, c),)
                if group is None:
                    return (fake_token(x, 4, c, symmetric=False),)
                shape = x.shape
                grouped = x.reshape(*shape[:-1], shape[-1] // group, group)
                return (fake_token(grouped, 4, c, symmetric=False).reshape(shape),)

            self.hooks.append(m.register_forward_pre_hook(rotate_and_quantize))


    def searched_clips(self, model, calib: torch.Tensor, rows: int = 512) -> dict:
        """Each linear's clip of CLIPS with the least ||(Q(x) - x) W^T||^2 (weights float)
        on `rows` random rows of its rotated inputs per calibration batch of two windows."""
        gen = torch.Generator().manual_seed(0)
        seen: dict[str, list] = {}
        hooks = []
        for name, m in self.linears.items():
            r = self.rotation_for(name, m.in_features, False)

            def keep(_mod, args, name=name, r=r):
                x = args[0].reshape(-1, args[0].shape[-1])
                pick = torch.randperm(x.shape[0], generator=gen)[:rows]
                seen.setdefault(name, []).append(x[pick] @ r)

            hooks.append(m.register_forward_pre_hook(keep))
        with torch.no_grad():
            for batch in calib.split(2):
                model(input_ids=batch, use_cache=False)
        for h in hooks:
            h.remove()
        best = {}
        for name, m in self.linears.items():
            x = torch.cat(seen[name])
            w = (self.weights[name] @ self.rotation_for(name, m.in_features, False)).T
            errors = [(fake_token(x, 4, c, symmetric=False) - x).matmul(w).pow(2).sum().item()
                      for c in CLIPS]
            best[name] = CLIPS[min(range(len(CLIPS)), key=errors.__getitem__)]
        return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gemma3-270m-w4a4-budget.json")
    ap.add_argument("--only", action="append", help="run(s) to do (the file keeps the rest)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model, tok = _gemma.load()
    text = text_windows(tok)
    sim = Simulation(model, model.config.head_dim)
    float_ppl, float_text_ppl = text_perplexities(model, text)
    per_layer = "activations only, per-layer clip (least output error)"
    runs = {
        "activations and weights": {},
        "activations only": {"weights": False},
        "weights only": {"activations": False},
        **{f"activations only, {t} inputs only": {"weights": False,
                                                   "which": lambda n, t=t: n.endswith(t)}
           for t in TYPES},
        **{f"activations only, clip {c}": {"weights": False, "clip": c}
           for c in (0.7, 0.9, 1.0)},
        "activations only, o_proj inputs only, rotated whole-width": {
            "weights": False, "which": lambda n: n.endswith("o_proj"), "whole_width_o": True},
        per_layer: {"weights": False},  # clip: searched below, only when asked for
        **{f"activations only, groups of {g}, clip 0.9": {"weights": False, "group": g,
                                                           "clip": 0.9}
           for g in (128, 64, 32)},
        **{f"activations only, integer-scaled groups of 16, clip {c}": {
            "weights": False, "int_groups": 16, "clip": c} for c in (1.0, 0.95, 0.9, 0.85, 0.8)},
        **{f"activations only, integer-scaled groups of {g}, clip 0.9": {
            "weights": False, "int_groups": g, "clip": 0.9} for g in (32, 8)},
    }
    results = _machine.earlier_results(args.out) if args.only else {}
    print(f"{'float':58s} first 512 {float_ppl:8.3f}, text {float_text_ppl:8.3f}")
    for name, kw in runs.items():
        if args.only and name not in args.only:
            continue
        if name == per_layer:
            calib = torch.cat([token_windows(tok)[1], more_calibration_windows(tok)])
            kw = {**kw, "clip": sim.searched_clips(model, calib)}
        sim.set(**kw)
        ppl, text_ppl = text_perplexities(model, text)
        results[name] = {**({"clips": dict(sorted(Counter(kw["clip"].values()).items()))}
                            if isinstance(kw.get("clip"), dict) else {}),
                         "perplexity": ppl, "ratio_to_float": ppl / float_ppl,
                         "text_perplexity": text_ppl,
                         "text_ratio_to_float": text_ppl / float_text_ppl,
                         # the file keeps earlier runs' results (--only): each names its
                         # machine (a rounding flip moves these by percents, see README)
                         "machine": _machine.cpu_info()["capabilities"],
                         "date": time.strftime("%Y-%m-%d")}
        print(f"{name:58s} first 512 ratio {ppl / float_ppl:.4f}, text ratio "
              f"{text_ppl / float_text_ppl:.4f}", flush=True)
    meta = {"model": _gemma.NAME, "text": TEXT,
            "float_perplexity": float_ppl, "float_text_perplexity": float_text_ppl,
            "text_windows": len(text), "activation_clip": DEFAULT_ACTIVATION_CLIP,
            "simulation": __doc__.split("\n\n")[1].replace("\n", " "),
            "torch": torch.__version__, "machine": _machine.cpu_info(),
            "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
