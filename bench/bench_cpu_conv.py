"""CPU convolution layers: float32 (channels-last and contiguous, the faster counted) against
qcompile's integer convolution (conv2d_int8, "cpu": oneDNN's exact int8 kernel plus the
dyadic epilogue), and oneDNN's kernel alone; the shapes of ResNet-18 and MobileNetV2 at
224 x 224. What lowering/cpu_conv.plan_conv's crossovers rest on.

    python bench/bench_cpu_conv.py [--batch 8] [--threads 2] [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _machine import CLOCKS, cpu_info, results_slug, warm_then_interleaved  # noqa: E402

from qcompile.lowering import conv_ops, cpu_conv, cpu_routes  # noqa: E402

# (name, C, H, N, k, stride, groups): input [B, C, H, H], weight [N, C/groups, k, k]
SHAPES = [
    ("resnet stem 7x7/2", 3, 224, 64, 7, 2, 1),
    ("resnet 3x3 @56", 64, 56, 64, 3, 1, 1),
    ("resnet 3x3/2 @56", 64, 56, 128, 3, 2, 1),
    ("resnet 3x3 @28", 128, 28, 128, 3, 1, 1),
    ("resnet 3x3 @14", 256, 14, 256, 3, 1, 1),
    ("resnet 3x3 @7", 512, 7, 512, 3, 1, 1),
    ("resnet 1x1/2 @28", 128, 28, 256, 1, 2, 1),
    ("mbv2 expand 1x1 @56", 24, 56, 144, 1, 1, 1),
    ("mbv2 depthwise 3x3 @56", 144, 56, 144, 3, 1, 144),
    ("mbv2 project 1x1 @56", 144, 56, 24, 1, 1, 1),
    ("mbv2 expand 1x1 @14", 64, 14, 384, 1, 1, 1),
    ("mbv2 depthwise 3x3 @14", 384, 14, 384, 3, 1, 384),
]


def _layer(args, caps, lo, hi, name, c, h, n, k, s, g) -> dict:
    """One layer shape: every configuration timed, interleaved."""
    p = k // 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, c, h, h, generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, c // g, k, k, generator=gen)
    xq = torch.randint(-128, 128, x.shape, generator=gen, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    wq = torch.randint(lo, hi + 1, w.shape, generator=gen, dtype=torch.int8)
    # a real layer's multipliers: q anywhere in [2**30, 2**31) (a power of two would
    # make exact ties, which the float32 epilogue hands to its exact path, common)
    q = torch.randint(1 << 30, 1 << 31, (n,), generator=gen, dtype=torch.int64)
    shift = torch.full((n,), 31 + 9 + (c * k * k).bit_length() // 2, dtype=torch.int64)
    geom = ([s, s], [p, p], [1, 1], g)
    bias = torch.zeros(n, dtype=torch.int32)
    pg = cpu_conv.ConvGeometry.of(*geom)
    prepared = cpu_conv.prepare_conv(wq, -7, pg) if caps.onednn else None
    fns = {
        "float32": lambda: F.conv2d(x, w, None, s, p, 1, g),
        "float32 channels-last": lambda: F.conv2d(x_cl, w, None, s, p, 1, g),
        "conv2d_int8": lambda: conv_ops.conv2d_int8(xq, wq, bias, -7, q, shift, 3, 3, 127,
                                                    *geom, impl="cpu"),
    }
    if prepared is not None:
        fns["oneDNN int8 only"] = lambda: cpu_conv.run_prepared(xq, prepared)
    first, times = warm_then_interleaved(fns, args.rounds, CLOCKS[args.clock])
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    fl = min(med["float32"], med["float32 channels-last"])
    plan = cpu_conv.plan_conv(caps, x.shape, w.shape, pg, (-(-h // s),) * 2, (lo, hi))
    row = {"shape": name, "x": list(x.shape), "w": list(w.shape), "stride": s,
           "groups": g, "ms": med, "speedup_vs_float": round(fl / med["conv2d_int8"], 2),
           "plan": {"fast": plan.fast, "reason": plan.reason}}
    print(f"{name:26s} float {fl:8.2f} ms  int8 {med['conv2d_int8']:8.2f} ms "
          f"({row['speedup_vs_float']:.2f}x)  oneDNN only "
          f"{med.get('oneDNN int8 only', float('nan')):8.2f} ms  plan "
          f"{'int8' if plan.fast else 'float'}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    caps = cpu_routes.cpu_capabilities()
    lo, hi = cpu_conv.onednn_weight_range(caps)
    rows = [_layer(args, caps, lo, hi, *shape) for shape in SHAPES]
    result = {"machine": cpu_info(), "torch": torch.__version__, "batch": args.batch,
              "clock": args.clock, "weights": [lo, hi], "layers": rows}
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"cpu-conv-{results_slug()}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
