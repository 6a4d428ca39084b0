"""Effect of the equivalence transforms on outliers and on quantization error.

Models: all-MiniLM-L6-v2 (real weights; post-norm, so only per-head rotations and online
Hadamards apply) and a random LLaMA whose embedding and norm weights get a few outlier
hidden channels (x20..x50), the case rotations are for. Variants of each graph:
  none        canonical graph, no transform
  rotate      fold-norm-affine, layernorm-to-rmsnorm, rotate-residual, rotate-heads,
              online-hadamard (options rotate + online_hadamard)
  smooth      SmoothQuant (alpha 0.5) with per-channel maxima from calibration batches
Per linear layer: kurtosis of its input activations and of its weight, and the
max-to-mean ratio of per-input-channel maxima (activation: max over tokens of |x_j|;
weight: max over rows of |W_ij|). Quantization error: every linear's input fake-quantized
(symmetric, dynamic per-token or per-tensor) and its weight per output channel, through
qcompile.numerics.specs (the project's one quantize path), everything else in float;
error of the model output against float: relative Frobenius (and sentence-embedding
cosine for MiniLM). Attention matmuls stay float here, so the q/k Hadamard shows no
effect in these numbers. With --pipeline, also the real compiled recipes (rotations off
vs on), end to end.

    python bench/transform_effect.py [--pipeline] [--out bench/results/transform-effect.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch.fx import Interpreter

import qcompile
from qcompile.numerics.specs import QuantSpec, choose_qparams, fake_quantize
from qcompile.passes._structure import layer_name

QUANT = {  # name -> (weight bits, activation bits, activation granularity)
    "w8a8 per-token": (8, 8, "per_token"),
    "w8a8 per-tensor": (8, 8, "per_tensor"),
    "w4a8 per-token": (4, 8, "per_token"),
    "w4a4 per-token": (4, 4, "per_token"),
}
VARIANTS = {"none": {}, "rotate": {"rotate": True, "online_hadamard": True},
            "smooth": {"smooth": True, "smooth_alpha": 0.5}}


# --------------------------------------------------------------------------- models


def minilm_case(batch=16, length=48):
    """(model, calibration batches, evaluation batches, output index, pooled embedding)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qcompile import minilm

    model, tok = minilm.load()
    calib_text, eval_text = minilm.sentences()

    def batches(texts):
        out = []
        for i in range(0, len(texts) - batch + 1, batch):  # full batches: one graph shape
            enc = tok(texts[i:i + batch], padding="max_length", truncation=True,
                      max_length=length, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    return model, batches(calib_text)[:2], batches(eval_text)[:2]


def outlier_llama(channels=(7, 61, 130), factor=(20.0, 35.0, 50.0)):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outlier hidden channels, as trained LLMs have
        for c, f in zip(channels, factor, strict=True):
            model.model.embed_tokens.weight[:, c] *= f
            for layer in model.model.layers:
                layer.input_layernorm.weight[c] *= f
                layer.post_attention_layernorm.weight[c] *= f
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randint(0, 512, (8, 32), generator=gen),) for _ in range(2)]
    evals = [(torch.randint(0, 512, (8, 32), generator=gen),) for _ in range(2)]
    return model, calib, evals


# --------------------------------------------------------------------------- running


class Probe(Interpreter):
    """Runs a graph, recording each linear's input and optionally fake-quantizing it and
    its weight."""

    def __init__(self, gm, quant=None, record=None):
        super().__init__(gm)
        self.quant, self.record = quant, record

    def run_node(self, n):
        self._current = n
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        if target is not F.linear:
            return super().call_function(target, args, kwargs)
        x, w, b = args
        name = layer_name(self._current)
        if self.record is not None:
            self.record.setdefault(name, []).append(x.detach())
        if self.quant is not None:
            w_bits, a_bits, gran = self.quant
            xs, ws = QuantSpec(a_bits, granularity=gran), QuantSpec(
                w_bits, granularity="per_channel", axis=0)
            x = fake_quantize(x, *choose_qparams(x, xs), xs)
            w = fake_quantize(w, *choose_qparams(w, ws), ws)
        return F.linear(x, w, b)


