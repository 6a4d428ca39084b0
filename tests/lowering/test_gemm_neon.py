"""The AArch64 NEON int8 GEMM kernels (lowering/kernels/gemm_neon.py).

The packed layout is checked on any machine. The kernels run only on AArch64: there every
micro-kernel the CPU has is checked bit for bit against int64 arithmetic at the longest K
the int32 accumulator allows (tests/lowering/test_cpu_routes.py runs each as a route on
odd shapes, zero sizes and extremes). On x86, scripts/arm-check.sh runs them under qemu.
"""

import pytest
import torch

from qcompile.lowering import cpu_routes
from qcompile.lowering.kernels import gemm_neon
from qcompile.lowering.reference import MAX_SAFE_K

HERE = cpu_routes.cpu_capabilities()
BUILT = gemm_neon.kernel_builds()
VARIANTS = [r for r in cpu_routes.ARM_ROUTES if BUILT and cpu_routes.ROUTES[r].available(HERE)]


@pytest.mark.parametrize("n, k", [(1, 1), (8, 8), (9, 17), (16, 64), (3, 130)])
def test_packed_layout(n, k):
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    p = gemm_neon.pack_weights(w)
    n8, k8 = -(-n // 8), -(-k // 8)
    assert p.shape == (n8, k8, 4, 16) and p.is_contiguous()
    for col in range(n8 * 8):
        for kk in range(k8 * 8):
            panel, j, half = col // 8, (col % 8) // 2, col % 2
            got = int(p[panel, kk // 8, j, 8 * half + kk % 8])
            # Expected: W's value, zero where the padding is
            assert got == (int(w[col, kk]) if col < n and kk < k else 0)


def test_not_built_off_aarch64():
    if HERE.arch in ("aarch64", "arm64"):
        pytest.skip("an AArch64 machine")
    assert not BUILT and not VARIANTS


@pytest.mark.skipif(not VARIANTS, reason="needs an AArch64 CPU where the NEON kernels build")
@pytest.mark.parametrize("variant", VARIANTS)
def test_longest_k_extremes_exact(variant):
    """|acc| up to MAX_SAFE_K * 2**14 = 2**31 - 2**14: the int32 accumulator's whole range, in
    both signs, and an odd sum, with A as int8 and as uint8 a + 128."""
    k = MAX_SAFE_K
    a = torch.full((5, k), -128, dtype=torch.int8)
    a[1] = 127
    a[2, ::2] = 127
    a[3] = torch.arange(k) % 255 - 127
    a[4, : k // 2] = 127
    w = torch.full((9, k), -128, dtype=torch.int8)
    w[1] = 127
    w[2, 1::2] = 127
    w[3] = 1
    w[4:] = torch.randint(-128, 128, (5, k), dtype=torch.int8)
    want = a.to(torch.int64) @ w.to(torch.int64).T
    assert int(want.abs().max()) == MAX_SAFE_K * 2**14
    p = gemm_neon.pack_weights(w)
    assert torch.equal(gemm_neon.gemm(a, p, 9, variant).to(torch.int64), want)
    u8 = a.view(torch.uint8) + 128
    assert torch.equal(gemm_neon.gemm(u8, p, 9, variant).to(torch.int64), want)


@pytest.mark.skipif(not VARIANTS, reason="needs an AArch64 CPU where the NEON kernels build")
def test_a_compiled_model_runs_its_linears_on_the_best_neon_kernel():
    import qcompile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                torch.nn.Linear(96, 40)).eval()
    x = torch.randn(16, 64)
    torch._dynamo.reset()
    cm = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "kernels": "cpu"})
    with torch.no_grad():
        out, want = cm(x), model(x)
    layers = qcompile.report(cm).layers
    assert layers and all(r.quantized and r.kernel == f"linear_dynamic:cpu-{VARIANTS[0]}"
                          for r in layers)
    assert torch.nn.functional.cosine_similarity(out, want).min() > 0.999
