"""CPU linear layers: qcompile's int8 path vs float matmul vs torchao, same shapes, same run.

What is timed, per shape (M tokens, K -> N features), all on CPU:
  float         F.linear in float32 (the unquantized layer)
  int_mm        torch._int_mm alone: the int8 GEMM floor, no epilogue
  ours-static   cpu_gemm_int8, int8 in -> bias + per-channel dyadic requant -> int8 out
                (w8a8-static: the integer-only path a calibrated model runs)
  ours-dynamic  per-token quantize of float x + cpu_gemm_int8 with the float epilogue
                (w8a8 dynamic: float in, float out, like torchao's); the quantizer
                (lowering.kernels.quantize) as shipped: eager torch ops
  ours-dyn-cq   the same with the quantizer under torch.compile (checked bit-identical)
  torchao       torchao quantize_(Int8DynamicActivationInt8WeightConfig()) under
                torch.compile (when torchao imports; otherwise the row says why)

Why interleaved: this machine is shared, so implementations run in turns within each
round and the median over rounds is reported (and the minimum, the least disturbed run).

Run: python bench/bench_cpu_linear.py [--threads N] [--clock wall|cpu] [--quick] [--out DIR]
Writes bench/results/cpu-linear-<host>.json; each (clock, threads) setting is one run in
it. On a shared machine, `--threads 1 --clock cpu` gives numbers that do not depend on
what else is running; the default (all threads, wall clock) is what a user would see.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_model  # bench/_machine.py: scripts run from bench/

from qcompile.lowering.cpu import cpu_gemm_int8, int_mm, prepare_weight
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, Requantize
from qcompile.lowering.kernels.quantize import quantize_per_token
from qcompile.lowering.reference import random_operands

# (label, M, K, N): BERT-mini / MiniLM (batch 32 x seq 128, hidden 384, MLP 1536), then
# LLaMA-ish projections (4096 -> 11008 for a 128-token prefill chunk; one decode token).
SHAPES = [
    ("minilm qkv/out 384->384", 4096, 384, 384),
    ("minilm mlp up 384->1536", 4096, 384, 1536),
    ("minilm mlp down 1536->384", 4096, 1536, 384),
    ("llama up 4096->11008, 128 tokens", 128, 4096, 11008),
    ("llama 4096->4096, decode", 1, 4096, 4096),
]
STATIC = Epilogue((Bias(), Requantize(per_channel=True)))
# The per-token quantizer as shipped runs eagerly (~7 passes over x); compiled, it is one.
QUANTIZE_COMPILED = torch.compile(quantize_per_token, dynamic=True)
DYNAMIC = Epilogue((Dequantize("float32", has_bias=True),))


COLUMNS = ["float", "int_mm", "ours-static", "ours-dynamic", "ours-dyn-cq", "torchao"]


def _torchao_linear(w: torch.Tensor, b: torch.Tensor):
    """A compiled torchao int8-dynamic Linear, or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"torchao not usable: {type(e).__name__}: {e}"
    lin = torch.nn.Linear(w.shape[1], w.shape[0]).eval()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    try:
        quantize_(lin, Int8DynamicActivationInt8WeightConfig())
        return torch.compile(lin), f"torchao {torchao.__version__}"
    except Exception as e:  # noqa: BLE001
        return None, f"torchao quantize_ failed: {type(e).__name__}: {e}"


CLOCKS = {
    # wall: latency as a user sees it, disturbed by whatever else runs on the machine.
    "wall": time.perf_counter,
    # cpu: CPU time of this process, all threads summed: robust on a shared machine, and
    # equal to latency when run with --threads 1 on an idle core.
    "cpu": time.process_time,
}


def _rounds(fns: dict, rounds: int, clock) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    return times


