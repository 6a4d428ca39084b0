"""lowering/inline.py: quantized ops written out for Inductor give the ops' values bit for
bit, and calls whose bounds do not hold stay ops."""

import copy

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import qcompile
from qcompile.fx_utils import copy_graph_module
from qcompile.lowering import cpu_routes, ops  # noqa: F401  (declares the ops)
from qcompile.lowering.inline import inline_for_inductor

ROUTES = [r for r in cpu_routes.ROUTES
          if cpu_routes.ROUTES[r].available(cpu_routes.cpu_capabilities())]
SCALE = 0.1  # float32(0.1): x / s and x * (1 / s) round apart for many x


def _division_sensitive(n: int) -> torch.Tensor:
    """float32 x whose quantization by SCALE differs between true division and a
    multiplication by the reciprocal (what Inductor makes of division by a constant)."""
    s = torch.tensor(SCALE)
    x = (torch.arange(-2000, 2000) + 0.5) * s  # near the round-half points of x / s
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)])
    differ = torch.round(x / s) != torch.round(x * (1 / s))
    assert differ.sum() >= n  # else this test could not see the difference
    return x[differ][:n]


class _Graph(torch.nn.Module):
    """quantize -> linear_int8_dq -> (h * h) -> linear_dynamic, each bound to `impl`."""

    def __init__(self, impl: str, k: int = 48, n: int = 40, zp_term_scale: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.impl = impl
        self.register_buffer("w1", torch.randint(-64, 64, (n, k), dtype=torch.int8, generator=g))
        self.register_buffer("w2", torch.randint(-64, 64, (24, n), dtype=torch.int8, generator=g))
        self.register_buffer("b1", torch.randn(n, generator=g))
        zp_term = 3 * self.w1.to(torch.int32).sum(1) * zp_term_scale
        self.register_buffer("zp_term", zp_term)
        self.register_buffer("ws1", torch.rand(n, generator=g) * 0.01 + 1e-3)
        self.register_buffer("ws2", torch.rand(24, generator=g) * 0.01 + 1e-3)

    def forward(self, x):
        q = torch.ops.qcompile.quantize.default(x, SCALE, 3, -128, 127, impl="cpu")
        h = torch.ops.qcompile.linear_int8_dq.default(
            q, self.w1, self.b1, self.zp_term, SCALE, self.ws1, torch.float32, impl=self.impl)
        h = h * h  # a float op between them, exact in every implementation
        return torch.ops.qcompile.linear_dynamic.default(h, self.w2, self.ws2, None,
                                                         impl=self.impl)


def _inputs(k: int = 48) -> torch.Tensor:
    x = torch.randn(5, 7, k) * 4
    tricky = _division_sensitive(64)
    x.view(-1)[: tricky.numel()] = tricky
    return x


def _inlined(module: torch.nn.Module, x: torch.Tensor):
    gm = torch.fx.symbolic_trace(module)
    copy = copy_graph_module(gm)
    inlined = inline_for_inductor(copy)
    return gm, inlined.calls, compile_fx(copy, [x], config_patches=inlined.config_patches)


@pytest.mark.parametrize("route", ROUTES)
def test_inlined_ops_compile_to_the_same_values(route):
    x = _inputs()
    gm, counts, compiled = _inlined(_Graph(f"cpu-{route}"), x)
    assert counts == {"quantize": 1, "linear_int8_dq": 1, "linear_dynamic": 1}
    got = compiled(x)[0] if isinstance(compiled(x), (tuple, list)) else compiled(x)
    assert torch.equal(got, gm(x))  # the ops, run one by one
    reference = _Graph("reference")
    assert torch.equal(got, torch.fx.symbolic_trace(reference)(x))


def test_quantize_keeps_true_division():
    """Inductor has turned x / constant into x * (1 / constant) (on GPUs it still does,
    pytorch#157959); the inlined quantize divides by a tensor, and these inputs are ones
    where the two round apart."""
    x = _division_sensitive(256)

    class Q(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qcompile.quantize.default(x, SCALE, 0, -128, 127, impl="cpu")

    gm, counts, compiled = _inlined(Q(), x)
    assert counts == {"quantize": 1}
    out = compiled(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(out, gm(x))


class _Static(torch.nn.Module):
    """quantize -> linear_int8_dq -> GELU -> quantize: each quantizer reads its input once."""

    def __init__(self):
        super().__init__()
        self.g = _Graph("cpu-int-mm")

    def forward(self, x):
        q = torch.ops.qcompile.quantize.default(x, SCALE, 3, -128, 127, impl="cpu")
        h = torch.ops.qcompile.linear_int8_dq.default(
            q, self.g.w1, self.g.b1, self.g.zp_term, SCALE, self.g.ws1, torch.float32,
            impl="cpu-int-mm")
        h = torch.nn.functional.gelu(h)
        return torch.ops.qcompile.quantize.default(h, SCALE, -7, -128, 127, impl="cpu")


def test_inductor_stores_only_what_a_written_out_body_rereads():
    """A per-token quantizer reads its input twice, so Inductor is told to store long
    producers; a graph of static quantizers keeps Inductor's default, under which a
    dequantize -> GELU -> quantize chain is one loop rather than two passes over memory."""
    x = _inputs()
    gm, counts, compiled = _inlined(_Static(), x)
    assert counts == {"quantize": 2, "linear_int8_dq": 1}
    out = compiled(x)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, gm(x))
    assert inline_for_inductor(copy_graph_module(torch.fx.symbolic_trace(_Static()))) \
        .config_patches == {}
    rereads = inline_for_inductor(copy_graph_module(torch.fx.symbolic_trace(_Graph("cpu-int-mm"))))
    assert rereads.config_patches == {"realize_opcount_threshold": 8}


def test_calls_whose_bounds_do_not_hold_stay_ops():
    x = _inputs()
    # a zero-point term beyond 2**24 is not exact in a float32 epilogue
    big_zp = _Graph("cpu-fp32-exact", zp_term_scale=2**16)
    assert int(big_zp.zp_term.abs().max()) > 2**24
    gm, counts, compiled = _inlined(big_zp, x)
    assert counts == {"quantize": 1, "linear_dynamic": 1}
    out = compiled(x)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, gm(x))
    # a route chosen per call ("cpu"): no one route to write out
    _, counts, _ = _inlined(_Graph("cpu"), x)
    assert counts == {"quantize": 1}
    # a weight whose sums can pass 2**24: float32 cannot hold the accumulator
    k = 2100
    wide = _Graph("cpu-fp32-exact", k=k)
    wide.w1.fill_(63)
    wide.zp_term.copy_(3 * wide.w1.to(torch.int32).sum(1))
    _, counts, _ = _inlined(wide, torch.randn(3, k))
    assert counts == {"quantize": 1, "linear_dynamic": 1}


@pytest.mark.parametrize("recipe, op", [("w8a8-static", "linear_int8_dq"),
                                        ("w4a4", "linear_a4w4_grouped_dynamic")])
def test_a_compiled_model_runs_its_quantized_layers_inlined(recipe, op):
    """Under options["inductor"], the graph Inductor compiles has the ops written out; the
    report says so, and the results equal the uncompiled graph's (its float ops are exact
    here)."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 96)
            self.fc2 = torch.nn.Linear(96, 32)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h * h)

    torch.manual_seed(0)
    model = M().eval()
    xs = [torch.randn(4, 64) for _ in range(3)]
    outs = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        m = copy.deepcopy(model)  # its own calibration
        cm = torch.compile(m, backend="qcompile", options={
            "recipe": recipe, "kernels": "cpu", "inductor": inductor})
        with torch.no_grad(), qcompile.calibrate(cm):
            for x in xs:
                cm(x)
        with torch.no_grad():
            outs[inductor] = cm(xs[0])
        notes = [n for g in qcompile.report(cm).graphs for n in g.notes]
        assert any("Inductor fuses" in n and op in n for n in notes) == inductor
    assert torch.equal(outs[True], outs[False])


def _weight_range(impl: str) -> tuple[int, int]:
    """The int8 weights `impl`'s route is exact for on this CPU (7-bit for oneDNN's u8 x s8
    kernel without VNNI; a route refuses the others); the reference takes any."""
    route = cpu_routes.ROUTES.get(impl.removeprefix("cpu-"))
    return route.weight_range(cpu_routes.cpu_capabilities()) if route else (-128, 127)


class _W4A4(torch.nn.Module):
    """linear_a4w4_dynamic -> (h * h) -> linear_a4w4_grouped_dynamic, bound to `impl`, with
    the int8 weight values a CPU implementation's prepare leaves (int4 values; grouped:
    (q - z) * mult); asymmetric activations (w_sum) unless symmetric; act_group: the
    activations in groups (quantize_int4_groups), symmetric."""

    def __init__(self, impl: str, symmetric: bool, bias: bool, k: int = 64, n: int = 48,
                 weights_for: str | None = None, act_group: int = 0):
        super().__init__()
        from qcompile.lowering import a4_ops

        g = torch.Generator().manual_seed(1)
        self.impl, self.symmetric, self.act_group = impl, symmetric or act_group, act_group
        w1 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        lo, hi = _weight_range(weights_for or impl)  # (q - z) * mult, q - z in [-15, 15]
        top = min(8, lo // -15, hi // 15)
        mult = torch.randint(1, top + 1, (24, n // 16), dtype=torch.int8, generator=g)
        wzp = torch.randint(-8, 8, (24, n // 16), dtype=torch.int8, generator=g)
        q2 = torch.randint(-8, 8, (24, n), dtype=torch.int8, generator=g)
        from qcompile.numerics.specs import pack_int4

        w2 = ops.grouped_int4_values(pack_int4(q2), mult, wzp)
        for name, t in (("w1", w1), ("w2", w2), ("mult", mult), ("wzp", wzp)):
            self.register_buffer(name, t)
        self.register_buffer("ws1", torch.rand(n, generator=g) * 0.01 + 1e-3)
        self.register_buffer("ws2", torch.rand(24, generator=g) * 0.01 + 1e-3)
        self.register_buffer("b1", torch.randn(n, generator=g) if bias else None)
        self.register_buffer("s1", a4_ops.weight_row_sums(w1))
        self.register_buffer("s2", a4_ops.weight_row_sums(w2))

    def forward(self, x):
        s1, s2 = (None, None) if self.symmetric else (self.s1, self.s2)
        h = torch.ops.qcompile.linear_a4w4_dynamic.default(x, self.w1, self.ws1, self.b1, 0.9,
                                                           s1, self.act_group, impl=self.impl)
        h = h * h
        return torch.ops.qcompile.linear_a4w4_grouped_dynamic.default(
            h, self.w2, self.mult, self.wzp, self.ws2, None, 1.0, s2, self.act_group,
            impl=self.impl)


@pytest.mark.parametrize("symmetric, bias, act_group", [(False, True, 0), (True, False, 0),
                                                        (True, True, 16)],
                         ids=["asymmetric-bias", "symmetric", "groups-bias"])
@pytest.mark.parametrize("route", ROUTES)
def test_inlined_w4a4_compiles_to_the_same_values(route, symmetric, bias, act_group):
    x = _inputs(64)
    gm, counts, compiled = _inlined(_W4A4(f"cpu-{route}", symmetric, bias,
                                          act_group=act_group), x)
    assert counts == {"linear_a4w4_dynamic": 1, "linear_a4w4_grouped_dynamic": 1}
    got = compiled(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert torch.equal(got, gm(x))  # the ops, run one by one
    reference = _W4A4("reference", symmetric, bias, weights_for=f"cpu-{route}",
                      act_group=act_group)
    assert torch.equal(got, torch.fx.symbolic_trace(reference)(x))


def test_w4a4_zero_point_terms_beyond_float32_stay_ops():
    from qcompile.lowering import a4_ops

    w = torch.randint(-8, 8, (2, 64), dtype=torch.int8)
    a = {"w": w, "w_sum": torch.tensor([2**21 + 1, 0], dtype=torch.int32), "clip": 1.0}
    # 8 * (2**21 + 1) > 2**24: a float32 accumulator could not hold x_zp * w_sum exactly
    assert a4_ops._inline_plan(a, "cpu-fp32-exact") is None
    # an int32 accumulator subtracts in int64: exact at any size
    assert a4_ops._inline_plan(a, "cpu-int-mm").options == {"route": "int-mm"}
    assert a4_ops._inline_plan({**a, "w_sum": None}, "cpu-fp32-exact") is not None
    assert a4_ops._inline_plan(a, "cpu") is None  # a route chosen per call


class _Requantizing(torch.nn.Module):
    """quantize -> linear_int8 (per-channel multipliers, bias, zero-point term) ->
    linear_w4a8_grouped (per-tensor, its int8 weight values as `prepare` leaves them),
    bound to `impl`: int8 out of both, with shifts from 1 to 62, q at 0 and 2**31 - 1,
    and accumulators near the int32 contract's edge."""

    def __init__(self, impl: str, k: int = 96, n: int = 40, weights_for: str | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.impl = impl
        lo, hi = _weight_range(weights_for or impl)
        w1 = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, generator=g)
        w1[0] = hi  # a row whose accumulator reaches hi * 128 * k
        w1[1] = lo
        q1 = torch.randint(2**30, 2**31, (n,), generator=g)
        q1[:2] = torch.tensor([0, 2**31 - 1])
        shift1 = torch.randint(18, 40, (n,), generator=g)
        shift1[2:4] = torch.tensor([1, 62])
        self.register_buffer("w1", w1)
        self.register_buffer("b1", torch.randint(-2**20, 2**20, (n,), dtype=torch.int32,
                                                 generator=g))
        self.register_buffer("zp1", 3 * w1.to(torch.int32).sum(1))
        self.register_buffer("q1", q1)
        self.register_buffer("s1", shift1)
        self.register_buffer("w2", torch.randint(-60, 61, (24, n), dtype=torch.int8,
                                                 generator=g))
        self.register_buffer("mult", torch.ones(24, n // 8, dtype=torch.int8))
        self.register_buffer("q2", torch.tensor([1518500250]))
        self.register_buffer("s2", torch.tensor([39]))

    def forward(self, x):
        q = torch.ops.qcompile.quantize.default(x, SCALE, 3, -128, 127, impl="cpu")
        h = torch.ops.qcompile.linear_int8.default(q, self.w1, self.b1, self.zp1, self.q1,
                                                   self.s1, -5, -128, 127, impl=self.impl)
        return torch.ops.qcompile.linear_w4a8_grouped.default(
            h, self.w2, self.mult, None, None, None, self.q2, self.s2, 7, -100, 120,
            impl=self.impl)


@pytest.mark.parametrize("route", ROUTES)
def test_inlined_requantizing_linears_compile_to_the_same_integers(route):
    """On an int32-accumulator route (int-mm, the NEON routes) the dyadic requantization is
    written out in int64 (what the op runs, fused by Inductor); a float32-accumulator route
    keeps the op, whose requantize_f32 is faster than int64 arithmetic where CPUs emulate
    it."""
    x = _inputs(96)
    x.view(-1)[:96] = 1e6  # a row of 127s after quantization
    x.view(-1)[96:192] = -1e6  # and one of -128s
    gm, counts, compiled = _inlined(_Requantizing(f"cpu-{route}"), x)
    requantizing = ({} if cpu_routes.ROUTES[route].native_f32 else
                    {"linear_int8": 1, "linear_w4a8_grouped": 1})
    assert counts == {"quantize": 1, **requantizing}
    got = compiled(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.dtype == torch.int8
    assert torch.equal(got, gm(x))  # the ops, run one by one
    reference = _Requantizing("reference", weights_for=f"cpu-{route}")
    assert torch.equal(got, torch.fx.symbolic_trace(reference)(x))
    assert got.unique().numel() > 20  # not saturated throughout


class _SharedInputs(torch.nn.Module):
    """A quantized input read by two linears and a computed bool mask read by two
    attentions: what Inductor would recompute into a copy for each reader."""

    def __init__(self, route: str, k: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.route = route
        self.register_buffer("w", torch.randint(-64, 64, (k, k), dtype=torch.int8, generator=g))
        self.register_buffer("ws", torch.rand(k, generator=g) * 0.01 + 1e-3)
        self.register_buffer("s", torch.tensor(0.05))

    def forward(self, x, keep):
        q = torch.ops.qcompile.quantize.default(x, SCALE, 3, -128, 127, impl="cpu")
        a, b = (torch.ops.qcompile.linear_int8_dq.default(
            q, self.w, None, None, SCALE, self.ws, torch.float32, impl=self.route)
            for _ in range(2))
        mask = ((keep > 0)[:, None, None, :] & (keep.new_ones(keep.shape[1]) > 0)[:, None])
        qa, qb = (torch.ops.qcompile.quantize.default(t.view(2, 1, 8, 32), 0.05, 0, -128, 127,
                                                      impl="cpu") for t in (a, b))
        return [torch.ops.qcompile.attention_int8.default(
            t, t, t, self.s, self.s, self.s, mask, False, None, torch.float32,
            impl="reference") for t in (qa, qb)]


def test_what_several_opaque_calls_read_is_stored_once():
    """The quantized input of two GEMMs and a mask two attentions read go through one
    stored node each (Inductor's stride prim), the generated code allocates the mask once
    (not once per attention), and the results equal the uncompiled graph's."""
    from torch._inductor.utils import run_and_get_code
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    route = next(r for r in ROUTES if r != "fp32-exact") if len(ROUTES) > 1 else ROUTES[0]
    module = _SharedInputs(f"cpu-{route}").eval()
    x, keep = torch.randn(16, 32) * 4, torch.tensor([[1] * 6 + [0] * 2, [1] * 8])
    gm = torch.fx.symbolic_trace(module)
    # the values the pass reads, as Dynamo records them
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x, keep)
    graph = copy_graph_module(gm)
    inlined = inline_for_inductor(graph)
    stores = [n for n in graph.graph.nodes
              if n.target is torch.ops.prims.inductor_force_stride_order.default]
    assert len(stores) == 2 and all(len(n.users) == 2 for n in stores)
    assert {n.args[0].meta["val"].dtype for n in stores} == {torch.int8, torch.bool}
    compiled, (code,) = run_and_get_code(
        lambda: compile_fx(graph, [x, keep], config_patches=inlined.config_patches))
    for got, want in zip(compiled(x, keep), gm(x, keep)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert code.count("torch.bool)") == 1, code


def test_rational_erf_is_within_5e_7_of_erf():
    from qcompile.lowering.inline import erf_rational

    x = torch.linspace(-6, 6, 1_000_001)
    err = (erf_rational(x).double() - torch.erf(x.double())).abs()
    assert err.max() <= 5e-7, float(err.max())
    assert torch.equal(erf_rational(-x), -erf_rational(x))  # odd, as erf


class _Gelus(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x) + torch.nn.functional.gelu(x, approximate="tanh")


def test_exact_gelus_on_cpu_get_the_rational_erf_and_tanh_ones_stay():
    from torch.fx.passes.shape_prop import ShapeProp

    x = torch.randn(64, 96) * 4
    gm = torch.fx.symbolic_trace(_Gelus())
    ShapeProp(gm).propagate(x)
    for node in gm.graph.nodes:  # ShapeProp's tensor_meta as the fake values lowering keeps
        if "tensor_meta" in node.meta:
            node.meta["val"] = torch.empty(node.meta["tensor_meta"].shape)
    inlined = inline_for_inductor(gm)
    assert inlined.rational_gelus == 1 and not inlined.calls
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.nn.functional.gelu in targets  # the tanh one
    got, want = gm(x), _Gelus()(x)
    assert (got - want).abs().max() <= 2.2e-7 * float(x.abs().max()) + 1e-6
