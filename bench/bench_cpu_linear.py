"""CPU linear layers: qcompile's quantized ops vs float matmul vs torchao, same shapes, run.

What is timed, per shape (M tokens, K -> N features), all on CPU, through the registered
ops a compiled model runs (lowering/ops.py), each on the CPU route lower would bind for
this M and these weights on this machine (lowering/cpu_routes.py; the route is in the
results):
  float         F.linear in float32 (the unquantized layer)
  ours-static   quantize (static, per tensor) + linear_int8_dq: float in -> int8 GEMM ->
                the accumulator dequantized (w8a8-static, a linear feeding a float island)
  ours-requant  linear_int8 alone: int8 in -> bias + per-channel dyadic requant -> int8 out
                (w8a8-static between integer ops)
  ours-dynamic  linear_dynamic: per-token quantize of float x, int8 GEMM, float epilogue
                (w8a8, float in, float out, like torchao's)
  qcompile-static / qcompile-dynamic
                an nn.Linear through torch.compile(backend="qcompile") with recipe
                w8a8-static (calibrated on x) / w8a8, kernels="auto": what a user's model
                runs, Inductor fusing the quantization and the epilogue around the GEMM
                (lowering/inline.py); select-layers may keep the layer float where no int8
                route beats float here (the row's "qcompile_layer" says)
  torchao       torchao quantize_(Int8DynamicActivationInt8WeightConfig()) under
                torch.compile (when torchao imports; otherwise the row says why)
  pt2e          PT2E's x86 path: torchao's X86InductorQuantizer (static per-tensor
                activations, per-channel weights), prepare / calibrate / convert, then
                torch.compile with Inductor freezing, which lowers it to oneDNN's qlinear
                (u8 activations with full-range int8 weights: on CPUs without VNNI those
                saturate int16 pairs, so it is fast but not exact there)
Weights are in the range the CPU's fast route needs (7-bit without VNNI: what qcompile's
select-layers gives a model on this machine).

Why interleaved: this machine is shared, so implementations run in turns within each
round and the median over rounds is reported (and the minimum, the least disturbed run).

Run: python bench/bench_cpu_linear.py [--threads N] [--clock wall|cpu] [--quick] [--out DIR]
Writes bench/results/cpu-linear-<host>-<isa>.json; each (clock, threads) setting is one run in
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

# bench/_machine.py (run from bench/)
from _machine import CLOCKS, cpu_info, results_slug, warm_then_interleaved

from qcompile.lowering import cpu, cpu_routes, ops
from qcompile.numerics.dyadic import quantize_multiplier

# (label, M, K, N): BERT-mini / MiniLM (batch 32 x seq 128, hidden 384, MLP 1536), then
# LLaMA-ish projections (4096 -> 11008 for a 128-token prefill chunk; one decode token).
SHAPES = [
    ("minilm qkv/out 384->384", 4096, 384, 384),
    ("minilm mlp up 384->1536", 4096, 384, 1536),
    ("minilm mlp down 1536->384", 4096, 1536, 384),
    ("llama up 4096->11008, 128 tokens", 128, 4096, 11008),
    ("llama 4096->4096, 64 tokens", 64, 4096, 4096),
    ("llama 4096->4096, decode", 1, 4096, 4096),
]
COLUMNS = ["float", "ours-static", "ours-requant", "ours-dynamic", "qcompile-static",
           "qcompile-dynamic", "torchao", "pt2e"]


def _qcompile_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, recipe: str):
    """An nn.Linear compiled by qcompile (calibrated on x for a static recipe), and how
    its report says the layer runs."""
    import qcompile

    torch._dynamo.reset()
    cm = torch.compile(_linear_module(w, b), backend="qcompile", options={"recipe": recipe})
    if qcompile.Options.from_user(None, {"recipe": recipe}).needs_calibration:
        with qcompile.calibrate(cm):
            cm(x)
    cm(x)
    (layer,) = qcompile.report(cm).layers
    how = layer.kernel if layer.quantized else f"float: {layer.reason}"
    return cm, how


def _pt2e_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """PT2E's x86 static int8 Linear, compiled with freezing, or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"PT2E (torchao.quantization.pt2e) not usable: {type(e).__name__}: {e}"
    lin = _linear_module(w, b)
    try:
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        exported = torch.export.export(lin, (x,)).module()
        prepared = prepare_pt2e(exported, quantizer)
        prepared(x)  # calibration
        converted = convert_pt2e(prepared)
        # PT2E's documented CPU recipe: Inductor with freezing (a benchmark's choice; the
        # library itself never sets Inductor's config)
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(converted)
            compiled(x)
        return compiled, "PT2E X86InductorQuantizer + freezing"
    except Exception as e:  # noqa: BLE001
        return None, f"PT2E failed: {type(e).__name__}: {e}"


