"""Low-bit weight GEMMs at decode shapes: W4A16 and W4A8 against fp16 matmul.

What is timed, per (M tokens, K -> N), on CUDA, in the same run:
  fp16        x @ W^T with torch (cuBLAS), fp16 weights: the baseline
  w4a16       w4a16_gemm_triton, int4 group-128 weights with zero points, default config
  w4a16-best  the fastest of a small config sweep (the heuristic's miss, if any)
  w4a8        w4a8_gemm_dequant_triton (int8 x int4 -> int32, per-token x per-channel
              float out)
The weight bandwidth column is packed-weight bytes / time: decode reads W once, so this is
the number to compare with the GPU's memory bandwidth.

Without CUDA it says so, runs a tiny interpreter smoke test, and times the CPU paths.

Run: python bench/bench_w4.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import torch

from qcompile.lowering import device

# LLaMA-7B projections: attention 4096 -> 4096, MLP up 4096 -> 11008, MLP down 11008 -> 4096.
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TOKENS = [1, 16]
GROUP = 128
SWEEP = [
    dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=w)
    for bn in (32, 64, 128)
    for bk in (64, 128, 256)
    for sk in (1, 2, 4, 8)
    for w in (4,)
]


def _operands(m, k, n, dev):
    from qcompile.numerics.specs import pack_int4

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, k // GROUP, generator=g) * 0.01).half()
    z = torch.randint(-8, 8, (n, k // GROUP), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g).half()
    return [t.to(dev) for t in (x, pack_int4(w), s, z, w)]


def _smoke() -> None:
    device.enable_interpreter()  # before the kernel modules are imported
    from qcompile.lowering.kernels import w4

    print("bench_w4: needs CUDA for timings; interpreter smoke test and CPU-path timings")
    x, wp, s, z, _ = _operands(3, 256, 48, "cpu")
    y = w4.w4a16_gemm_triton(x, wp, s, z, GROUP)
    ref = w4.w4a16_gemm_ref(x, wp, s, z, GROUP)
    xi = torch.randint(-128, 128, (3, 256), dtype=torch.int8)
    xs, ws = torch.rand(3), torch.rand(48)
    same = torch.equal(w4.w4a8_gemm_dequant_triton(xi, wp, xs, ws),
                       w4.w4a8_gemm_dequant_ref(xi, wp, xs, ws))  # fmt: skip
    err = float((y.float() - ref.float()).abs().max())
    print(f"  w4a16 max |kernel - ref| = {err:.2e}; w4a8 bit-exact: {same}")
    if not same or err > 1e-2:
        raise SystemExit(1)
    for k, n in [(4096, 4096), (4096, 11008)]:
        _time_cpu(1, k, n)


def _time_cpu(m: int, k: int, n: int) -> None:
    from qcompile.lowering.kernels import w4

    x, wp, s, z, w = _operands(m, k, n, "cpu")
    wf = w.float()
    cases = {
        "fp32 matmul": lambda: x.float() @ wf.T,
        "w4a16 cpu": lambda: w4.w4a16_gemm_cpu(x, wp, s, z, GROUP),
    }
    for label, fn in cases.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        print(f"  M={m} {k}->{n} {label:12s}: {(time.perf_counter() - t0) / 5 * 1e3:7.2f} ms")


def _measure(m, k, n) -> dict:
    import triton

    from qcompile.lowering.kernels import w4

    x, wp, s, z, w = _operands(m, k, n, "cuda")
    w16 = w.half()
    xi = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    xs = torch.rand(m, device="cuda")
    ws = torch.rand(n, device="cuda")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3  # us

    res = dict(
        fp16=bench(lambda: x @ w16.T),
        w4a16=bench(lambda: w4.w4a16_gemm_triton(x, wp, s, z, GROUP)),
        w4a8=bench(lambda: w4.w4a8_gemm_dequant_triton(xi, wp, xs, ws)),
    )
    best = (float("inf"), None)
    for cfg in SWEEP:
        if cfg["BLOCK_K"] * cfg["SPLIT_K"] > k:
            continue
        t = bench(lambda cfg=cfg: w4.w4a16_gemm_triton(x, wp, s, z, GROUP, config=cfg))
        best = min(best, (t, cfg), key=lambda b: b[0])
    res["w4a16-best"], res["best_config"] = best
    res["weight_GBps_w4a16"] = wp.numel() / (res["w4a16"] * 1e-6) / 1e9
    return res


def _bench(out_dir: Path) -> None:
    name = device.device_name()
    print(f"{name}: time in us (speedup vs fp16), packed-weight GB/s of w4a16")
    rows = []
    for m in TOKENS:
        for k, n in SHAPES:
            r = _measure(m, k, n)
            rows.append(dict(M=m, K=k, N=n, **r))
            cells = " ".join(
                f"{lab}={r[lab]:7.1f} ({r['fp16'] / r[lab]:4.2f}x)"
                for lab in ("w4a16", "w4a16-best", "w4a8")
            )
            print(f"M={m:3d} {k:5d}->{n:5d} fp16={r['fp16']:7.1f} {cells} "
                  f"w4a16 {r['weight_GBps_w4a16']:6.0f} GB/s best={r['best_config']}")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"w4-{socket.gethostname()}.json"
    path.write_text(json.dumps(dict(device=name, rows=rows), indent=1))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if device.has_cuda():
        _bench(args.out)
    else:
        _smoke()


if __name__ == "__main__":
    main()
