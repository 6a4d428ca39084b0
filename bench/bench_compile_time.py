"""Compile time against model depth: qcompile's first call on LLaMA-shaped models.

Models: LLaMA-shaped, random weights, hidden 256, MLP 688, 4 heads, vocab 1000, with
1, 2, 4, 8 and 16 layers; input batch 1 x 128 tokens. Recipes:
  float        options {"recipe": "float"}: capture and canonicalize only
  w8a8         dynamic activations: the whole pipeline runs in the first call
  w8a8-static  the first call runs inside `qcompile.calibrate` (Dynamo + compile phase +
               observers on one calibration batch); leaving the block finalizes (weight
               quantization, rewrites, lowering, SQNR); then the first real call
  inductor     (--inductor) torch.compile(model) with Inductor, for scale; its on-disk FX
               graph cache is off for this compile (options={"fx_graph_cache": False}), else
               every repeat after the first would time a cache hit

What is timed, per (layers, recipe): from the compile call to the end of the first real
call, wall and process CPU time; for w8a8-static also
the two parts (first call under calibration, finalize + first call). The per-pass
breakdown comes from `qcompile.report(cm).graphs[i].passes` (PassRecord name, seconds;
summed over graphs); "other" = total wall - all passes: Dynamo tracing, guards, the
calibration batch and the first execution. Dynamo is reset before every compile.

Why one thread (the default, --threads): compile work is single-threaded anyway, and on a
shared machine OpenMP threads spin while a sibling thread waits for a core, which inflates
both wall and CPU time several-fold at random; with one thread the CPU time is the number
that does not move when other jobs share the machine.

Why warm-up and repeats: the first compile in a process pays one-time costs (imports,
kernels compiled once per signature); each recipe compiles a 1-layer model once before
timing (reported as cold_s). Repeats run interleaved (every size and recipe once per
repeat); the table shows medians, and a least-squares line over the layer counts gives
seconds per layer.

Run: python bench/bench_compile_time.py [--layers 1,2,4,8,16] [--repeats 3] [--inductor]
         [--threads 1] [--quick] [--out DIR]
Writes bench/results/compile-time-<host>-<isa>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from _machine import cpu_info, results_slug  # bench/_machine.py: scripts run from bench/

import qcompile

RECIPES = ["float", "w8a8", "w8a8-static"]
CONFIG = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_attention_heads=4,
              num_key_value_heads=4)


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG, num_hidden_layers=layers)).eval()


def _ids(seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=g)


@torch.no_grad()
def compile_once(layers: int, recipe: str, seq: int) -> dict:
    """One cold-Dynamo compile; seconds from torch.compile to the end of the first call."""
    torch._dynamo.reset()
    model = build(layers)
    x, calib = _ids(seq, 0), _ids(seq, 1)
    wall, cpu = time.perf_counter(), time.process_time()
    row: dict = {"layers": layers, "recipe": recipe}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if recipe == "inductor":
            cm = torch.compile(model, options={"fx_graph_cache": False})
        else:
            cm = torch.compile(model, backend="qcompile", options={"recipe": recipe})
        if recipe != "inductor" and qcompile.RECIPES[recipe].needs_calibration:
            with qcompile.calibrate(cm, progress=False):
                cm(input_ids=calib)
                row["calibration_call_s"] = round(time.perf_counter() - wall, 3)
            row["finalize_s"] = round(time.perf_counter() - wall - row["calibration_call_s"], 3)
        cm(input_ids=x)
    row["wall_s"] = round(time.perf_counter() - wall, 3)
    row["cpu_s"] = round(time.process_time() - cpu, 3)
    t0 = time.perf_counter()
    cm(input_ids=x)
    row["second_call_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    if recipe != "inductor":
        rep = qcompile.report(cm)
        passes: dict[str, float] = defaultdict(float)
        for g in rep.graphs:
            for rec in g.passes:
                passes[rec.name] += rec.seconds
        row["graphs"] = len(rep.graphs)
        row["quantized"] = len(rep.quantized)
        row["passes_s"] = {k: round(v, 4) for k, v in passes.items()}
        row["other_s"] = round(row["wall_s"] - sum(passes.values()), 3)
    return row


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = intercept + slope * x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"slope_s_per_layer": round(slope, 4), "intercept_s": round(my - slope * mx, 3)}


def _machine() -> dict:
    import transformers

    info = {"host": socket.gethostname().split(".")[0] or "host", "cores": os.cpu_count(),
            **cpu_info(), "torch": torch.__version__,
            "transformers": transformers.__version__, "qcompile": qcompile.__version__,
            "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    root = Path(__file__).resolve().parent.parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True,  # noqa: E731
                                        text=True, timeout=30).stdout.strip()
        info["commit"] = git("rev-parse", "--short", "HEAD")
        info["uncommitted"] = git("status", "--porcelain", "--", "qcompile", "passes",
                                  "lowering").splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", default="1,2,4,8,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--inductor", action="store_true", help="also time torch.compile (Inductor)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    p.add_argument("--quick", action="store_true", help="layers 1,2; one repeat")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [1, 2] if args.quick else [int(x) for x in args.layers.split(",")]
    repeats = 1 if args.quick else args.repeats
    recipes = RECIPES + (["inductor"] if args.inductor else [])
    info = _machine()
    run = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
           "config": CONFIG, "seq": args.seq, "layers": layers, "repeats": repeats,
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    print(f"{info['cpu']}, {run['threads']} threads, torch {info['torch']}, "
          f"load average {run['loadavg_before']}")
    cold = {}
    for recipe in recipes:  # one-time costs land here, not on the first measured size
        cold[recipe] = compile_once(1, recipe, args.seq)["wall_s"]
    print("cold first compile (1 layer), s: " + ", ".join(f"{k} {v}" for k, v in cold.items()))
    rows = []
    for rep in range(repeats):
        for n in layers:
            for recipe in recipes:
                row = compile_once(n, recipe, args.seq)
                row["repeat"] = rep
                rows.append(row)
                print(f"  repeat {rep} layers {n:2} {recipe:12} {row['wall_s']:7.2f} s wall "
                      f"{row['cpu_s']:7.2f} s cpu", file=sys.stderr, flush=True)
    table: dict[str, dict] = {}
    print(f"\n{'recipe':12} {'layers':>6} {'wall s':>8} {'cpu s':>8} {'other s':>8}  "
          "top passes (s)")
    for recipe in recipes:
        per = table[recipe] = {"cold_s": cold[recipe], "by_layers": {}}
        for n in layers:
            mine = [r for r in rows if r["recipe"] == recipe and r["layers"] == n]
            med = {k: round(statistics.median(r[k] for r in mine), 3)
                   for k in ("wall_s", "cpu_s", "second_call_ms")}
            med["min_wall_s"] = min(r["wall_s"] for r in mine)
            for k in ("calibration_call_s", "finalize_s", "other_s"):
                if k in mine[0]:
                    med[k] = round(statistics.median(r[k] for r in mine), 3)
            if "passes_s" in mine[0]:
                med["passes_s"] = {k: round(statistics.median(r["passes_s"].get(k, 0.0)
                                                              for r in mine), 4)
                                   for k in mine[0]["passes_s"]}
                med["quantized"] = mine[0]["quantized"]
            per["by_layers"][n] = med
            top = sorted(med.get("passes_s", {}).items(), key=lambda kv: -kv[1])[:4]
            tops = ", ".join(f"{k} {v:.2f}" for k, v in top)
            print(f"{recipe:12} {n:6} {med['wall_s']:8.2f} {med['cpu_s']:8.2f} "
                  f"{med.get('other_s', float('nan')):8.2f}  {tops}")
        xs = [float(n) for n in layers]
        per["fit_wall"] = fit(xs, [per["by_layers"][n]["wall_s"] for n in layers])
        per["fit_cpu"] = fit(xs, [per["by_layers"][n]["cpu_s"] for n in layers])
        names = per["by_layers"][layers[0]].get("passes_s", {})
        per["fit_passes"] = {
            k: fit(xs, [per["by_layers"][n]["passes_s"].get(k, 0.0) for n in layers])
            ["slope_s_per_layer"] for k in names}
    print(f"\n{'recipe':12} {'wall s/layer':>13} {'wall intercept':>15} {'cpu s/layer':>12}  "
          "steepest passes (s/layer)")
    for recipe, per in table.items():
        steep = sorted(per["fit_passes"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{recipe:12} {per['fit_wall']['slope_s_per_layer']:13.3f} "
              f"{per['fit_wall']['intercept_s']:15.2f} {per['fit_cpu']['slope_s_per_layer']:12.3f}"
              "  " + ", ".join(f"{k} {v:.3f}" for k, v in steep))
    run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {run['loadavg_before']}, after {run['loadavg_after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-time-{results_slug()}.json"
    path.write_text(json.dumps({**info, **run, "recipes": table, "rows": rows}, indent=1)
                    + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
