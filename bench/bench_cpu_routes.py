"""CPU int8 GEMM routes (lowering/cpu_routes.py): each route alone and inside a whole
quantized linear layer, against float32 F.linear, same shapes, same run.

What is timed, per shape (M tokens, K -> N features):
  float          F.linear(x, w, b) in float32: the layer being replaced
  <route>        route.matmul(a, prepared): int8 A -> int32 acc, every route this CPU has
                 (int-mm only once, on small shapes, where it is not fast: a scalar loop)
  <route> f32    route.matmul_f32: the same integers held in float32 (no conversion pass)
and whole w8a8-static layers, float32 x in, int8 out (the epilogue is lowering/cpu.py
run_epilogue with Bias + per-channel Requantize, Inductor-fused on large outputs):
  layer          x -> int8 (lowering/ops.py _quantize_body, fused) -> matmul -> epilogue
  layer-u8       x -> uint8 a + 128 in the quantizer's one pass -> matmul -> epilogue
  layer-f32acc   as layer-u8 with matmul_f32: the epilogue reads the float32 accumulator
  layer-fast     as layer-f32acc with a prototype requantization (fast_requant below): a
                 float32 candidate, then the exact int64 arithmetic only on the 64-element
                 blocks where the candidate could be off by one
and the stages alone (quantize to int8 / to uint8, float32 -> int32, the requantizing
epilogue on an int32 and on a float32 accumulator, the prototype, the float Dequantize
epilogue of linear_int8_dq on both), so the JSON says where a layer's time goes. Every
route's accumulator is checked against the int64 reference, every layer variant of a route
against the reference layer, and the prototype against the reference epilogue (all
bit-identical int8 outputs, or the row says MISMATCH).

Weights: Gaussian, quantized per channel to [-63, 63] for onednn-u8s8 where the CPU needs
7 bits (no VNNI), to [-127, 127] for the other routes (each K then fits one float32-exact
chunk: `k_chunks` in the JSON). `--sweep` adds a row-count sweep (M = 1..512) of float vs
the oneDNN routes on two weight shapes: the crossovers behind choose_route's thresholds.

Run: python bench/bench_cpu_routes.py [--threads N] [--clock wall|cpu|thread] [--quick]
     [--sweep] [--out DIR]
`--threads 1 --clock thread` measures this thread's CPU time: robust on a shared machine.
Writes bench/results/cpu-routes-<isa>.json (one run per clock/threads setting).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# bench/_machine.py (run from bench/)
from _machine import CLOCKS, cpu_model, interleaved, warm_then_interleaved

from qcompile.lowering.cpu import run_epilogue
from qcompile.lowering.cpu_routes import ROUTES, SEVEN_BIT, cpu_capabilities
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, Requantize, bind_operands
from qcompile.lowering.ops import _elementwise, _quantize_body
from qcompile.lowering.reference import apply_bound_epilogue, gemm_int8_ref, random_operands
from qcompile.numerics.dyadic import requantize

SHAPES = [  # (label, M, K, N)
    ("minilm qkv/out 384->384", 4096, 384, 384),
    ("minilm mlp up 384->1536", 4096, 384, 1536),
    ("minilm mlp down 1536->384", 4096, 1536, 384),
    ("llama 4096->4096, 64 tok", 64, 4096, 4096),
    ("llama up 4096->11008, 128 tok", 128, 4096, 11008),
    ("llama 4096->4096, decode", 1, 4096, 4096),
    ("llama 4096->4096, 16 tok", 16, 4096, 4096),
]
SWEEP_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SWEEP_KN = [(384, 384), (4096, 4096)]
STATIC = Epilogue((Bias(), Requantize(per_channel=True)))
DEQUANT = Epilogue((Dequantize("float32", has_bias=True),))
INT_MM_MAX_MACS = 1e9  # the scalar loop: ~0.7 ms per million MACs on AVX2



def _quantize_u8_body(x, scale, zero_point, qmin, qmax):
    # _quantize_body's arithmetic with +128 folded in: round(x/s) is an integer-valued float
    # and any value beyond the clamp bounds clamps alike, so this is exactly its int8 + 128.
    y = torch.round(x.float() / scale.float()) + (zero_point + 128)
    return y.clamp(qmin + 128, qmax + 128).to(torch.uint8)


# ---------------------------------------------------------------- prototype requantization
# Why: on AVX2 the exact int64 epilogue costs more than the GEMM (ATen emulates int64 vector
# multiplies and shifts lane by lane without AVX-512). Exactness of the fast path: with acc
# exact in float32 and |bias| <= 2**24, t = fl(fl(acc + bias) * fl(q * 2**-shift)) carries
# three float32 roundings, |t - t_exact| < |t| * 2**-22.3. Where t is farther than
# |t| * 2**-21 from a half-integer, t and t_exact round alike (and t_exact is no tie); where
# |t| >= 512 the result saturates either way. Other elements' 64-element blocks are
# recomputed with numerics.dyadic.requantize (about 1 block in 100 on these data).
FIX_BLOCK = 64  # at most; gcd(N, 64) so that blocks tile rows (a padded tail was 2x slower)


@functools.cache
def _fast_requant_body(block: int):
    def body(acc, bias, mult, zp, qmin, qmax):
        t = (acc + bias) * mult  # [M, N] float32
        r = torch.round(t)
        doubtful = ((t - r).abs() > 0.5 - t.abs() * 2.0**-21) & (t.abs() < 512)
        m, n = t.shape
        blocks = torch.where(doubtful, 1.0, 0.0).view(m, n // block, block).amax(dim=2)
        return (r + zp).clamp(qmin, qmax).to(torch.int32).to(torch.int8), blocks

    return body


def fast_requant(acc_f32, v: dict, fv: tuple) -> torch.Tensor:
    """Bias + per-channel Requantize of an exact float32 accumulator; equals the reference."""
    m, n = acc_f32.shape
    block = math.gcd(n, FIX_BLOCK)
    y, blocks = _elementwise(_fast_requant_body(block), True, acc_f32, *fv)  # [M, N / block]
    bad = blocks.reshape(-1).nonzero().squeeze(1)
    if bad.numel():
        idx = (bad[:, None] * block + torch.arange(block)).reshape(-1)  # flat [M * N] indices
        cols = idx % n
        x = acc_f32.reshape(-1)[idx].to(torch.int64) + v["bias"][cols].to(torch.int64)
        y.view(-1)[idx] = requantize(x, v["q"][cols], v["shift"][cols], v["out_zero_point"],
                                     v["qmin"], v["qmax"])
    return y


def quantize_weight(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric per-channel round-to-nearest int8 weights in [-qmax, qmax], as a model gets."""
    scale = w.abs().amax(dim=1, keepdim=True) / qmax  # [N, 1]
    return torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8)




