"""The generated Triton int8 GEMM against the integer reference, bit for bit.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small. The CUDA tests at the end run the compiled
kernels on bigger shapes when a GPU is present.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import FileCheck

from qcompile.lowering import device as qdevice
from qcompile.lowering.autotune import GemmConfig
from qcompile.lowering.codegen import generated_source, kernel_path, load_kernel
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize
from qcompile.lowering.gemm import gemm_int8
from qcompile.lowering.reference import gemm_int8_ref, random_operands

pytestmark = pytest.mark.skipif(
    qdevice.triton_target() == "none", reason="needs CUDA or TRITON_INTERPRET=1"
)
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

EPILOGUES = [
    Epilogue(),
    Epilogue((Bias(),)),
    Epilogue((Requantize(),)),
    Epilogue((Bias(), Requantize(per_channel=True))),
    Epilogue((InputZeroPoint(), Bias(), Requantize(per_channel=True))),
    Epilogue((Dequantize("float32"),)),
    Epilogue((InputZeroPoint(), Dequantize("float16", has_bias=True))),
    Epilogue((Bias(), Dequantize("bfloat16", has_bias=True))),
]
SMALL = GemmConfig(16, 16, 16, group_m=2)  # many tiles and K steps even on tiny shapes


@pytest.fixture(scope="module")
def kdir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


def run(a, w, ep, vals, kdir, config=SMALL, **kw):
    return gemm_int8(a, w, ep, **vals, config=config, kernel_cache_dir=kdir, **kw)


@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: e.signature())
def test_every_epilogue_matches_reference(ep, kdir):
    a, w, vals = random_operands(ep, 37, 29, 71, seed=1, device=DEV)
    got = run(a, w, ep, vals, kdir)
    assert got.dtype == ep.out_dtype
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 70), n=st.integers(1, 50), k=st.integers(1, 90),
    ep=st.sampled_from(EPILOGUES), seed=st.integers(0, 2**16),
    block_k=st.sampled_from([16, 32]),
)
def test_odd_shapes_match_reference(m, n, k, ep, seed, block_k, kdir):
    a, w, vals = random_operands(ep, m, n, k, seed=seed, device=DEV)
    got = run(a, w, ep, vals, kdir, config=GemmConfig(16, 32, block_k, group_m=3))
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


def test_default_config_and_autotune_path(kdir, tmp_path):
    ep = Epilogue((Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 40, 24, 50, seed=2, device=DEV)
    got = gemm_int8(a, w, ep, **vals, kernel_cache_dir=kdir, autotune_cache_dir=tmp_path)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


def test_non_contiguous_a(kdir):
    ep = Epilogue((InputZeroPoint(), Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 33, 21, 45, seed=4, device=DEV)
    at = a.t().contiguous().t()  # column-major [M, K]
    assert not at.is_contiguous()
    big = torch.randint(-128, 128, (80, 100), dtype=torch.int8, device=DEV)
    sliced = big[3:69:2, 7:52]  # row stride 200, offset start
    wt = w.t().contiguous().t()  # W with non-unit stride along K
    for aa, ww in [(at, w), (sliced, w), (at, wt)]:
        got = run(aa, ww, ep, vals, kdir)
        assert torch.equal(got, gemm_int8_ref(aa, ww, ep, **vals))


@pytest.mark.parametrize("per_channel", [False, True])
def test_extremes_at_the_edge_of_the_contract(per_channel, kdir):
    # All -128 / 127 inputs, and a bias that puts acc + bias at exactly +-2**31 (and one
    # off), with q and shift at both ends of their ranges.
    k, n = 64, 8
    ep = Epilogue((Bias(), Requantize(per_channel=per_channel)))
    a = torch.tensor([[-128] * k, [127] * k, [-128] * k, [0] * k], dtype=torch.int8)
    w = torch.tensor([[-128] * k, [127] * k] * (n // 2), dtype=torch.int8)
    acc = a.long() @ w.long().T  # [4, N]
    bias = torch.tensor([2**31 - 1] * n) - acc[0]  # row 0 reaches 2**31 - 1
    bias = bias.clamp(-(2**31), 2**31 - 1).to(torch.int32)
    a, w = a.to(DEV), w.to(DEV)
    for q, s in [((1 << 31) - 1, 62), (1 << 30, 1), ((1 << 31) - 1, 31), (1518500250, 33)]:
        qq = torch.full((n,), q) if per_channel else q
        ss = torch.full((n,), s) if per_channel else s
        for zp, qmin in [(0, -128), (-5, -5), (127, 127)]:
            vals = dict(bias=bias.to(DEV), q=qq, shift=ss, out_zero_point=zp, qmin=qmin)
            got = run(a, w, ep, vals, kdir)
            assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals)), (q, s, zp)
    int32_ep = Epilogue((Bias(),))
    got = run(a, w, int32_ep, {"bias": bias.to(DEV)}, kdir)
    assert torch.equal(got, gemm_int8_ref(a, w, int32_ep, bias=bias))
    assert int(got[0, 0]) == 2**31 - 1


def test_relu_clamp_is_qmin_equal_zero_point(kdir):
    ep = Epilogue((Requantize(),))
    a, w, vals = random_operands(ep, 20, 20, 40, seed=5, device=DEV)
    vals.update(out_zero_point=-3, qmin=-3)
    got = run(a, w, ep, vals, kdir)
    assert int(got.min()) == -3
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


def test_empty_and_degenerate_shapes(kdir):
    ep = Epilogue((Bias(),))
    for m, n, k in [(0, 5, 7), (5, 0, 7), (3, 4, 0), (1, 1, 1)]:
        a, w, vals = random_operands(ep, m, n, k, seed=6, device=DEV)
        got = run(a, w, ep, vals, kdir)
        assert got.shape == (m, n)
        assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))


def test_input_checks():
    a = torch.zeros(4, 8, dtype=torch.int8, device=DEV)
    with pytest.raises(TypeError, match="int8"):
        gemm_int8(a.float(), torch.zeros(3, 8, dtype=torch.int8, device=DEV))
    with pytest.raises(ValueError, match="K differs"):
        gemm_int8(a, torch.zeros(3, 9, dtype=torch.int8, device=DEV))
    with pytest.raises(TypeError, match="unexpected"):
        gemm_int8(a, torch.zeros(3, 8, dtype=torch.int8, device=DEV),
                  bias=torch.zeros(3, dtype=torch.int32, device=DEV))


def test_integer_only_source_has_no_float():
    for ep in EPILOGUES:
        src = generated_source(ep, origin="layers.0.mlp.fc1 (linear_3)")
        FileCheck().check(f"# epilogue: {ep.signature()}").check(
            "# serves:   layers.0.mlp.fc1 (linear_3)"
        ).check("tl.dot(a, w, acc, out_dtype=tl.int32)").run(src)
        if ep.integer_only:
            fc = FileCheck().check("# serves:")
            for banned in ("float", "fp32", "fp16", "bf16", ".to(tl.float"):
                fc = fc.check_not(banned)
            fc.run(src)
            assert "float" not in src.lower()
        else:
            FileCheck().check("x.to(tl.float32)").check("row_scale[:, None]").run(src)
    src = generated_source(Epilogue((Bias(), Requantize(per_channel=True))))
    # The dyadic contract, line by line: int64 multiply, add half, shift, sign, zp, clamp.
    FileCheck().check("x = acc.to(tl.int64)").check("x = x + bias.to(tl.int64)").check(
        "p = x * q.to(tl.int64)"
    ).check("<< (shift - 1)").check("(tl.abs(p) + half) >> shift").check(
        "tl.where(p < 0, -mag, mag) + out_zero_point"
    ).check("tl.maximum(y, qmin").check("tl.minimum(y, qmax").check("y.to(tl.int8)").run(src)


def test_generated_file_is_cached_and_records_origins(tmp_path):
    ep = Epilogue((Bias(), Requantize()))
    spec = load_kernel(ep, origin="model.fc1", cache_dir=tmp_path)
    assert spec.path == kernel_path(ep, tmp_path.resolve()) and spec.path.exists()
    text = spec.path.read_text()
    assert text.startswith(generated_source(ep, origin="model.fc1"))
    assert load_kernel(ep, origin="model.fc2", cache_dir=tmp_path) is spec  # one per signature
    load_kernel(ep, origin="model.fc2", cache_dir=tmp_path)
    lines = spec.path.read_text().splitlines()
    assert lines.count("# also serves: model.fc2") == 1
    assert load_kernel(Epilogue((Bias(),)), cache_dir=tmp_path).path != spec.path


# ---------------------------------------------------------------- CUDA (compiled kernels)

needs_cuda = pytest.mark.skipif(not CUDA, reason="compiled Triton kernels need a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: e.signature())
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (300, 1000, 1544), (2048, 768, 3072)])
def test_cuda_kernels_match_reference(ep, mnk, kdir, tmp_path):
    m, n, k = mnk
    a, w, vals = random_operands(ep, m, n, k, seed=7, device="cuda")
    ref = gemm_int8_ref(a, w, ep, **vals)
    # The untuned default and configs from both spaces: a config never changes the result.
    got = gemm_int8(a, w, ep, **vals, autotune=False, kernel_cache_dir=kdir,
                    autotune_cache_dir=tmp_path)
    assert torch.equal(got, ref)
    for cfg in [GemmConfig(16, 64, 128, 1, 4, 4), GemmConfig(128, 128, 64, 8, 4, 3)]:
        assert torch.equal(run(a, w, ep, vals, kdir, config=cfg), ref)


@needs_cuda
def test_cuda_autotune_persists_and_is_reused(kdir, tmp_path):
    from qcompile.lowering import autotune

    ep = Epilogue((Bias(), Requantize(per_channel=True)))
    a, w, vals = random_operands(ep, 128, 1024, 1024, seed=8, device="cuda")
    before = autotune.TUNE_COUNT
    got = gemm_int8(a, w, ep, **vals, kernel_cache_dir=kdir, autotune_cache_dir=tmp_path)
    assert torch.equal(got, gemm_int8_ref(a, w, ep, **vals))
    assert autotune.TUNE_COUNT == before + 1
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    (entry,) = entries.values()
    assert entry["ms"] > 0 and len(entry["timings"]) > 1
    gemm_int8(a[:100], w, ep, **vals, kernel_cache_dir=kdir, autotune_cache_dir=tmp_path)
    assert autotune.TUNE_COUNT == before + 1  # same M bucket: no second tuning


@needs_cuda
def test_cuda_matches_int_mm_and_handles_strided_a(kdir):
    a = torch.randint(-128, 128, (512, 2048), dtype=torch.int8, device="cuda")
    w = torch.randint(-128, 128, (1024, 2048), dtype=torch.int8, device="cuda")
    got = gemm_int8(a, w, kernel_cache_dir=kdir, autotune=False)
    assert torch.equal(got, torch._int_mm(a, w.t()))
    at = a.t().contiguous().t()
    assert torch.equal(gemm_int8(at, w, kernel_cache_dir=kdir, autotune=False), got)
