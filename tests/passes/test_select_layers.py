"""select-layers on CPU graphs: the route each linear runs on, its weight range, and
kernels="auto" keeping float what no exact int8 route runs faster (DESIGN: never slower
than float). Capabilities are mocked, so every CPU kind is exercised on any machine."""

import copy
from dataclasses import replace

import pytest
import torch

import qcompile
from qcompile import annotations as ann
from qcompile.lowering import cpu_routes, ops
from qcompile.state import state_for_model
from tests.helpers import TinyMLP, expect, stage
from tests.passes.quantized_graphs import PLAIN_CPU, Chain

REAL = cpu_routes.cpu_capabilities()
AVX2 = replace(REAL, isa="AVX2", avx2=True, avx512=False, avx512_vnni=False, avx_vnni=False,
               amx=False, onednn=REAL.onednn, onednn_full_range=False)
VNNI = replace(AVX2, isa="AVX512", avx512=True, avx512_vnni=True, onednn_full_range=True)


def test_graph_unchanged_and_the_rewrites_follow_the_selection():
    torch.manual_seed(0)
    options = {"recipe": "w8a8", "kernels": "cpu", "skip": ["fc2"]}
    with cpu_routes.override_capabilities(PLAIN_CPU):
        cap = stage(Chain().eval(), torch.randn(2, 3, 16), before="select-layers",
                    options=options)
        code = cap.gm.code
        cap.run(until="select-layers")
        assert cap.gm.code == code and not cap.ctx.history[-1].modified
        # Expected: a Layer on every linear, saying whether it is quantized, and why not
        layers = [ann.get(n, ann.Layer) for n in cap.gm.graph.nodes
                  if ann.get(n, ann.Layer) is not None]
        assert [(la.name, la.quantize, la.route) for la in layers] == [
            ("fc1", True, "fp32-exact"), ("fc2", False, None), ("fc3", True, "fp32-exact")]
        assert cap.ctx.layers["fc2"].reason == "skipped by option skip='fc2'"
        cap.run(until="rewrite-linear")
    # what the rewrite makes of it: fc2 stays a float linear
    expect(cap.gm, """
        # CHECK: = torch.ops.qcompile.linear_dynamic.default(l_x_, fc1_wq, fc1_wscale, fc1_bias)
        # CHECK: linear_1 = torch._C._nn.linear(relu, fc2_weight, fc2_bias)
        # CHECK: = torch.ops.qcompile.linear_dynamic.default(reshape, fc3_wq, fc3_wscale,
    """)


class Wide(torch.nn.Module):
    """Two 512 x 512 linears (the second 512 x n_b): at 64 rows, 2**24 multiply-adds each,
    where an int8 GEMM beats float32."""

    def __init__(self, n_b: int = 512):
        super().__init__()
        self.a = torch.nn.Linear(512, 512)
        self.b = torch.nn.Linear(512, n_b)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _compile(model, x, caps, **options):
    torch._dynamo.reset()
    with cpu_routes.override_capabilities(caps):
        cm = torch.compile(model.eval(), backend="qcompile",
                           options={"recipe": "w8a8", "kernels": "auto", **options})
        with torch.no_grad():
            out = cm(x)
    (art,) = [a for a in state_for_model(cm).artifacts if a.finalized]
    return cm, art, out


def _layers(art):
    return {n.target: ann.get(n, ann.Layer) for n in art.gm.graph.nodes
            if ann.get(n, ann.Layer) is not None}


def _calibrated(model, x, **options):
    torch._dynamo.reset()
    cm = torch.compile(model.eval(), backend="qcompile", options={"kernels": "auto",
                                                                  **options})
    with torch.no_grad():
        with qcompile.calibrate(cm):
            cm(x)
    (art,) = [a for a in state_for_model(cm).artifacts if a.finalized]
    return cm, art