def _linear_module(w: torch.Tensor, b: torch.Tensor) -> torch.nn.Linear:
    """An eval-mode nn.Linear holding w and b (what the quantization toolkits take)."""
    lin = torch.nn.Linear(w.shape[1], w.shape[0]).eval()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _torchao_linear(w: torch.Tensor, b: torch.Tensor):
    """A compiled torchao int8-dynamic Linear, or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"torchao not usable: {type(e).__name__}: {e}"
    lin = _linear_module(w, b)
    try:
        quantize_(lin, Int8DynamicActivationInt8WeightConfig())
        return torch.compile(lin), f"torchao {torchao.__version__}"
    except Exception as e:  # noqa: BLE001
        return None, f"torchao quantize_ failed: {type(e).__name__}: {e}"






@torch.no_grad()
def bench_shape(label: str, m: int, k: int, n: int, rounds: int, clock) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    caps = cpu_routes.cpu_capabilities()
    qmax = (cpu_routes.narrow_weight_range(caps) or cpu_routes.FULL_RANGE)[1]
    w_scale = (w.abs().amax(dim=1) / qmax).float()  # [N]
    wq = torch.round(w / w_scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    route = cpu.route_for(m, wq).name
    s_x, zp_x = float(x.abs().max() / 127), 3
    xq = ops.quantize(x, s_x, zp_x, -128, 127, impl="cpu")
    zp_term = (zp_x * wq.long().sum(1)).to(torch.int32)
    bias_i32 = torch.round(b.double() / (s_x * w_scale.double())).to(torch.int32)
    q, shift = quantize_multiplier(s_x * w_scale.double() / 0.05)
    impl = f"cpu-{route}"

    fns = {
        "float": lambda: F.linear(x, w, b),
        "ours-static": lambda: ops.linear_int8_dq(
            ops.quantize(x, s_x, zp_x, -128, 127, impl="cpu"), wq, b, zp_term, s_x, w_scale,
            torch.float32, impl=impl),
        "ours-requant": lambda: ops.linear_int8(xq, wq, bias_i32, zp_term, q, shift, 0, -128,
                                                127, impl=impl),
        "ours-dynamic": lambda: ops.linear_dynamic(x, wq, w_scale, b, impl=impl),
    }
    layers = {}
    for name, recipe in (("qcompile-static", "w8a8-static"), ("qcompile-dynamic", "w8a8")):
        compiled, layers[name] = _qcompile_linear(x, w, b, recipe)
        fns[name] = lambda compiled=compiled: compiled(x)
    ao, ao_note = _torchao_linear(w, b)
    if ao is not None:
        fns["torchao"] = lambda: ao(x)
    pt2e, pt2e_note = _pt2e_linear(x, w, b)
    if pt2e is not None:
        fns["pt2e"] = lambda: pt2e(x)
    compile_s, times = warm_then_interleaved(fns, rounds, clock)
    ref = F.linear(x, w, b)
    err = {name: float((fns[name]() - ref).abs().max() / ref.abs().max())
           for name in ("ours-static", "ours-dynamic", "qcompile-static", "qcompile-dynamic",
                        "torchao", "pt2e") if name in fns}
    same = {name: bool(torch.equal(fns[name](), getattr(ops, op)(*args, impl="reference")))
            for name, op, args in (
                ("ours-dynamic", "linear_dynamic", (x, wq, w_scale, b)),
                ("ours-requant", "linear_int8", (xq, wq, bias_i32, zp_term, q, shift, 0,
                                                 -128, 127)))}
    med = {name: statistics.median(t) for name, t in times.items()}
    row = {
        "label": label, "M": m, "K": k, "N": n, "rounds": rounds, "route": route,
        "weight_qmax": qmax,
        "median_ms": {kk: round(v, 4) for kk, v in med.items()},
        "min_ms": {kk: round(min(t), 4) for kk, t in times.items()},
        "float_over": {kk: round(med["float"] / v, 2) for kk, v in med.items()},
        "first_call_s": compile_s,
        "max_rel_err_vs_float": err,
        "bit_identical_to_reference": same,
        "qcompile_layer": layers,
        "torchao": ao_note,
        "pt2e": pt2e_note,
    }
    if "torchao" in med:
        row["torchao_over_ours_dynamic"] = round(med["torchao"] / med["ours-dynamic"], 2)
    return row


def _machine() -> dict:
    return {"host": socket.gethostname().split(".")[0] or "host", "cores": os.cpu_count(),
            **cpu_info(), "torch": torch.__version__, "python": platform.python_version()}


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
    print(f"{info['capabilities']}, {run['threads']} threads, {args.clock} clock, "
          f"torch {info['torch']}")
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
    path = out / f"cpu-linear-{results_slug()}.json"
    # One file per host; each clock/threads setting is one run in it, the latest kept.
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(info)
    data.setdefault("runs", {})[run_name] = {**run, "results": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} (run {run_name!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