@torch.no_grad()
def bench_shape(label: str, m: int, k: int, n: int, rounds: int, clock) -> dict:
    a, w_int8, vals = random_operands(STATIC, m, n, k, seed=0)
    # Re-laid out once per layer at compile time: K-major for prefill; for a single token
    # the plain [N, K] rows are faster (bench/README.md).
    w_packed = prepare_weight(w_int8) if m > 1 else w_int8
    x = torch.randn(m, k)
    w = torch.randn(n, k) / k**0.5
    b = torch.randn(n)
    w_scale = (w.abs().amax(dim=1) / 127).float()  # [N]
    wq = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    wq_packed = prepare_weight(wq) if m > 1 else wq

    def ours_dynamic(quantize=quantize_per_token):
        xq, x_scale = quantize(x)  # int8 [M, K], float32 [M]
        return cpu_gemm_int8(xq, wq_packed, DYNAMIC, row_scale=x_scale, col_scale=w_scale,
                             float_bias=b)

    fns = {
        "float": lambda: F.linear(x, w, b),
        "int_mm": lambda: int_mm(a, w_packed),
        "ours-static": lambda: cpu_gemm_int8(a, w_packed, STATIC, **vals),
        "ours-dynamic": ours_dynamic,
        "ours-dyn-cq": lambda: ours_dynamic(QUANTIZE_COMPILED),
    }
    ao, ao_note = _torchao_linear(w, b)
    if ao is not None:
        fns["torchao"] = lambda: ao(x)
    compile_s = {}
    for name, fn in fns.items():  # warm up: compiles happen here, timed separately
        t0 = time.perf_counter()
        fn()
        compile_s[name] = round(time.perf_counter() - t0, 3)
        fn()
    times = _rounds(fns, rounds, clock)
    xq_e, xs_e = quantize_per_token(x)
    xq_c, xs_c = QUANTIZE_COMPILED(x)
    same_quant = bool(torch.equal(xq_e, xq_c) and torch.equal(xs_e, xs_c))
    ref = F.linear(x, w, b)
    err = {name: float((fns[name]() - ref).abs().max() / ref.abs().max())
           for name in ("ours-dynamic", "ours-dyn-cq", "torchao") if name in fns}
    med = {name: statistics.median(t) for name, t in times.items()}
    row = {
        "label": label, "M": m, "K": k, "N": n, "rounds": rounds,
        "median_ms": {kk: round(v, 4) for kk, v in med.items()},
        "min_ms": {kk: round(min(t), 4) for kk, t in times.items()},
        "float_over": {kk: round(med["float"] / v, 2) for kk, v in med.items()},
        "first_call_s": compile_s,
        "max_rel_err_vs_float": err,
        "torchao": ao_note,
        "compiled_quantizer_bit_identical": same_quant,
    }
    if "torchao" in med:
        row["torchao_over_ours_dyn_cq"] = round(med["torchao"] / med["ours-dyn-cq"], 2)
    return row


def _machine() -> dict:
    info = {"host": socket.gethostname().split(".")[0] or "host",
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}
    info["cpu"] = cpu_model() or info["cpu"]
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds, MiniLM shapes only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # before anything is compiled
    info = _machine()
    run_name = f"{args.clock}-{torch.get_num_threads()}threads"
    run = {"clock": args.clock, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           # Other work on the machine shows up here; wall medians mean little when high.
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    print(f"{info['cpu']}, {run['threads']} threads, {args.clock} clock, torch {info['torch']}")
    print(f"{'shape':34} {'MxKxN':>16}" + "".join(f" {n:>13}" for n in COLUMNS)
          + "   (median ms; x = float / it)")
    rows = []
    for label, m, k, n in SHAPES[:3] if args.quick else SHAPES:
        rounds = 3 if args.quick else (7 if m * k * n > 4e9 else 15)
        row = bench_shape(label, m, k, n, rounds, CLOCKS[args.clock])
        rows.append(row)
        cells = ""
        for name in COLUMNS:
            ms = row["median_ms"].get(name)
            cells += f" {ms:7.2f} {row['float_over'][name]:4.1f}x" if ms else f" {'-':>13}"
        print(f"{label:34} {f'{m}x{k}x{n}':>16}{cells}", flush=True)
    run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{rows[0]['torchao']}; load average before {run['loadavg_before']}, "
          f"after {run['loadavg_after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-linear-{info['host']}.json"
    # One file per host; each clock/threads setting is one run in it, the latest kept.
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(info)
    data.setdefault("runs", {})[run_name] = {**run, "results": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} (run {run_name!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
