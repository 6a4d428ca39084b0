"""Mixed precision under a budget (recipe "mixed"): accuracy, the choice's predicted and
measured distortion, and how long sensitivity + the integer program take.

MiniLM (real weights): calibrate on the shipped calibration sentences, evaluate on the
others (mean cosine of the sentence embeddings against float). LLaMA-shaped random models
(with GQA, partial rotary, tied embeddings among them) with outlier channels injected
into their RMSNorm weights: output cosine of the logits against float on held-out ids.

    python bench/mixed_precision.py [--out bench/results/mixed-precision.json] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a file: _machine
from _machine import cpu_info  # noqa: E402

import qcompile  # noqa: E402
from qcompile import minilm  # noqa: E402

# kernels="cpu": every layer integer, also where a 16-bit input runs slower than float on
# this CPU (kernels="auto" runs those layers in float: bench_e2e measures that speed)
MINILM = {
    "w8a8-static": {"recipe": "w8a8-static", "kernels": "cpu"},
    "mixed a16<=10%": {"recipe": "mixed", "budget": {"a16": 0.1}, "kernels": "cpu"},
    "mixed a16<=25%": {"recipe": "mixed", "budget": {"a16": 0.25}, "kernels": "cpu"},
    "mixed a16<=10%, hessian": {"recipe": "mixed", "budget": {"a16": 0.1},
                                "sensitivity": "hessian", "kernels": "cpu"},
    "mixed a16<=10%, kernels=auto": {"recipe": "mixed", "budget": {"a16": 0.1}},
    "w4a8 (rotations)": {"recipe": "w4a8", "kernels": "cpu"},
    "mixed weights <=5 bits": {"recipe": "mixed", "budget": {"weight_bits": 5},
                               "kernels": "cpu"},
    "mixed weights <=5 bits, a16<=10%": {"recipe": "mixed", "kernels": "cpu",
                                         "budget": {"weight_bits": 5, "a16": 0.1}},
    "mixed bops <=0.8": {"recipe": "mixed", "budget": {"bops": 0.8}, "kernels": "cpu"},
    # int4 layers in groups of 32 on the row's integer grid (their multipliers counted:
    # 4.25 bits per int4 weight); smooth as w8a8-static has it by default
    "mixed weights <=5 bits, groups of 32": {"recipe": "mixed", "budget": {"weight_bits": 5},
                                             "group_size": 32, "kernels": "cpu"},
    "mixed weights <=5 bits, groups of 32, smooth": {
        "recipe": "mixed", "budget": {"weight_bits": 5}, "group_size": 32, "smooth": True,
        "kernels": "cpu"},
    "mixed weights <=5 bits, groups of 32, smooth, rotations": {
        "recipe": "mixed", "budget": {"weight_bits": 5}, "group_size": 32, "smooth": True,
        "rotate": True, "online_hadamard": True, "kernels": "cpu"},
    "mixed a16<=10%, smooth": {"recipe": "mixed", "budget": {"a16": 0.1}, "smooth": True,
                               "kernels": "cpu"},
    "mixed a16<=10%, smooth, rotations": {"recipe": "mixed", "budget": {"a16": 0.1},
                                          "smooth": True, "rotate": True,
                                          "online_hadamard": True, "kernels": "cpu"},
    # the int4 layers as w4a8 has them: GPTQ (sequential, shrunk Hessians), with and
    # without smooth
    "mixed weights <=5 bits, groups of 32, rotations, gptq": {
        "recipe": "mixed", "budget": {"weight_bits": 5}, "group_size": 32, "gptq": True,
        "rotate": True, "online_hadamard": True, "kernels": "cpu"},
    # GPTQ on the calibration's float Hessians: the weights the choice measured on
    "mixed weights <=5 bits, groups of 32, rotations, gptq, not sequential": {
        "recipe": "mixed", "budget": {"weight_bits": 5}, "group_size": 32, "gptq": True,
        "sequential": False, "rotate": True, "online_hadamard": True, "kernels": "cpu"},
    "mixed weights <=5 bits, groups of 32, rotations, gptq, no smooth": {
        "recipe": "mixed", "budget": {"weight_bits": 5}, "group_size": 32, "gptq": True,
        "smooth": False, "rotate": True, "online_hadamard": True, "kernels": "cpu"},
}
LLAMAS = {
    "w8a8-static": {"recipe": "w8a8-static", "kernels": "cpu"},
    "w8a8-static + rotations": {"recipe": "w8a8-static", "rotate": True,
                                "online_hadamard": True, "kernels": "cpu"},
    "mixed a16<=10%": {"recipe": "mixed", "budget": {"a16": 0.1}, "kernels": "cpu"},
    "mixed a16<=10%, smooth": {"recipe": "mixed", "budget": {"a16": 0.1}, "smooth": True,
                               "kernels": "cpu"},
    "mixed a16<=10%, smooth, rotations": {"recipe": "mixed", "budget": {"a16": 0.1},
                                          "smooth": True, "rotate": True,
                                          "online_hadamard": True, "kernels": "cpu"},
}


def _plans(cm) -> list:
    return [g.precision for g in qcompile.report(cm).graphs if g.precision is not None]


def _summary(plans) -> dict:
    if not plans:
        return {}
    p = plans[0]
    return {"predicted_D": p.predicted, "fake_quantized_D": p.fake_measured,
            "integer_graph_D": p.real_measured, "all_default_D": p.all8_measured,
            "rank_correlation": p.rank_correlation, "choose_s": round(p.seconds, 2),
            "costs": {k: list(v) for k, v in p.costs.items()},
            "act16": sorted(n for n, b in p.bits.items() if b == 16 and not n.startswith("w:")),
            "weight4": sum(1 for n, b in p.bits.items() if b == 4),
            "sites": len(p.bits)}


def run_minilm(only) -> dict:
    model, tok = minilm.load()
    calib, evals = minilm.sentences()
    ref = torch.cat([minilm.embed(model, i, m) for i, m in minilm.batches(tok, evals, 16)])
    out = {}
    for name, options in MINILM.items():
        if only and name not in only:
            continue
        torch._dynamo.reset()
        cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
        t0 = time.perf_counter()
        with torch.no_grad(), qcompile.calibrate(cm):
            for ids, mask in minilm.batches(tok, calib, 16):
                cm(input_ids=ids, attention_mask=mask)
        emb = torch.cat([minilm.embed(cm, i, m) for i, m in minilm.batches(tok, evals, 16)])
        r = minilm.compare(ref, emb)
        r.update(options=options, calibrate_compile_eval_s=round(time.perf_counter() - t0, 1),
                 **_summary(_plans(cm)))
        out[name] = r
        shown = ("predicted_D", "integer_graph_D", "choose_s", "act16")
        print(f"minilm  {name:<36} cos {r['cosine_mean']:.5f} (min {r['cosine_min']:.5f}) "
              f"{ {k: v for k, v in r.items() if k in shown} }", flush=True)
    return out


def llama_models() -> dict:
    """LLaMA-shaped random models: plain, GQA with partial rotary, tied embeddings."""
    import transformers

    def build(**kw):
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                       num_hidden_layers=4, num_attention_heads=4, **kw)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        inject_rmsnorm_outliers(model)
        return model

    return {
        "llama": lambda: build(num_key_value_heads=4),
        "llama-gqa-partial-rotary": lambda: build(num_key_value_heads=2,
                                                  partial_rotary_factor=0.5),
        "llama-tied": lambda: build(num_key_value_heads=4, tie_word_embeddings=True),
    }


@torch.no_grad()
def inject_rmsnorm_outliers(model, n: int = 3, factor: float = 20.0, seed: int = 0) -> None:
    """n channels of every RMSNorm's weight scaled by `factor`: the inputs of the linears
    after it get the outlier channels trained LLMs have."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None:
            ch = torch.randperm(m.weight.shape[0], generator=g)[:n]
            m.weight[ch] *= factor