@torch.no_grad()
def bench_shape(label, m, k, n, rounds, clock, caps) -> dict:
    x = torch.randn(m, k)
    w = torch.randn(n, k) / k**0.5
    b = torch.randn(n)
    scale = float(x.abs().max()) / 127
    a, _, vals = random_operands(STATIC, m, n, k, seed=0)
    v = bind_operands(STATIC, m, n, "cpu", vals)
    assert int(v["bias"].abs().max()) <= 2**24  # fast_requant's precondition
    fv = (v["bias"].float(), (v["q"].double() * torch.exp2(-v["shift"].double())).float(),
          *(torch.tensor(float(v[kk])) for kk in ("out_zero_point", "qmin", "qmax")))
    s_t = torch.tensor(scale, dtype=torch.float32)

    def q_int8():
        return _elementwise(_quantize_body, True, x, s_t, 0, -128, 127)

    def q_u8():
        return _elementwise(_quantize_u8_body, True, x, s_t, 0, -128, 127)

    a_q, a_u8 = q_int8(), q_u8()
    same_quant = bool(torch.equal(a_u8, a_q.view(torch.uint8) ^ 0x80))
    fns = {"float": lambda: F.linear(x, w, b), "quant-int8": q_int8, "quant-u8": q_u8}
    checks: dict[str, bool] = {"u8 quantizer == int8 quantizer + 128": same_quant}
    chunks: dict[str, int] = {}
    notes: dict[str, str] = {}
    for name, route in ROUTES.items():
        if not route.available(caps):
            notes[name] = "not available"
            continue
        wr = quantize_weight(w, route.weight_range(caps)[1])
        p = route.prepare(wr)
        chunks[name] = len(p.chunks)
        ref = gemm_int8_ref(a, wr)
        checks[f"{name} == reference"] = bool(torch.equal(route.matmul(a, p), ref))
        if name == "int-mm" and not route.fast(caps):
            if m * k * n > INT_MM_MAX_MACS:
                notes[name] = "skipped: scalar loop on this CPU (not fast)"
                continue
            t0 = clock()
            route.matmul(a, p)
            notes[name] = f"one call: {(clock() - t0) * 1e3:.1f} ms (scalar loop on this CPU)"
            continue
        fns[name] = lambda r=route, p=p: r.matmul(a, p)
        fns[f"{name} layer"] = lambda r=route, p=p: run_epilogue(r.matmul(q_int8(), p), STATIC, v)
        fns[f"{name} layer-u8"] = lambda r=route, p=p: run_epilogue(r.matmul(q_u8(), p), STATIC, v)
        outs = [fns[f"{name} layer"](), fns[f"{name} layer-u8"]()]
        if p.f32_exact:
            fns[f"{name} f32"] = lambda r=route, p=p: r.matmul_f32(a, p)
            fns[f"{name} layer-f32acc"] = lambda r=route, p=p: run_epilogue(
                r.matmul_f32(q_u8(), p), STATIC, v)
            outs.append(fns[f"{name} layer-f32acc"]())
            fns[f"{name} layer-fast"] = lambda r=route, p=p: fast_requant(
                r.matmul_f32(q_u8(), p), v, fv)
            outs.append(fns[f"{name} layer-fast"]())
            checks[f"{name} f32 == reference"] = bool(torch.equal(
                route.matmul_f32(a, p).to(torch.int64), ref.to(torch.int64)))
        layer_ref = apply_bound_epilogue(gemm_int8_ref(a_q, wr), STATIC, v)
        checks[f"{name} layers == reference"] = all(torch.equal(o, layer_ref) for o in outs)
    # The epilogues alone, on an accumulator of 7-bit weights (|acc| <= 2**24).
    acc_i = gemm_int8_ref(a, quantize_weight(w, SEVEN_BIT[1])).to(torch.int32)
    acc_f = acc_i.to(torch.float32)
    dv = bind_operands(DEQUANT, m, n, "cpu", {"row_scale": torch.rand(m), "col_scale":
                                              torch.rand(n), "float_bias": b})
    fns["to-int32"] = lambda: acc_f.to(torch.int32)
    fns["epilogue int32"] = lambda: run_epilogue(acc_i, STATIC, v)
    fns["epilogue f32"] = lambda: run_epilogue(acc_f, STATIC, v)
    fns["epilogue f32-fast"] = lambda: fast_requant(acc_f, v, fv)
    fns["dequant int32"] = lambda: run_epilogue(acc_i, DEQUANT, dv)
    fns["dequant f32"] = lambda: run_epilogue(acc_f, DEQUANT, dv)
    checks["f32-fast epilogue == reference"] = bool(torch.equal(
        fast_requant(acc_f, v, fv), apply_bound_epilogue(acc_i, STATIC, v)))
    checks["dequant f32 == dequant int32"] = bool(torch.equal(
        run_epilogue(acc_f, DEQUANT, dv), run_epilogue(acc_i, DEQUANT, dv)))
    first_s, times = warm_then_interleaved(fns, rounds, clock)
    med = {kk: statistics.median(t) for kk, t in times.items()}
    return {
        "label": label, "M": m, "K": k, "N": n, "rounds": rounds,
        "median_ms": {kk: round(val, 4) for kk, val in med.items()},
        "min_ms": {kk: round(min(t), 4) for kk, t in times.items()},
        "float_over": {kk: round(med["float"] / val, 2) for kk, val in med.items()},
        "first_call_s": first_s, "k_chunks": chunks, "checks": checks, "notes": notes,
    }


