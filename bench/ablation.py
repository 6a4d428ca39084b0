"""Ablation: each accuracy technique on and off, per recipe, on small random models of the
tested architectures with injected outlier channels, with the calibration time it costs.

Models: tests/models/zoo.py's LLaMA, Mistral, Qwen2, GPT-2 and OPT, built wider (hidden 128)
and given outlier hidden channels the way trained LLMs have them: a few channels of every
norm's weight and of the token embedding multiplied by 20-50 (found generically: every
module with "norm" in its class name and a 1-D weight, and the input embedding; no module
names). Calibrated on 4 batches of random tokens, evaluated on 4 others; the score is the
mean (and min) cosine of the logits to float per token. MiniLM's ablation is in
bench/minilm_accuracy.py (real weights, real sentences).

Techniques (options): none of them, smooth (the searched shift and scale), weight_clip,
bias_correction, each alone, and all three; learn (block-wise learned clip ratios and
shift / scale) alone and with the three; GPTQ and sequential GPTQ with the three; the
recipe's other transforms (rotations, GPTQ) as it has them. Each configuration is a fresh
compile.

    python bench/ablation.py [--only-model llama] [--only-recipe w4a8]
                             [--out bench/results/ablation-outliers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.models.zoo

from _machine import cpu_info  # noqa: E402  (bench/_machine.py: scripts run from bench/)

import qcompile  # noqa: E402
from tests.models import zoo  # noqa: E402

RECIPES = ("w8a8-static", "w4a8", "w4a4", "w4a16")
OFF = {"smooth": False, "weight_clip": False, "bias_correction": False}
TECHNIQUES = {  # each alone on top of the recipe with all three off, then all three
    "none": OFF,
    "smooth": {**OFF, "smooth": True},
    "weight_clip": {**OFF, "weight_clip": True},
    "bias_correction": {**OFF, "bias_correction": True},
    "all": {"smooth": True, "weight_clip": True, "bias_correction": True},
    # the recipe as it comes, and with GPTQ (sequential) on
    "recipe defaults": {},
    "recipe defaults + gptq": {"gptq": True},
    "recipe defaults + mse": {"observer": "mse"},  # static ranges at the MSE best
    # w4a4 only: QuaRot's symmetric per-token int4 activations instead of the default's
    # zero point per token
    "recipe defaults + symmetric activations": {"activation_symmetric": True},
    # recipes with int4 groups (w4a8, w4a16): symmetric groups instead of the default's
    # zero point per group
    "recipe defaults + symmetric groups": {"weight_symmetric": True},
    # block-wise learned clip ratios and shift / scale (passes/learn_transforms.py), alone
    # and on top of the three
    "learn": {**OFF, "learn": True},
    "all + learn": {"smooth": True, "weight_clip": True, "bias_correction": True,
                    "learn": True},
    # GPTQ on the float model's Hessians, then sequential (passes/_sequential.py)
    "all + gptq": {"smooth": True, "weight_clip": True, "bias_correction": True,
                   "gptq": True},
    "all + gptq sequential": {"smooth": True, "weight_clip": True, "bias_correction": True,
                              "gptq": True, "sequential": True},
}
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_layer=2, n_embd=128, n_head=4, n_positions=64, bos_token_id=0,
                  eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=128, pad_token_id=1,
                 bos_token_id=0, eos_token_id=0)),
}
CHANNELS, FACTORS = (7, 61, 100), (20.0, 35.0, 50.0)


def outlier_model(arch: str):
    import transformers

    config, cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(
        vocab_size=zoo.VOCAB, use_cache=False, **kw)).eval()
    hidden = model.get_input_embeddings().weight.shape[1]
    with torch.no_grad():
        for c, f in zip(CHANNELS, FACTORS, strict=True):
            model.get_input_embeddings().weight[:, c] *= f
            for m in model.modules():
                w = getattr(m, "weight", None)
                if "norm" in type(m).__name__.lower() and isinstance(w, torch.nn.Parameter) \
                        and w.dim() == 1 and w.shape[0] == hidden:
                    w[c] *= f
    return model


def batches(seed: int, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, zoo.VOCAB, (4, 32), generator=gen) for _ in range(n)]


def evaluate(model, recipe: str, options: dict, calib, evals, refs) -> dict:
    torch._dynamo.reset()
    opts = {"recipe": recipe, "kernels": "cpu", **options}  # every layer, however small
    cm = torch.compile(model, backend="qcompile", options=opts, dynamic=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        if qcompile.Options.from_user(None, opts).needs_calibration:
            with qcompile.calibrate(cm):
                for ids in calib:
                    cm(input_ids=ids)
        t1 = time.perf_counter()
        outs = [cm(input_ids=ids).logits for ids in evals]
    cos = torch.cat([F.cosine_similarity(o.flatten(0, 1).double(), r.flatten(0, 1).double())
                     for o, r in zip(outs, refs, strict=True)])
    rep = qcompile.report(cm)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "calibrate_and_finalize_s": round(time.perf_counter() - t0, 2),
            "calibration_s": round(t1 - t0, 2),
            "quantized": len(rep.quantized), "layers": len(rep.layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only-model", action="append")
    ap.add_argument("--only-recipe", action="append")
    ap.add_argument("--only-technique", action="append")
    ap.add_argument("--out", default="bench/results/ablation-outliers.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    calib, evals = batches(1), batches(2)
    results: dict = {}
    for arch in args.only_model or ARCHS:
        model = outlier_model(arch)
        with torch.no_grad():
            refs = [model(input_ids=ids).logits for ids in evals]
        for recipe in args.only_recipe or RECIPES:
            for tech, options in TECHNIQUES.items():
                if args.only_technique and tech not in args.only_technique:
                    continue
                try:
                    r = evaluate(model, recipe, options, calib, evals, refs)
                except Exception as exc:  # recorded, never hidden
                    r = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                results.setdefault(arch, {}).setdefault(recipe, {})[tech] = r
                text = r.get("error") or (f"cos mean {r['cosine_mean']:.5f} min "
                                          f"{r['cosine_min']:.5f} quantized {r['quantized']}/"
                                          f"{r['layers']} {r['calibrate_and_finalize_s']} s")
                print(f"{arch:8s} {recipe:12s} {tech:16s} {text}", flush=True)
    meta = {"models": "random transformers configs (hidden 128, 2 layers) with outlier "
                      f"channels {CHANNELS} x {FACTORS} in every norm weight and the "
                      "embedding", "calibration": "4 batches of 4 x 32 random tokens",
            "evaluation": "4 other batches; cosine of logits to float per token",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **cpu_info()}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
