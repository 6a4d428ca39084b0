"""Empty batches through compiled models: a batch of 0 rows (0 queries, 0 keys, a batch of
0 sequences) returns an empty output of the eager model's shape under every recipe and
kernel family, compiled at 0 rows or after a first batch, with dynamic and static shapes;
an empty calibration batch changes no quantization parameter. (Each op with 0 rows, in
every implementation, is in tests/lowering/test_registry.py.)"""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.state import state_for_model
from tests.helpers import TinyMLP

RECIPES = ["w8a8", "w8a8-static", "w4a16", "w4a8", "w4a4", "float"]
STATIC = {"w8a8-static", "w4a8", "w4a4"}
KERNELS = ["reference", "cpu", "triton"]  # triton: the interpreter, on this machine


def _compile(model, recipe, calibration, dynamic=True, **options):
    cm = torch.compile(model, backend="qcompile", dynamic=dynamic,
                       options={"recipe": recipe, **options})
    if recipe in STATIC:
        with torch.no_grad(), qcompile.calibrate(cm):
            for inputs in calibration:
                cm(*inputs)
    return cm


def _close(out, ref, recipe):
    if recipe == "float":
        torch.testing.assert_close(out, ref)
    else:
        cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
        assert cos > 0.95, cos


def _mlp_run(recipe, kernels, dynamic, zero_first):
    """0 rows first (the graph for them is compiled, or calibrated, at 0 rows) or after
    a batch with rows; the rows' outputs do not depend on an empty batch before them."""
    torch.manual_seed(0)
    model = TinyMLP(64, 128).eval()
    x, empty = torch.randn(3, 64), torch.randn(0, 64)
    calibration = [(empty,), (torch.randn(4, 64),)] if zero_first else [(torch.randn(4, 64),)]
    cm = _compile(model, recipe, calibration, dynamic, kernels=kernels)
    with torch.no_grad():
        outs = [cm(empty), cm(x), cm(empty), cm(x)] if zero_first else \
            [cm(x), cm(empty), cm(x), cm(empty)]
        ref = model(x)
    ys = [o for o in outs if o.shape[0]]
    zs = [o for o in outs if not o.shape[0]]
    assert len(zs) == 2 and all(z.shape == (0, 64) and z.dtype == ref.dtype for z in zs)
    assert torch.equal(ys[0], ys[1])
    _close(ys[0], ref, recipe)
    return cm


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_0_rows_after_a_first_batch(recipe, kernels):
    _mlp_run(recipe, kernels, dynamic=True, zero_first=False)


@pytest.mark.parametrize("recipe", RECIPES)
def test_0_rows_at_compile_and_calibration_time(recipe):
    cm = _mlp_run(recipe, "cpu", dynamic=True, zero_first=True)
    if recipe in STATIC:  # the layers were quantized from the batch with rows
        assert all(layer.quantized for layer in qcompile.report(cm).layers)


@pytest.mark.parametrize("zero_first", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
def test_0_rows_with_static_shapes(recipe, zero_first):
    _mlp_run(recipe, "cpu", dynamic=False, zero_first=zero_first)


def test_the_graph_compiled_for_0_rows_measures_no_sqnr_and_says_so():
    """A graph whose sample batch has no rows: no per-layer figure (there is no signal to
    compare), not an error and not a made-up one."""
    torch.manual_seed(0)
    cm = _compile(TinyMLP(64, 128).eval(), "w8a8", [])
    with torch.no_grad():
        cm(torch.randn(3, 64))
        cm(torch.randn(0, 64))  # a graph of its own: Dynamo specializes size 0
    arts = sorted(state_for_model(cm).artifacts, key=lambda a: a.name)
    assert len(arts) == 2
    rows, empty = arts
    assert all(layer.sqnr_db is not None for layer in rows.ctx.layers.values())
    assert all(layer.sqnr_db is None for layer in empty.ctx.layers.values())
    assert any("0 rows: per-layer SQNR not measured" in n for n in empty.ctx.notes)


def test_an_empty_calibration_batch_changes_no_quantization_parameter():
    torch.manual_seed(0)
    model, twin = TinyMLP(64, 128).eval(), TinyMLP(64, 128).eval()
    twin.load_state_dict(model.state_dict())  # its own parameters: its own calibration
    batches = [torch.randn(4, 64) * 3, torch.randn(5, 64)]
    x = torch.randn(3, 64)
    plain = _compile(model, "w8a8-static", [(b,) for b in batches])
    with_empty = _compile(twin, "w8a8-static", [(torch.randn(0, 64),), (batches[0],),
                                                 (torch.randn(0, 64),), (batches[1],),
                                                 (torch.randn(0, 64),)])
    with torch.no_grad():
        assert torch.equal(plain(x), with_empty(x))  # integer recipe: bit for bit

    def scales(cm):  # over every graph (the empty batches have one of their own)
        return {(site, c.scale, c.zero_point) for a in state_for_model(cm).artifacts
                for site, c in a.ctx.analysis["calib"].items()}

    sites = {site for site, *_ in scales(plain)}
    # in and out of both linears (and smooth's shifted inputs), each with one scale
    assert {s.removesuffix("@smooth") for s in sites} == {"in:fc1", "in:fc2", "out:fc1",
                                                           "out:fc2"}
    assert len(scales(plain)) == len(sites)
    assert scales(plain) == scales(with_empty)


class _CrossAttention(torch.nn.Module):
    """Queries from x [B, S, 64], keys and values from mem [B, T, 64]; post-norm residual
    blocks with GELU, so the integer non-linear ops have work too."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x, mem):
        (b, s, d), t, h = x.shape, mem.shape[1], self.heads
        q = self.q(x).view(b, s, h, d // h).transpose(1, 2)  # [B, H, S, D]
        k = self.k(mem).view(b, t, h, d // h).transpose(1, 2)  # [B, H, T, D]
        v = self.v(mem).view(b, t, h, d // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.o(a))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


ATTENTION = [("w8a8", {}), ("w8a8-static", {}), ("w8a8-static", {"integer_nonlinear": True}),
             ("w4a8", {}), ("w4a4", {})]


# fast tier: the CPU kernels under the dynamic and the integer-only recipes; the rest slow
ATTENTION_CASES = [
    pytest.param(recipe, options, kernels, id=f"{recipe}{'-int' if options else ''}-{kernels}",
                 marks=[] if kernels == "cpu" and recipe in ("w8a8", "w8a8-static") and
                 (options or recipe == "w8a8") else [pytest.mark.slow])
    for recipe, options in ATTENTION for kernels in KERNELS
]


@pytest.mark.parametrize("recipe, options, kernels", ATTENTION_CASES)
def test_attention_with_0_queries_0_keys_or_a_batch_of_0(recipe, options, kernels):
    torch.manual_seed(0)
    model = _CrossAttention().eval()

    def make(b, s, t):
        return torch.randn(b, s, 64), torch.randn(b, t, 64)

    cm = _compile(model, recipe, [make(2, 0, 6), make(2, 5, 6), make(2, 7, 0)],
                  kernels=kernels, **options)
    with torch.no_grad():
        for b, s, t in ((2, 5, 6), (2, 0, 6), (2, 5, 0), (0, 5, 6), (2, 3, 4)):
            x = make(b, s, t)
            out, ref = cm(*x), model(*x)
            assert out.shape == ref.shape == (b, s, 64), (b, s, t)
            if out.numel():
                _close(out, ref, recipe)
    rep = qcompile.report(cm)
    assert any(layer.kind == "attention" and layer.quantized for layer in rep.layers), str(rep)