def build(model, example, variant, calib):
    """The variant's GraphModule (capture, canonicalize, transforms)."""
    torch._dynamo.reset()
    opts = {"recipe": "w8a8", **VARIANTS[variant]}
    cap = qcompile.capture(model, *example, options=opts)
    if variant == "rotate":
        cap.run(until="online-hadamard")
    elif variant == "smooth":
        cap.run(until="analyze-structure")
        record = {}
        for batch in calib:
            Probe(cap.gm, record=record).run(*batch)
        cap.ctx.analysis["smooth_stats"] = {
            lin.args[1].meta["qc_param_name"]: torch.cat(
                [x.reshape(-1, x.shape[-1]) for x in record[layer_name(lin)]]).abs().amax(0)
            for lin in cap.gm.graph.nodes if lin.target is F.linear}
        cap.run_pass("smooth")
    else:
        cap.run(until="canonicalize-norm")
    return cap


def kurtosis(t: torch.Tensor) -> float:
    t = t.double().flatten()
    c = t - t.mean()
    return ((c ** 4).mean() / (c ** 2).mean() ** 2).item()


def max_to_mean(per_channel: torch.Tensor) -> float:
    return (per_channel.max() / per_channel.mean().clamp(min=1e-30)).item()


def layer_stats(cap, batches) -> dict[str, dict[str, float]]:
    record: dict[str, list] = {}
    for batch in batches:
        Probe(cap.gm, record=record).run(*batch)
    weights = {layer_name(n): qcompile.fx_utils.get_constant(cap.gm, n.args[1])
               for n in cap.gm.graph.nodes if n.target is F.linear}
    out = {}
    for name, xs in record.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()  # [tokens, K]
        w = weights[name].double()
        out[name] = {"act_kurtosis": kurtosis(x), "act_max_mean": max_to_mean(x.abs().amax(0)),
                     "w_kurtosis": kurtosis(w), "w_max_mean": max_to_mean(w.abs().amax(0))}
    return out


def _main(outputs, ref_shape):
    return next(o for o in outputs if o.shape == ref_shape)


