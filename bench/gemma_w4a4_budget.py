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
  - activations only at other clip ratios; the o projections' inputs rotated whole-width.
It answers how much of the 1.15x budget int4 activations alone take before any weight is
rounded; the compiled recipe's own numbers are in gemma3-270m-perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import _gemma
import _machine
import torch
from gemma_perplexity import TEXT, text_perplexities, text_windows

from qcompile.config import DEFAULT_ACTIVATION_CLIP
from qcompile.hadamard import hadamard_matrix
from qcompile.numerics.specs import QuantSpec
from qcompile.passes._fake_quant import fake_token, fake_weight

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
            clip=DEFAULT_ACTIVATION_CLIP, whole_width_o=False) -> None:
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

            def rotate_and_quantize(_mod, args, r=r):
                x = args[0] @ r
                return (fake_token(x, 4, clip, symmetric=False) if activations else x,)

            self.hooks.append(m.register_forward_pre_hook(rotate_and_quantize))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gemma3-270m-w4a4-budget.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model, tok = _gemma.load()
    text = text_windows(tok)
    sim = Simulation(model, model.config.head_dim)
    float_ppl, float_text_ppl = text_perplexities(model, text)
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
    }
    results = {}
    print(f"{'float':58s} first 512 {float_ppl:8.3f}, text {float_text_ppl:8.3f}")
    for name, kw in runs.items():
        sim.set(**kw)
        ppl, text_ppl = text_perplexities(model, text)
        results[name] = {"perplexity": ppl, "ratio_to_float": ppl / float_ppl,
                         "text_perplexity": text_ppl,
                         "text_ratio_to_float": text_ppl / float_text_ppl}
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
