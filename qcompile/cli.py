"""The `qcompile` command.

    qcompile demo [--recipe R]            quantize all-MiniLM-L6-v2, report accuracy and speed
    qcompile tune --shapes 128x4096x4096  tune GEMM shapes (M x K x N), print the configs
    qcompile tune --model minilm          tune every GEMM of the compiled MiniLM at its shapes
    qcompile sensitivity --model minilm --budget a16=0.1
                                          per-site sensitivities, the widths a budget buys,
                                          and the Pareto frontier (a picture) for choosing one
    qcompile recipes                      the recipes and what they do
    qcompile options                      the options torch.compile(..., options=) accepts
"""

from __future__ import annotations

import argparse
import sys

# argparse types: a bad value is a usage error naming the option, before any model loads


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def recipe_name(text: str) -> str:
    from qcompile.config import RECIPES

    if text not in RECIPES:
        raise argparse.ArgumentTypeError(
            f"unknown recipe {text!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return text


def _shapes(text: str) -> str:
    from qcompile.lowering.autotune import parse_shapes

    parse_shapes(text)  # checked here; the tuner parses it again
    return text


def budget(text: str) -> dict[str, float]:
    """"a16=0.1,weight_bits=5" -> {"a16": 0.1, "weight_bits": 5.0}, checked like the option."""
    from qcompile.config import Options, QCompileConfigError

    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not key=number") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r} is not key=number")
    try:
        Options.from_user(None, {"recipe": "mixed", "budget": out})
    except QCompileConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return out


def _sensitivity(args) -> int:
    import os

    import torch

    import qcompile
    from qcompile import minilm

    model, tok = minilm.load()
    calib, evals = minilm.sentences()
    options = {"recipe": "mixed", "budget": args.budget, "sensitivity": args.sensitivity}
    cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
    with torch.no_grad(), qcompile.calibrate(cm):
        for ids, mask in minilm.batches(tok, calib, 16):
            cm(input_ids=ids, attention_mask=mask)
    ref = torch.cat([minilm.embed(model, i, m) for i, m in minilm.batches(tok, evals, 16)])
    emb = torch.cat([minilm.embed(cm, i, m) for i, m in minilm.batches(tok, evals, 16)])
    rep = qcompile.report(cm)
    for plan in rep.precision_plans():
        print(plan.to_text())
        print(f"{'budget':>10} {'cost':>10} {'predicted D':>12} {'measured D':>12}")
        for p in sorted(plan.frontier, key=lambda p: p["cost"]):
            measured = f"{p['measured']:12.3e}" if "measured" in p else f"{'':>12}"
            print(f"{p['budget']:10.4g} {p['cost']:10.4g} {p['predicted']:12.3e} {measured}")
    result = minilm.compare(ref, emb)
    print(f"evaluation sentences: mean cosine {result['cosine_mean']:.5f}, min "
          f"{result['cosine_min']:.5f}, ranking agreement {result['ranking_agreement']:.3f}")
    os.makedirs(args.out, exist_ok=True)
    try:
        path = rep.plot_precision(os.path.join(args.out, "precision-pareto.png"))
        print(f"Pareto frontier: {path}")
    except ImportError as exc:
        print(exc)
    return 0


def _tune(args) -> int:
    if args.shapes:
        from qcompile.lowering.autotune import main as tune_shapes

        return tune_shapes(["--shapes", args.shapes] + (["--cache", args.cache] if args.cache
                                                        else []))
    import torch

    import qcompile
    from qcompile import minilm
    from qcompile.lowering import device
    from qcompile.tune import format_table, tune_model

    model, tok = minilm.load()
    calib, _ = minilm.sentences()
    cm = torch.compile(model, backend="qcompile", options={"recipe": args.recipe})
    with torch.no_grad():
        if qcompile.Options.from_user(None, {"recipe": args.recipe}).needs_calibration:
            with qcompile.calibrate(cm):
                for ids, mask in minilm.batches(tok, calib, 16):
                    cm(input_ids=ids, attention_mask=mask)
        ids, mask = next(minilm.batches(tok, calib, 16))
        cm(input_ids=ids, attention_mask=mask)
    if device.triton_target() != "cuda":
        print("no GPU found: showing the default configs (nothing is timed)")
    print(format_table(tune_model(cm, rows=args.rows, cache_dir=args.cache)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize all-MiniLM-L6-v2 and report")
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    tune = sub.add_parser("tune", help="autotune GEMM kernel configs")
    what = tune.add_mutually_exclusive_group(required=True)
    what.add_argument("--shapes", type=_shapes, help="MxKxN[,MxKxN...]")
    what.add_argument("--model", choices=["minilm"], help="tune every GEMM of this model")
    tune.add_argument("--recipe", type=recipe_name, default="w8a8-static")
    tune.add_argument("--rows", type=positive_int, default=32 * 128,
                      help="M to tune for (tokens)")
    tune.add_argument("--cache", default=None, help="autotune cache directory")
    sen = sub.add_parser("sensitivity", help="per-site sensitivities and the widths a "
                                             "budget buys (recipe 'mixed')")
    sen.add_argument("--model", choices=["minilm"], default="minilm")
    sen.add_argument("--budget", type=budget, default={"a16": 0.1},
                     help="key=value[,key=value]: a16, weight_bits, size, bops")
    sen.add_argument("--sensitivity", choices=["measured", "hessian", "both"], default="both")
    sen.add_argument("--out", default="qcompile-sensitivity", help="folder for the picture")
    sub.add_parser("recipes", help="list the recipes")
    sub.add_parser("options", help="list the options")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from qcompile.demo import main as demo_main

        return demo_main(args.rest)
    if args.command == "tune":
        return _tune(args)
    if args.command == "sensitivity":
        return _sensitivity(args)
    if args.command == "recipes":
        from qcompile.config import RECIPES

        for r in RECIPES.values():
            print(f"{r.name:12} {r.description}")
        return 0
    from qcompile.config import known_options

    print("\n".join(known_options()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