@torch.no_grad()
def sweep(rounds, clock, caps) -> list[dict]:
    """float vs onednn-u8s8 (7-bit W) vs onednn-u8s8-split (full W) over row counts."""
    rows = []
    one, split = ROUTES["onednn-u8s8"], ROUTES["onednn-u8s8-split"]
    if not one.available(caps):
        return rows
    for k, n in SWEEP_KN:
        w = torch.randn(n, k)
        p7 = one.prepare(quantize_weight(w, one.weight_range(caps)[1]))
        ps = split.prepare(quantize_weight(w, 127))
        for m in SWEEP_M:
            x = torch.randn(m, k)
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
            fns = {"float": lambda x=x, w=w: F.linear(x, w),
                   "onednn-u8s8": lambda a=a, p=p7: one.matmul(a, p),
                   "onednn-u8s8-split": lambda a=a, p=ps: split.matmul(a, p)}
            for fn in fns.values():
                fn()
            timed = interleaved(fns, rounds, clock)
            med = {kk: statistics.median(t) for kk, t in timed.items()}
            rows.append({"M": m, "K": k, "N": n, "median_ms": {kk: round(t, 4) for kk, t in
                                                               med.items()},
                         "float_over": {kk: round(med["float"] / t, 2) for kk, t in med.items()}})
            print(f"  sweep M={m:4} K={k:5} N={n:5}  " + "  ".join(
                f"{kk} {t:8.3f} ms ({med['float'] / t:4.2f}x)" for kk, t in med.items()),
                flush=True)
    return rows


