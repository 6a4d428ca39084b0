"""GPU int8 GEMM benchmark: our generated Triton kernel vs torch._int_mm vs bf16 matmul.

What: LLaMA-class weight shapes (K -> N) at M in 1, 16, 128, 2048, 8192 tokens. For each,
in the same run: our kernel with the plain int32 output (comparable to torch._int_mm),
with the w8a8-static epilogue (bias + per-channel dyadic requant -> int8) and with the
w8a8 dynamic one (per-token x per-channel scales + bias -> bf16); torch._int_mm; and a
bf16 torch.matmul. Reported: TOPS (2*M*N*K / time), ratios, and % of the device's dense
int8 peak. Configs are autotuned first (persisted, so reruns do not tune again).

torch._int_mm on CUDA needs M > 16 (and K, N multiples of 8): for M <= 16 its A is
zero-padded to 32 rows and the row says so.

Run: python bench/bench_gemm.py [--m 1,16,128] [--cache DIR] [--out bench/results]
Writes bench/results/gemm-<device>.json (device, torch and triton versions, every row).
Without CUDA it says so and exits 0; --smoke then runs one tiny shape in the Triton
interpreter through the same code (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# (K, N): LLaMA-2/3 7B-8B q/o (4096->4096), fused qkv (4096->12288), fused gate+up for
# LLaMA-2 7B (4096->22016) and LLaMA-3 8B (4096->28672), and the down projections.
KN = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (4096, 28672), (14336, 4096)]
MS = [1, 16, 128, 2048, 8192]

# Dense int8 tensor-core peaks (TOPS, no sparsity), from the vendors' data sheets; the
# first substring that matches the device name wins.
PEAK_INT8_TOPS = [
    ("H100 PCIe", 1513.0), ("H100 NVL", 1671.0), ("H100", 1979.0), ("H200", 1979.0),
    ("GH200", 1979.0), ("A100", 624.0), ("L40S", 733.0), ("L40", 362.0), ("L4", 242.5),
    ("A10G", 280.0), ("A10", 250.0), ("RTX 4090", 660.6), ("RTX 3090", 284.0),
]


def peak_tops(name: str) -> float | None:
    return next((p for key, p in PEAK_INT8_TOPS if key in name), None)


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn):  # the interpreter smoke run: a rough wall clock, not a measurement
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def bench_one(m: int, k: int, n: int, device: str, args) -> dict:
    from qcompile.lowering.gemm import example_epilogue, plan_gemm_int8
    from qcompile.lowering.reference import gemm_int8_ref, random_operands

    timer = _timer(device)
    flops = 2.0 * m * n * k
    tops = lambda ms: flops / (ms * 1e-3) / 1e12
    row: dict = {"M": m, "K": k, "N": n}
    kw = dict(autotune_cache_dir=args.cache, origin=f"bench_gemm {m}x{k}x{n}")
    ms: dict[str, float] = {}
    for kind in ("int32", "requant", "dequant"):
        ep = example_epilogue(kind)
        a, w, vals = random_operands(ep, m, n, k, device=device)
        # Checks, binding and tuning (once per key) happen here; the timed call only
        # launches, as torch._int_mm's does.
        launch = plan_gemm_int8(a, w, ep, **vals, **kw)
        if args.check or device != "cuda":
            assert torch.equal(launch(), gemm_int8_ref(a, w, ep, **vals)), f"{kind} differs"
        ms[f"ours-{kind}"] = timer(launch)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    if device == "cuda":
        a_mm = a if m > 16 else torch.cat([a, a.new_zeros(32 - m, k)])  # _int_mm needs M > 16
        row["int_mm_padded_to"] = None if m > 16 else 32
        wt = w.t()
        ms["torch._int_mm"] = timer(lambda: torch._int_mm(a_mm, wt))
        x, wb = a.to(torch.bfloat16), w.to(torch.bfloat16)
        ms["bf16 matmul"] = timer(lambda: torch.matmul(x, wb.t()))
    row["ms"] = {key: round(v, 5) for key, v in ms.items()}
    row["TOPS"] = {key: round(tops(v), 2) for key, v in ms.items()}
    if "torch._int_mm" in ms:
        row["ours_int32_vs_int_mm"] = round(ms["torch._int_mm"] / ms["ours-int32"], 3)
        row["ours_int32_vs_bf16"] = round(ms["bf16 matmul"] / ms["ours-int32"], 3)
        row["ours_requant_vs_int_mm"] = round(ms["torch._int_mm"] / ms["ours-requant"], 3)
    peak = peak_tops(torch.cuda.get_device_name()) if device == "cuda" else None
    if peak:
        row["pct_peak_ours_int32"] = round(100 * tops(ms["ours-int32"]) / peak, 1)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated M values")
    p.add_argument("--cache", default=None, help="autotune cache dir (default ~/.cache/qcompile)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--check", action="store_true", help="compare every output to the reference")
    p.add_argument("--smoke", action="store_true", help="without CUDA: one tiny interpreter run")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemm needs a CUDA GPU; none found.")
        if not args.smoke:
            return 0
        from qcompile.lowering import device as qdevice

        qdevice.enable_interpreter()  # before any kernel module is loaded
        row = bench_one(33, 64, 48, "cpu", args)
        print(f"smoke run in the Triton interpreter: outputs equal the reference; {row['ms']}")
        return 0

    import triton

    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"peak int8 {peak_tops(name) or '?'} TOPS")
    cols = ["ours-int32", "ours-requant", "ours-dequant", "torch._int_mm", "bf16 matmul"]
    print(f"{'M':>5} {'K':>6} {'N':>6} " + " ".join(f"{c:>14}" for c in cols)
          + f" {'vs _int_mm':>9} {'vs bf16':>8} {'% peak':>7}   (TOPS)")
    rows = []
    for k, n in KN:
        for m in [int(x) for x in args.m.split(",")]:
            row = bench_one(m, k, n, "cuda", args)
            rows.append(row)
            cells = " ".join(f"{row['TOPS'][c]:>14.1f}" for c in cols)
            pad = "*" if row.get("int_mm_padded_to") else " "
            print(f"{m:>5} {k:>6} {n:>6} {cells} {row['ours_int32_vs_int_mm']:>8.2f}{pad} "
                  f"{row['ours_int32_vs_bf16']:>8.2f} {row.get('pct_peak_ours_int32', '-'):>7}",
                  flush=True)
    print("* torch._int_mm ran with A padded to 32 rows (it needs M > 16)")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gemm-{slug}.json"
    path.write_text(json.dumps({
        "device": name, "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__, "triton": triton.__version__,
        "peak_int8_tops": peak_tops(name), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