def quant_errors(cap, batches, refs, pooled) -> dict[str, dict[str, float]]:
    result = {}
    for qname, quant in QUANT.items():
        num = den = 0.0
        cos = []
        for batch, ref in zip(batches, refs, strict=True):
            with torch.no_grad():
                out = _main(Probe(cap.gm, quant=quant).run(*batch), ref.shape).double()
            num += (out - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
            if pooled:
                cos.append(F.cosine_similarity(_pool(out, batch[1]), _pool(ref, batch[1])))
        entry = {"rel_error": (num / den) ** 0.5}
        if cos:
            entry["cosine_mean"] = torch.cat(cos).mean().item()
            entry["cosine_min"] = torch.cat(cos).min().item()
        result[qname] = entry
    return result


def _pool(hidden, mask):
    m = mask.unsqueeze(-1).double()
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def pipeline_errors(model, calib, evals, refs, pooled) -> dict[str, dict[str, float]]:
    """The real compiled recipes, rotations off and on (static shapes)."""
    out = {}
    for recipe in ("w8a8", "w4a8", "w4a4"):
        for rot in (False, True):
            torch._dynamo.reset()
            opts = {"recipe": recipe, "rotate": rot, "online_hadamard": rot}
            cm = torch.compile(model, backend="qcompile", options=opts)
            if qcompile.Options.from_user(None, opts).needs_calibration:
                with torch.no_grad(), qcompile.calibrate(cm):
                    for batch in calib:
                        cm(*batch)
            num = den = 0.0
            cos = []
            for batch, ref in zip(evals, refs, strict=True):
                with torch.no_grad():
                    res = cm(*batch)
                o = (res.logits if hasattr(res, "logits") else res.last_hidden_state).double()
                num += (o - ref).pow(2).sum().item()
                den += ref.pow(2).sum().item()
                if pooled:
                    cos.append(F.cosine_similarity(_pool(o, batch[1]), _pool(ref, batch[1])))
            entry = {"rel_error": (num / den) ** 0.5}
            if cos:
                entry["cosine_mean"] = torch.cat(cos).mean().item()
            out[f"{recipe} rotations {'on' if rot else 'off'}"] = entry
    return out


# --------------------------------------------------------------------------- report


def run_case(name, model, calib, evals, pooled, pipeline) -> dict:
    t0 = time.perf_counter()
    with torch.no_grad():
        refs = []
        for batch in evals:
            res = model(*batch)
            refs.append((res.logits if hasattr(res, "logits") else res.last_hidden_state)
                        .double())
    case = {"variants": {}}
    for variant in VARIANTS:
        cap = build(model, evals[0], variant, calib)
        case["variants"][variant] = {
            "layers": layer_stats(cap, evals),
            "quant_error": quant_errors(cap, evals, refs, pooled),
            "notes": [n for n in cap.ctx.notes if not n.startswith("structure")],
            "counters": {k: v for k, v in cap.ctx.counters.items()
                         if k.split(".")[0] not in ("freeze-params", "canonicalize-linear",
                                                    "canonicalize-attention",
                                                    "canonicalize-norm", "select-layers")},
        }
    if pipeline:
        case["pipeline"] = pipeline_errors(model, calib, evals, refs, pooled)
    case["seconds"] = round(time.perf_counter() - t0, 1)
    return case


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def print_case(name: str, case: dict) -> None:
    v = case["variants"]
    print(f"\n=== {name}: per-layer statistics, none -> rotate (smooth) ===")
    print(f"{'layer':<40} {'act kurt':>22} {'act max/mean':>22} {'w kurt':>18} "
          f"{'w max/mean':>18}")
    for layer, s0 in v["none"]["layers"].items():
        s1, s2 = v["rotate"]["layers"][layer], v["smooth"]["layers"][layer]
        cells = [f"{s0[k]:7.1f}->{s1[k]:6.1f} ({s2[k]:5.1f})" for k in ("act_kurtosis",
                                                                       "act_max_mean")]
        cells += [f"{s0[k]:5.1f}->{s1[k]:5.1f} ({s2[k]:4.1f})" for k in ("w_kurtosis",
                                                                      "w_max_mean")]
        print(f"{layer[-40:]:<40} {cells[0]:>22} {cells[1]:>22} {cells[2]:>18} {cells[3]:>18}")
    print(f"\n--- {name}: medians over layers ---")
    print(f"{'variant':<8} {'act kurt':>9} {'act max/mean':>13} {'w kurt':>8} {'w max/mean':>11}")
    for variant, data in v.items():
        med = {k: _median([s[k] for s in data["layers"].values()])
               for k in ("act_kurtosis", "act_max_mean", "w_kurtosis", "w_max_mean")}
        print(f"{variant:<8} {med['act_kurtosis']:9.2f} {med['act_max_mean']:13.2f} "
              f"{med['w_kurtosis']:8.2f} {med['w_max_mean']:11.2f}")
    cosine = "cosine_mean" in next(iter(v["none"]["quant_error"].values()))
    print(f"\n--- {name}: output error with fake-quantized linears (rel. Frobenius"
          f"{'; embedding cosine' if cosine else ''}) ---")
    print(f"{'quantization':<18} " + " ".join(f"{k:>22}" for k in v))
    for q in QUANT:
        cells = []
        for variant in v:
            e = v[variant]["quant_error"][q]
            cell = f"{e['rel_error']:.4f}"
            if "cosine_mean" in e:
                cell += f" / {e['cosine_mean']:.4f}"
            cells.append(f"{cell:>22}")
        print(f"{q:<18} " + " ".join(cells))
    if "pipeline" in case:
        print(f"\n--- {name}: compiled pipeline, output error vs float ---")
        for k, e in case["pipeline"].items():
            extra = f", cosine {e['cosine_mean']:.4f}" if "cosine_mean" in e else ""
            print(f"{k:<28} rel {e['rel_error']:.4f}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/transform-effect.json")
    ap.add_argument("--pipeline", action="store_true",
                    help="also compile the real recipes with rotations off / on")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"machine": platform.platform(), "torch": torch.__version__,
               "quantization": {k: list(v) for k, v in QUANT.items()}, "cases": {}}
    model, calib, evals = outlier_llama()
    results["cases"]["llama-outliers"] = run_case("llama-outliers", model, calib, evals,
                                                  False, args.pipeline)
    print_case("random LLaMA (d=256, 4 layers) with outlier channels x20..x50",
               results["cases"]["llama-outliers"])
    model, calib, evals = minilm_case()
    results["cases"]["all-MiniLM-L6-v2"] = run_case("all-MiniLM-L6-v2", model, calib, evals,
                                                    True, args.pipeline)
    print_case("all-MiniLM-L6-v2", results["cases"]["all-MiniLM-L6-v2"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