@pytest.mark.skipif(not ops.vnni_attention_runs_on("cpu"), reason="needs AVX512-VNNI")
def test_attention_on_a_vnni_cpu_runs_the_int8_kernel_unless_q_k_would_rotate():
    """Under kernels="auto" static and dynamic recipes run the int8 kernel; a recipe that
    would rotate q and k online for it keeps float attention with the reason; kernels="cpu"
    quantizes it anyway."""
    torch.manual_seed(0)
    model, x = SelfAttention(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    cm, art = _calibrated(copy.deepcopy(model), x, recipe="w8a8-static", smooth=False)
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert rec.quantized and rec.kernel == "attention_int8:cpu-vnni"
    with torch.no_grad():
        torch.testing.assert_close(cm(x), want, atol=0.05, rtol=0.05)
    _, art = _calibrated(copy.deepcopy(model), x, recipe="w4a8", group_size=16)
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert not rec.quantized and "rotates q and k at run time" in rec.reason
    cm, art, _ = _compile(copy.deepcopy(model), x, REAL)  # w8a8: dynamic
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert rec.quantized and rec.kernel == "attention_int8:cpu-vnni"
    with torch.no_grad():
        torch.testing.assert_close(cm(x), want, atol=0.03, rtol=0.03)
    cm, art, _ = _compile(copy.deepcopy(model), x, REAL, kernels="cpu")
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert rec.quantized and rec.kernel == "attention_int8:cpu-vnni"
    with torch.no_grad():
        torch.testing.assert_close(cm(x), want, atol=0.03, rtol=0.03)


def test_attention_kernels_that_do_not_build_are_loud_and_attention_stays_float(
        monkeypatch):
    """A VNNI CPU whose compiler cannot build either int8 attention kernel (the VNNI one's
    P V targets AVX512-BF16): each build failure warns, attention_int8 is bound to neither,
    and under auto the attention stays float with the reason (not "no AVX512-VNNI")."""
    from qcompile.lowering.kernels import attention_avx2, attention_cpu

    def broken():
        raise RuntimeError("error: target specific option mismatch (avx512bf16)")

    modules = (attention_cpu, attention_avx2)
    for module in modules:
        monkeypatch.setattr(module, "_kernel", broken)
        module.kernel_builds.cache_clear()
    try:
        with pytest.warns(UserWarning, match="VNNI attention kernel did not build"):
            assert not attention_cpu.kernel_builds()
        with pytest.warns(UserWarning, match="AVX2 attention kernel did not build"):
            assert not attention_avx2.kernel_builds()
        with cpu_routes.override_capabilities(VNNI):
            assert not ops.vnni_attention_runs_on("cpu")
            assert not ops.avx2_attention_runs_on("cpu")
            torch.manual_seed(0)
            _, art = _calibrated(SelfAttention(), torch.randn(2, 5, 16), recipe="w8a8-static",
                                 smooth=False)
        (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
        assert not rec.quantized and "kernel is built here" in rec.reason
    finally:
        for module in modules:
            module.kernel_builds.cache_clear()


@pytest.mark.skipif(not REAL.onednn, reason="needs oneDNN's int8 kernels")
def test_avx2_runs_big_layers_on_onednn_with_7_bit_weights():
    torch.manual_seed(0)
    model, x = Wide(), torch.randn(64, 512)
    cm, art, out = _compile(model, x, AVX2)
    rep = {r.name: r for r in qcompile.report(cm).layers}
    for name in ("a", "b"):
        assert rep[name].quantized and rep[name].kernel == "linear_dynamic:cpu-onednn-u8s8"
        assert rep[name].detail["weights"].startswith("7-bit")
        assert "onednn-u8s8" in rep[name].detail["route"]
    for layer in _layers(art).values():
        assert layer.weight_bits == 7 and layer.route == "onednn-u8s8"
        assert int(layer.qweight.qweight.abs().max()) <= 64  # inside [-64, 63]
        assert int(layer.qweight.qweight.max()) <= 63
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(out, model(x)).min() > 0.999
    # "auto" runs the float remainder of a quantized CPU graph through Inductor
    assert any("Inductor" in note for note in art.ctx.notes)


def test_vnni_keeps_full_range_weights_on_int_mm():
    torch.manual_seed(0)
    model, x = Wide(), torch.randn(64, 512)
    cm, art, _ = _compile(model, x, VNNI)
    layers = list(_layers(art).values())
    assert layers and all(layer.route == "int-mm" and layer.weight_bits is None
                          for layer in layers)
    assert any(int(layer.qweight.qweight.abs().max()) > 64 for layer in layers)
    assert all(r.kernel == "linear_dynamic:cpu-int-mm" for r in qcompile.report(cm).layers)


def test_auto_keeps_small_layers_float_and_says_why():
    torch.manual_seed(0)
    model, x = TinyMLP(), torch.randn(4, 16)
    cm, art, out = _compile(model, x, AVX2)
    with torch.no_grad():
        assert torch.equal(out, model(x))  # nothing quantized: the float layers ran
    for rec in qcompile.report(cm).layers:
        assert not rec.quantized
        assert "no exact int8 GEMM faster than float32" in rec.reason
        assert "M=4" in rec.reason and "too small" in rec.reason


@pytest.mark.skipif(not REAL.onednn, reason="needs oneDNN's int8 kernels")
def test_full_range_weights_forbid_the_fast_route_on_avx2():
    torch.manual_seed(0)
    cm, _, _ = _compile(Wide(), torch.randn(64, 512), AVX2, narrow_weights=False)
    for rec in qcompile.report(cm).layers:
        assert not rec.quantized and "quantize the weights to 7 bits" in rec.reason


def test_kernels_cpu_quantizes_even_where_it_is_not_faster():
    torch.manual_seed(0)
    cm, art, _ = _compile(TinyMLP(), torch.randn(4, 16), AVX2, kernels="cpu")
    assert all(r.quantized for r in qcompile.report(cm).layers)
    assert not any("Inductor" in note for note in art.ctx.notes)  # only "auto" asks for it
    assert {layer.route for layer in _layers(art).values()} == {"fp32-exact"}


def test_weight_only_int4_stays_float_on_cpu_under_auto():
    torch.manual_seed(0)
    cm, _, _ = _compile(Wide(), torch.randn(64, 512), AVX2, recipe="w4a16")
    for rec in qcompile.report(cm).layers:
        assert not rec.quantized and "dequantizes the whole weight" in rec.reason


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):  # x [B, S, 16]
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, 2, S, 8]


