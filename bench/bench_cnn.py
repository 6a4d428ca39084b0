"""CNNs end to end on CPU: qcompile's integer convolutions against the float model.

Models (tests/models/cnn_zoo.py, random weights, batch-norm statistics randomized and
outlier channels injected into some batch norms, eval mode):
  resnet18      ResNet-18 (basic blocks), 224 x 224
  mobilenet_v2  MobileNetV2 (depthwise, inverted residuals, ReLU6), 224 x 224
Accuracy: top-1 agreement with float and the cosine of the logits, per image, over
--images random images (Gaussian pixels; calibration on --calib other batches), as the
user gets it (kernels="auto": layers int8 cannot speed up on this CPU stay float) and with
every convolution quantized (kernels="cpu"): the second is the quantization's accuracy.
Speed: median ms per batch (--batch images) over interleaved rounds after warm-up: float
eager (NCHW, what a user runs), float under torch.compile (Inductor: how much of a
speed-up is compilation rather than int8) and each recipe; speed-up = float ms / its ms.
Every number names its machine (CPU model, ISA, VNNI or not, threads) and versions.

    python bench/bench_cnn.py [--models resnet18,mobilenet_v2] [--recipes w8a8-static,w8a8]
        [--batch 8] [--images 512] [--threads 2] [--rounds 7] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), ROOT]
from _machine import CLOCKS, cpu_info, interleaved, results_slug  # noqa: E402

import qcompile  # noqa: E402
from tests.models import cnn_zoo  # noqa: E402

BUILDERS = {
    "resnet18": lambda quick: cnn_zoo.resnet() if not quick else cnn_zoo.resnet(
        depths=(1, 1), widths=(16, 32)),
    "mobilenet_v2": lambda quick: cnn_zoo.mobilenet_v2() if not quick else
    cnn_zoo.mobilenet_v2(width_mult=0.25),
}


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(name: str, quick: bool) -> torch.nn.Module:
    model = BUILDERS[name](quick)
    cnn_zoo.randomize_batchnorm(model, 0)
    cnn_zoo.inject_outlier_channels(model, 0)
    return model.eval().requires_grad_(False)


def compile_recipe(model, recipe: str, calib: list[torch.Tensor], kernels: str = "auto"):
    cm = torch.compile(model, backend="qcompile", options={"recipe": recipe,
                                                          "kernels": kernels})
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left float are in the report
        if recipe not in ("w8a8",):
            with qcompile.calibrate(cm):
                for x in calib:
                    cm(x)
        cm(calib[0])
    return cm, round(time.perf_counter() - t0, 1)


def accuracy(model, cm, n: int, batch: int, size: int) -> dict:
    agree, cos = [], []
    for i in range(0, n, batch):
        x = images(min(batch, n - i), size, 10_000 + i)
        ref, out = model(x), cm(x)
        agree.append((ref.argmax(1) == out.argmax(1)).float())
        cos.append(F.cosine_similarity(ref.double(), out.double(), dim=1))
    agree, cos = torch.cat(agree), torch.cat(cos)
    return {"top1_agreement": round(agree.mean().item(), 4), "cosine_mean": round(
        cos.mean().item(), 5), "cosine_min": round(cos.min().item(), 5), "images": len(cos)}


def layers(cm) -> dict:
    rep = qcompile.report(cm)
    convs = [x for x in rep.layers if x.kind == "conv"]
    return {"conv_quantized": sum(x.quantized for x in convs), "conv_total": len(convs),
            "float": {x.name: x.reason for x in rep.layers if not x.quantized}}


def _model(args, name: str) -> dict:
    """One model: each recipe compiled, calibrated and checked, then all timed interleaved."""
    model = build(name, args.quick)
    calib = [images(args.batch, args.size, 100 + i) for i in range(args.calib)]
    x = images(args.batch, args.size, 7)
    fns, entry = {"float": lambda: model(x)}, {}
    recipes = args.recipes.split(",")
    for recipe in recipes:
        # accuracy with every convolution quantized (kernels="cpu": whatever the speed),
        # speed as a user gets it (kernels="auto": layers int8 cannot speed up stay float)
        torch._dynamo.reset()
        every, _ = compile_recipe(model, recipe, calib, kernels="cpu")
        entry[recipe] = {"all_quantized": {**layers(every), **accuracy(
            model, every, args.images, 32, args.size)}}
        torch._dynamo.reset()
        cm, first_s = compile_recipe(model, recipe, calib)
        entry[recipe].update(first_call_s=first_s, **layers(cm),
                             **accuracy(model, cm, args.images, 32, args.size))
        fns[recipe] = lambda c=cm: c(x)
    torch._dynamo.reset()
    inductor = torch.compile(model)  # float, compiled: how much of a speed-up is not int8's
    fns["inductor"] = lambda: inductor(x)
    for f in fns.values():  # warm-up
        f()
        f()
    times = interleaved(fns, args.rounds, CLOCKS[args.clock])
    ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
    entry["float"] = {"ms": ms["float"]}
    entry["inductor"] = {"ms": ms["inductor"], "speedup": round(ms["float"] / ms["inductor"], 2)}
    print(f"{name}: float {ms['float']:.1f} ms/batch of {args.batch}, float under Inductor "
          f"{ms['inductor']:.1f} ms ({entry['inductor']['speedup']:.2f}x)")
    for recipe in recipes:
        e = entry[recipe]
        e["ms"], e["speedup"] = ms[recipe], round(ms["float"] / ms[recipe], 2)
        a = e["all_quantized"]
        print(f"  {recipe:12s} {e['ms']:8.1f} ms  {e['speedup']:.2f}x  top-1 "
              f"{e['top1_agreement']:.4f}  cos mean {e['cosine_mean']:.5f}  convs "
              f"{e['conv_quantized']}/{e['conv_total']}  first call {e['first_call_s']} s;"
              f" every conv quantized: top-1 {a['top1_agreement']:.4f} cos mean "
              f"{a['cosine_mean']:.5f} min {a['cosine_min']:.5f}")
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--recipes", default="w8a8-static,w8a8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--calib", type=int, default=4, help="calibration batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--quick", action="store_true", help="tiny models and sizes (smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.size, args.images, args.rounds, args.calib = 32, 16, 2, 2
    torch.set_num_threads(args.threads)
    result = {"machine": cpu_info(), "torch": torch.__version__, "batch": args.batch,
              "size": args.size, "clock": args.clock, "models": {}}
    with torch.no_grad():
        for name in args.models.split(","):
            result["models"][name] = _model(args, name)
    out = args.out or os.path.join(ROOT, "bench", "results", f"cnn-cpu-{results_slug()}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out} ({result['machine']['capabilities']}, {args.threads} threads, torch "
          f"{torch.__version__})")


if __name__ == "__main__":
    main()
