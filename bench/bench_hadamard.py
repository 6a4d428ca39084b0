"""Online Hadamard transform: bandwidth of the Triton FWHT against a plain copy.

What is timed, per (rows M, width n, dtype), on CUDA:
  copy       y.copy_(x): the floor any memory-bound row op can reach
  fwht       hadamard_transform_triton (lowering/kernels/hadamard.py)
  fwht+q     hadamard_quantize_per_token_triton: rotation + absmax + int8, one pass
  q          quantize_per_token_triton alone (what the rotation adds on top of it)
GB/s counts bytes read + written once (the kernels' minimum traffic).

Without CUDA it says so and runs a tiny smoke test of the same kernels in the Triton
interpreter (correctness only; interpreter timings mean nothing).

Run: python bench/bench_hadamard.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import torch

from qcompile.lowering import device

# Widths from LLaMA-7B/8B, Mistral and Qwen MLPs (down-projection inputs) and hidden sizes.
SHAPES = [(16, 4096), (4096, 4096), (4096, 11008), (4096, 14336), (4096, 5120), (4096, 13824)]


def _smoke() -> None:
    device.enable_interpreter()  # before the kernel modules are imported
    from qcompile.lowering.kernels.hadamard import hadamard_transform_cpu, hadamard_transform_triton
    from qcompile.lowering.kernels.quantize import (
        hadamard_quantize_per_token_ref,
        hadamard_quantize_per_token_triton,
    )

    print("bench_hadamard: needs CUDA for timings; running an interpreter smoke test instead")
    for n in (64, 48, 172):
        x = torch.randn(4, n, dtype=torch.float16)
        same = torch.equal(hadamard_transform_triton(x), hadamard_transform_cpu(x))
        q, s = hadamard_quantize_per_token_triton(x)
        q_ref, s_ref = hadamard_quantize_per_token_ref(x)
        ok = same and torch.equal(q, q_ref) and torch.equal(s, s_ref)
        print(f"  n={n:4d}: kernel == torch FWHT and fused quantize bit-exact: {ok}")
        if not ok:
            raise SystemExit(1)


def _measure(m: int, n: int, dtype: torch.dtype) -> dict:
    import triton

    from qcompile.lowering.kernels.hadamard import hadamard_transform_triton
    from qcompile.lowering.kernels.quantize import (
        hadamard_quantize_per_token_triton,
        quantize_per_token_triton,
    )

    x = torch.randn(m, n, device="cuda").to(dtype)
    y = torch.empty_like(x)
    elt = x.element_size()
    cases = {
        "copy": (lambda: y.copy_(x), 2 * elt),
        "fwht": (lambda: hadamard_transform_triton(x), 2 * elt),
        "fwht+q": (lambda: hadamard_quantize_per_token_triton(x), elt + 1),
        "q": (lambda: quantize_per_token_triton(x), elt + 1),
    }
    res = {}
    for label, (fn, bytes_per) in cases.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        res[label] = dict(us=ms * 1e3, gbps=bytes_per * m * n / (ms * 1e-3) / 1e9)
    return res


def _bench(out_dir: Path) -> None:
    rows = []
    name = device.device_name()
    print(f"{name}: GB/s (higher is better), time in us")
    print(f"{'M':>6} {'n':>6} {'dtype':>9} | {'copy':>14} {'fwht':>14} {'fwht+q':>14} {'q':>14}")
    for dtype in (torch.float16, torch.bfloat16):
        for m, n in SHAPES:
            res = _measure(m, n, dtype)
            rows.append(dict(M=m, n=n, dtype=str(dtype), **res))
            cells = " ".join(f"{r['gbps']:7.0f} ({r['us']:5.0f})" for r in res.values())
            print(f"{m:>6} {n:>6} {str(dtype)[6:]:>9} | {cells}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"hadamard-{socket.gethostname()}.json"
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