NO_AVX2 = replace(AVX2, isa="DEFAULT", avx2=False)


@pytest.mark.skipif(not ops.avx2_attention_runs_on("cpu"), reason="needs AVX2 and FMA")
def test_attention_without_vnni_runs_the_avx2_kernel_under_auto():
    """With AVX2 and no AVX512-VNNI, static and dynamic recipes run the AVX2 kernel."""
    torch.manual_seed(0)
    model, x = SelfAttention(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    dynamic = _compile(copy.deepcopy(model), x, AVX2)[:2]  # w8a8
    with cpu_routes.override_capabilities(AVX2):
        static = _calibrated(copy.deepcopy(model), x, recipe="w8a8-static", smooth=False)
    for cm, art in (dynamic, static):
        (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
        assert rec.quantized and rec.kernel == "attention_int8:cpu-avx2"
        with torch.no_grad():
            torch.testing.assert_close(cm(x), want, atol=0.05, rtol=0.05)


def test_attention_stays_float_on_cpu_without_an_int8_attention_kernel_under_auto():
    torch.manual_seed(0)
    _, art, _ = _compile(SelfAttention(), torch.randn(2, 5, 16), NO_AVX2)
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert not rec.quantized and "neither AVX2 nor AVX512-VNNI" in rec.reason
    assert "float SDPA" in rec.reason
    _, art, _ = _compile(SelfAttention(), torch.randn(2, 5, 16), NO_AVX2, kernels="cpu")
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert rec.quantized and rec.kernel == "attention_int8:cpu-sdpa"
    # option quantize_attention overrides either way
    _, art, _ = _compile(SelfAttention(), torch.randn(2, 5, 16), NO_AVX2,
                         quantize_attention=True)
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert rec.quantized and rec.kernel == "attention_int8:cpu-sdpa"
    _, art, _ = _compile(SelfAttention(), torch.randn(2, 5, 16), NO_AVX2, kernels="cpu",
                         quantize_attention=False)
    (rec,) = [r for r in art.ctx.layers.values() if r.kind == "attention"]
    assert not rec.quantized and rec.reason == "option quantize_attention=False"


@pytest.mark.skipif(not REAL.onednn, reason="needs oneDNN's int8 kernels")
@pytest.mark.parametrize("caps, sym, levels", [(AVX2, True, 8), (VNNI, True, 16),
                                               (AVX2, False, 4), (VNNI, False, 8)],
                         ids=["avx2", "vnni", "avx2-zero-points", "vnni-zero-points"])
def test_grouped_int4_multipliers_fit_the_route_range(caps, sym, levels):
    """w4a8 with group_size: each group's integer multiplier goes up to 16 where the route
    takes full-range int8 weights, to 8 where it needs 7-bit ones (q * 8 in [-64, 56]);
    with a zero point per group (the default) up to 8 and 4 ((q - z) * 4 in [-60, 60]); the
    report says which groups and levels each layer got."""
    torch.manual_seed(0)
    model, x = Wide(), torch.randn(64, 512)
    torch._dynamo.reset()
    with cpu_routes.override_capabilities(caps):
        cm = torch.compile(model.eval(), backend="qcompile", options={
            "recipe": "w4a8", "group_size": 64, "kernels": "cpu", "rotate": False,
            "online_hadamard": False, "smooth": False, "weight_symmetric": sym})
        with torch.no_grad():
            with qcompile.calibrate(cm):
                cm(x)
            out = cm(x)
    (art,) = [a for a in state_for_model(cm).artifacts if a.finalized]
    qlo, qhi = (-8, 7) if sym else (-15, 15)
    for layer in _layers(art).values():
        assert layer.group_levels == levels
        lo, hi = cpu_routes.ROUTES[layer.route].weight_range(caps)
        ints = layer.qweight.int_values()
        assert lo <= qlo * levels <= int(ints.min()) and int(ints.max()) <= qhi * levels <= hi
        assert int(layer.qweight.group_mult.max()) == levels
    for rec in qcompile.report(cm).layers:
        assert "groups of 64" in rec.detail["weight_groups"]
        assert f"1..{levels}" in rec.detail["weight_groups"]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(out, model(x)).min() > 0.99


# ---------------------------------------------------------------- online Hadamards


class _Timings:
    """lowering/latency.py mocked: no process is started and nothing is timed; every
    Hadamard takes `had_ms`, every quantized call `q_ms` and every float call `f_ms`."""

    def __init__(self, monkeypatch, had_ms, q_ms=1.0, f_ms=2.0):
        from qcompile.lowering import latency

        self.prefetched = []
        monkeypatch.setattr(latency, "prefetch", lambda device, specs: self.prefetched.extend(
            specs))
        monkeypatch.setattr(latency, "spec_ms", lambda device, spec: (
            had_ms if spec[0] == "hadamard" else f_ms if spec[5] is None else q_ms))


def _mlp_hadamards(caps, **options):
    """PreNorm's two MLP blocks under w4a8 (online Hadamards in front of the down
    projections), run through select-layers."""
    from qcompile.lowering.ops import HADAMARD
    from tests.passes.test_fold_norm_affine import PreNorm

    with cpu_routes.override_capabilities(caps):
        cap = stage(PreNorm("rms").eval(), torch.randint(0, 24, (2, 5)),
                    before="select-layers", options={"recipe": "w4a8", **options})
        before = cap()
        assert len([n for n in cap.gm.graph.nodes if n.target is HADAMARD]) == 2
        cap.run_pass("select-layers")
    return cap, before


def _downs(cap):
    return {la.name: la for n in cap.gm.graph.nodes
            if (la := ann.get(n, ann.Layer)) is not None and la.name.startswith("down")}


def test_a_hadamard_that_pays_keeps_its_layers_quantized(monkeypatch):
    timings = _Timings(monkeypatch, had_ms=0.5)  # 0.5 + 1.0 < 2.0
    cap, _ = _mlp_hadamards(VNNI, kernels="auto")
    # one batch of timings for the whole graph: a Hadamard, a quantized and a float call
    # per down projection, at its shape (M = 10 rows, K = 32, N = 16)
    assert ("hadamard", 16, 32) in timings.prefetched
    assert ("linear", 16, 32, 16, 8, 8, False) in timings.prefetched
    assert ("linear", 16, 32, 16, 8, None, False) in timings.prefetched
    assert all(la.quantize for la in _downs(cap).values())
    rec = cap.ctx.layers["down.0"]
    assert rec.detail["online-hadamard cost"].startswith("pays: the online Hadamard (0.50 ms")
    assert "online-hadamard(down)" in rec.transforms


def test_a_hadamard_that_costs_more_than_float_keeps_its_layers_float_and_leaves(monkeypatch):
    from qcompile.lowering.ops import HADAMARD

    _Timings(monkeypatch, had_ms=1.5)  # 1.5 + 1.0 > 2.0
    cap, before = _mlp_hadamards(VNNI, kernels="auto")
    downs = _downs(cap)
    assert downs and not any(la.quantize for la in downs.values())
    rec = cap.ctx.layers["down.1"]
    assert rec.reason.startswith("slower than float with its online Hadamard: the online "
                                 "Hadamard (1.50 ms at M=10, n=32) and the quantized call "
                                 "(1.00 ms) against float32 (2.00 ms), measured on")
    # the rotation leaves with its inverse: nothing is left to cost time, and the graph
    # computes what it did
    assert not any(n.target is HADAMARD for n in cap.gm.graph.nodes)
    assert "online-hadamard(down)" not in rec.transforms
    assert rec.detail["online-hadamard"] == "taken out: every linear it fed stays float"
    assert cap.ctx.history[-1].modified
    assert cap.ctx.history[-1].counters["hadamards_taken_out"] == 2
    torch.testing.assert_close(cap(), before, rtol=1e-5, atol=1e-5)
    # the up projections (no Hadamard in front) stay quantized
    assert ann.get(next(n for n in cap.gm.graph.nodes if (la := ann.get(n, ann.Layer))
                        and la.name == "up.0"), ann.Layer).quantize


def test_kernels_cpu_times_nothing_and_keeps_the_hadamards(monkeypatch):
    timings = _Timings(monkeypatch, had_ms=100.0)
    cap, _ = _mlp_hadamards(VNNI, kernels="cpu")
    assert not timings.prefetched and all(la.quantize for la in _downs(cap).values())


def test_a_hadamard_whose_layers_are_skipped_leaves(monkeypatch):
    from qcompile.lowering.ops import HADAMARD

    timings = _Timings(monkeypatch, had_ms=0.1)
    cap, before = _mlp_hadamards(VNNI, kernels="auto", skip=["down.0"])
    hads = [n for n in cap.gm.graph.nodes if n.target is HADAMARD]
    # down.1's Hadamard pays and stays; down.0's would feed a float layer only
    assert [h.next.target for h in hads] == [torch._C._nn.linear] and len(hads) == 1
    assert ("hadamard", 16, 32) in timings.prefetched
    assert cap.ctx.layers["down.0"].reason == "skipped by option skip='down.0'"
    assert "online-hadamard(down)" not in cap.ctx.layers["down.0"].transforms
    assert "online-hadamard(down)" in cap.ctx.layers["down.1"].transforms
    torch.testing.assert_close(cap(), before, rtol=1e-5, atol=1e-5)


def test_q_and_k_of_an_attention_that_stays_float_are_not_rotated():
    from qcompile.lowering.ops import HADAMARD

    for kernels, rotated in (("auto", False), ("cpu", True)):
        torch._dynamo.reset()
        with cpu_routes.override_capabilities(NO_AVX2):  # no int8 attention kernel
            cap = stage(SelfAttention().eval(), torch.randn(2, 5, 16), before="online-hadamard",
                        options={"recipe": "w4a8", "kernels": kernels})
            cap.run_pass("online-hadamard")
        had = [n for n in cap.gm.graph.nodes if n.target is HADAMARD]
        assert bool(had) == rotated
        if not rotated:
            assert any("q/k of" in n and "the attention stays float (this CPU has neither "
                       "AVX2 nor AVX512-VNNI: its int8 attention is float SDPA" in n
                       for n in cap.ctx.notes), cap.ctx.notes


# ---------------------------------------------------------------- ARM: timed per layer


ARM = cpu_routes.CpuCapabilities(arch="aarch64", isa="DEFAULT", dotprod=True)


def _arm_select(monkeypatch, **options):
    """Wide(n_b=8) through select-layers on a mocked ARM CPU with dot products (the NEON
    kernels mocked as built), timings mocked: quantized 1 ms for the 512-wide layer and
    3 ms for the 8-wide one, float32 2 ms for both."""
    from qcompile.lowering import latency
    from qcompile.lowering.kernels import gemm_neon

    monkeypatch.setattr(gemm_neon, "kernel_builds", lambda: True)
    prefetched = []
    monkeypatch.setattr(latency, "prefetch", lambda device, specs: prefetched.extend(specs))
    monkeypatch.setattr(latency, "spec_ms", lambda device, spec: (
        2.0 if spec[5] is None else 1.0 if spec[3] == 512 else 3.0))
    with cpu_routes.override_capabilities(ARM):
        cap = stage(Wide(n_b=8).eval(), torch.randn(64, 512), before="select-layers",
                    options={"recipe": "w8a8", **options})
        cap.run_pass("select-layers")
    layers = {la.name: la for n in cap.gm.graph.nodes if (la := ann.get(n, ann.Layer))}
    return cap, layers, prefetched


def test_arm_layers_stay_quantized_only_where_measured_faster(monkeypatch):
    cap, layers, prefetched = _arm_select(monkeypatch, kernels="auto")
    # Expected: both layers timed in one batch, quantized (per-token int8) and float32,
    # at their shapes; the one slower than float stays float and says so with both times
    assert ("linear", 64, 512, 512, 8, 8, True) in prefetched
    assert ("linear", 64, 512, 8, 8, None, False) in prefetched
    assert layers["a"].quantize and layers["a"].route == "neon-sdot"
    assert not layers["b"].quantize
    reason = cap.ctx.layers["b"].reason
    assert reason.startswith("no exact int8 GEMM faster than float32 here: 3.000 ms "
                             "quantized (neon-sdot) against 2.000 ms float32 at M=64, K=512, "
                             "N=8, measured on aarch64")
    route = cap.ctx.layers["a"].detail["route"]
    assert route.startswith("neon-sdot: NEON int8 dot product (SDOT), any int8 weights; "
                            "1.000 ms quantized")


def test_arm_kernels_cpu_times_nothing(monkeypatch):
    _, layers, prefetched = _arm_select(monkeypatch, kernels="cpu")
    assert not prefetched
    assert all(la.quantize and la.route == "neon-sdot" for la in layers.values())