def run_llamas(only) -> dict:
    out = {}
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (4, 64), generator=g) for _ in range(4)]
    evals = [torch.randint(0, 256, (4, 64), generator=g) for _ in range(2)]
    for arch, build in llama_models().items():
        model = build()
        ref = torch.cat([model(ids).logits for ids in evals])
        for name, options in LLAMAS.items():
            if only and name not in only:
                continue
            torch._dynamo.reset()
            cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
            with torch.no_grad(), qcompile.calibrate(cm):
                for ids in calib:
                    cm(ids)
            with torch.no_grad():
                test = torch.cat([cm(ids).logits for ids in evals])
            cos = torch.nn.functional.cosine_similarity(ref.flatten(1), test.flatten(1))
            r = {"cosine_mean": cos.mean().item(), "options": options,
                 **_summary(_plans(cm))}
            out[f"{arch} {name}"] = r
            print(f"{arch:<26} {name:<16} cos {r['cosine_mean']:.5f} "
                  f"act16 {r.get('act16')}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/mixed-precision.json")
    ap.add_argument("--only", action="append", help="configuration name(s) to run")
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import platform

    import triton

    meta = {**cpu_info(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    results = {"meta": meta, "minilm": run_minilm(args.only)}
    if not args.skip_llama:
        results["llama"] = run_llamas(args.only)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