def _summary(row: dict) -> str:
    med, fo = row["median_ms"], row["float_over"]
    cells = [f"float {med['float']:8.2f}"]
    for name in ROUTES:
        if name in med:
            best = min((kk for kk in med if kk.startswith(name + " layer")), key=med.get)
            cells.append(f"{name} {med[name]:7.2f} ({fo[name]:4.2f}x) "
                         f"{best[len(name) + 1:]} {med[best]:7.2f} ({fo[best]:4.2f}x)")
    return " | ".join(cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds, the first two shapes")
    p.add_argument("--sweep", action="store_true", help="also sweep M for the crossovers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # before anything is compiled
    warnings.filterwarnings("ignore", message=".*TF32.*")
    caps = cpu_capabilities()
    import triton

    info = {"cpu": cpu_model() or caps.model or caps.arch, "isa": caps.isa,
            "capabilities": dict(caps.__dict__), "cores": os.cpu_count(),
            "torch": torch.__version__, "triton": triton.__version__,
            "onednn": next(iter(re.findall(r"MKL-DNN (v[\d.]+)", torch.__config__.show())), None)}
    run = {"clock": args.clock, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           # Other work on the machine shows up here; wall medians mean little when high.
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    print(f"{caps.describe()}, {run['threads']} threads, {args.clock} clock, torch "
          f"{info['torch']}; per route: GEMM ms (float / it) and its fastest layer variant")
    rows = []
    clock = CLOCKS[args.clock]
    for label, m, k, n in SHAPES[:2] if args.quick else SHAPES:
        rounds = 3 if args.quick else (7 if m * k * n > 4e9 else 11)
        row = bench_shape(label, m, k, n, rounds, clock, caps)
        rows.append(row)
        bad = [c for c, ok in row["checks"].items() if not ok]
        print(f"{label:30} {f'{m}x{k}x{n}':>15}  {_summary(row)}"
              + (f"  MISMATCH: {bad}" if bad else ""), flush=True)
    run["results"] = rows
    if args.sweep:
        run["sweep"] = sweep(3 if args.quick else 7, clock, caps)
    run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {run['loadavg_before']}, after {run['loadavg_after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-routes-{caps.isa.lower()}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(info)
    data.setdefault("runs", {})[f"{args.clock}-{run['threads']}threads"] = run
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
