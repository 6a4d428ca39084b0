"""Fused int8 attention: kernel (interpreter on CPU) vs the float64 reference of the same
quantization (tight: only P's float16 rounding and float32 sums differ), the registry's CPU
implementations of attention_int8 (float SDPA on dequantized inputs; the VNNI kernel where
the CPU has it) vs the same reference, and both vs float SDPA on the unquantized tensors
(loose: int8 quantization error of q, k, v)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering import ops, registry
from qcompile.lowering.kernels.attention import (
    quantized_attention_ref,
    quantized_attention_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # -inf - -inf in numpy


def _quant_per_head(x):
    """Symmetric per-head int8: [B, H, S, D] -> (int8, float32 scale [H])."""
    s = x.abs().amax(dim=(0, 2, 3)) / 127
    q = torch.round(x / s[None, :, None, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def _inputs(b, hq, hkv, sq, sk, d, seed):
    g = torch.Generator().manual_seed(seed)
    qf = torch.randn(b, hq, sq, d, generator=g)
    kf = torch.randn(b, hkv, sk, d, generator=g)
    vf = torch.randn(b, hkv, sk, d, generator=g)
    return (qf, kf, vf), (*_quant_per_head(qf), *_quant_per_head(kf), *_quant_per_head(vf))


# every CPU implementation that runs on this machine (cpu-vnni needs AVX512-VNNI)
CPU_IMPLS = [i.name for i in registry.candidates(ops.attention_int8, "cpu", "cpu")]


def _cpu_op(q, k, v, qs, ks, vs, causal=False, attn_mask=None, key_padding_mask=None,
            impl="cpu"):
    """attention_int8's CPU implementation (the op has no key padding mask: it enters as a
    keep mask, as the attention passes give it)."""
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Sk]
        attn_mask = keep if attn_mask is None else keep & attn_mask
    return ops.attention_int8(
        q, k, v, qs, ks, vs, attn_mask, causal, None, torch.float32, impl=impl
    )


def _run_all(quant, **kw):
    q, qs, k, ks, v, vs = quant
    out = quantized_attention_triton(q, k, v, qs, ks, vs, out_dtype=torch.float32, **kw)
    ref = quantized_attention_ref(q, k, v, qs, ks, vs, out_dtype=torch.float64, **kw)
    # P in float16 carries 2**-11 relative error per probability: the output error is at
    # most ~2**-11 * max|v| * (1 + float32 noise).
    tol = 2.0**-10 * float(vs.max()) * 127
    assert (out.double() - ref).abs().max() <= tol
    for impl in CPU_IMPLS:  # float32 softmax and P V: float32 noise only; bf16 P: 2**-9
        cpu = _cpu_op(q, k, v, qs, ks, vs, impl=impl, **kw)
        bound = _BF16_P if impl == "cpu-vnni" and _bf16_pv() else 1e-5
        assert (cpu.double() - ref).abs().max() <= bound * float(vs.max()) * 127, impl
    return out


# P rounded to bf16 (8 significant bits, relative error <= 2**-9 per probability; the
# probabilities sum to 1): the output error is at most ~2**-9 * max|v|, with float32 noise
_BF16_P = 2.0**-8


def _bf16_pv() -> bool:
    from qcompile.lowering.kernels.attention_cpu import bf16_pv_available

    return bf16_pv_available()


def _sdpa(floats, mask=None, causal=False):
    qf, kf, vf = floats
    rep = qf.shape[1] // kf.shape[1]
    kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, is_causal=causal)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "b, hq, hkv, sq, sk, d",
    [(1, 2, 2, 16, 16, 16), (2, 4, 2, 19, 37, 32), (1, 4, 1, 5, 40, 24), (1, 2, 1, 33, 7, 64)],
)
def test_matches_reference_and_sdpa(b, hq, hkv, sq, sk, d):
    floats, quant = _inputs(b, hq, hkv, sq, sk, d, seed=sq * sk)
    out = _run_all(quant)
    assert _rel(out, _sdpa(floats)) < 2e-2


@pytest.mark.parametrize("sq, sk", [(21, 21), (9, 30)])
def test_causal(sq, sk):
    floats, quant = _inputs(1, 4, 2, sq, sk, 32, seed=sk)
    out = _run_all(quant, causal=True)
    assert _rel(out, _sdpa(floats, causal=True)) < 2e-2
    # Query 0 sees key 0 only: its output is v[0] dequantized (up to P = 1 exactly).
    q, qs, k, ks, v, vs = quant
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0].float() * vs[0], rtol=1e-6, atol=1e-6)


def test_additive_and_bool_masks():
    floats, quant = _inputs(2, 4, 2, 13, 29, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    add = torch.randn(2, 1, 13, 29, generator=g)  # broadcast over heads
    out = _run_all(quant, attn_mask=add)
    assert _rel(out, _sdpa(floats, mask=add)) < 2e-2
    keep = torch.rand(2, 4, 13, 29, generator=g) > 0.3  # per head, bool = keep
    keep[..., 0] = True
    out = _run_all(quant, attn_mask=keep)
    assert _rel(out, _sdpa(floats, mask=keep)) < 2e-2
    # causal combined with a mask: SDPA takes the two merged into one.
    both = keep & torch.ones(13, 29, dtype=torch.bool).tril()
    out = _run_all(quant, attn_mask=keep, causal=True)
    assert _rel(out, _sdpa(floats, mask=both)) < 2e-2


def test_key_padding_and_empty_rows():
    floats, quant = _inputs(2, 2, 2, 8, 24, 16, seed=7)
    kpm = torch.zeros(2, 24, dtype=torch.bool)
    kpm[0, 17:] = True
    kpm[1, :] = True  # batch 1 sees nothing: output 0 (SDPA would give NaN)
    out = _run_all(quant, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref0 = _sdpa([t[:1] for t in floats], mask=~kpm[:1, None, None, :])
    assert _rel(out[:1], ref0) < 2e-2


def test_gqa_equals_repeated_heads():
    _, quant = _inputs(1, 4, 2, 17, 20, 32, seed=8)
    q, qs, k, ks, v, vs = quant
    gqa = quantized_attention_triton(q, k, v, qs, ks, vs, out_dtype=torch.float32)
    mha = quantized_attention_triton(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), qs,
                                     ks.repeat_interleave(2), vs.repeat_interleave(2),
                                     out_dtype=torch.float32)  # fmt: skip
    assert torch.equal(gqa, mha)


def test_non_contiguous_per_tensor_scales_and_dtypes():
    g = torch.Generator().manual_seed(9)
    # [B, S, H, D] storage viewed as [B, H, S, D], as transformers lays q/k/v out.
    q = torch.randint(-127, 128, (1, 18, 2, 16), generator=g, dtype=torch.int8).transpose(1, 2)
    k = torch.randint(-127, 128, (1, 23, 2, 16), generator=g, dtype=torch.int8).transpose(1, 2)
    v = torch.randint(-127, 128, (1, 23, 2, 16), generator=g, dtype=torch.int8).transpose(1, 2)
    args = (q, k, v, 0.02, 0.03, 0.01)
    ref = quantized_attention_ref(*args, out_dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        out = quantized_attention_triton(*args, out_dtype=dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=2.0**-10 * 1.27, rtol=2 * 2.0**-8)
    cont = quantized_attention_triton(q.contiguous(), k.contiguous(), v.contiguous(), 0.02, 0.03,
                                      0.01, out_dtype=torch.float32)  # fmt: skip
    assert torch.equal(quantized_attention_triton(*args, out_dtype=torch.float32), cont)
    # unbound, the op runs what the registry chooses for CPU tensors: its CPU implementation
    scales = [torch.tensor(a) for a in args[3:]]
    op_args = (q, k, v, *scales, None, False, None, torch.float16)
    assert torch.equal(ops.attention_int8(*op_args), ops.attention_int8(*op_args, impl="cpu"))


# the C++ kernels: (implementation, P V in bf16 pairs)
KERNELS = [("cpu-vnni", False), ("cpu-vnni", True), ("cpu-avx2", False)]
KERNEL_IDS = ["vnni-f32-pv", "vnni-bf16-pv", "avx2"]


def _kernel(impl: str, bf16: bool):
    """The kernel function of `impl` (attention_int8's contract, out_q for
    attention_int8_q's), or a skip where this CPU cannot run it."""
    if impl not in CPU_IMPLS:
        pytest.skip(f"{impl} does not run on this CPU")
    if impl == "cpu-avx2":
        from qcompile.lowering.kernels.attention_avx2 import quantized_attention_avx2

        return quantized_attention_avx2
    from qcompile.lowering.kernels.attention_cpu import quantized_attention_vnni

    if bf16 and not _bf16_pv():
        pytest.skip("needs AVX512-BF16")
    return functools.partial(quantized_attention_vnni, bf16=bf16)


@pytest.mark.parametrize("b, hq, hkv, sq, sk, d, case", [
    (2, 4, 4, 7, 19, 20, "plain"),  # D not a multiple of 16, Sk not of 16
    (1, 6, 2, 33, 21, 64, "causal"),  # grouped heads, Sq > Sk
    (2, 2, 1, 5, 40, 3, "bool"),  # D not a multiple of 4
    (2, 3, 3, 17, 17, 32, "float"),  # a mask per head
    (1, 2, 2, 4, 0, 16, "plain"),  # no keys at all: 0
    (1, 2, 2, 9, 130, 128, "empty-row"),  # a query that sees no key: 0
    (1, 2, 2, 9, 12, 256, "strided"),  # [B, S, H, D] storage, per-head scales
    (2, 2, 1, 37, 90, 100, "window"),  # a sliding window: each query block's own key range
])
@pytest.mark.parametrize("impl, bf16", KERNELS, ids=KERNEL_IDS)
def test_cpu_kernel_odd_shapes(b, hq, hkv, sq, sk, d, case, impl, bf16):
    """Extremes of the int8 codes (-128 and 127) included: S is exact in int32. P V in
    float32 FMAs, and (on CPUs with AVX512-BF16) in bf16 pairs."""
    attention = _kernel(impl, bf16)
    g = torch.Generator().manual_seed(sq * 31 + d)

    def codes(*shape):
        t = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        t.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)[: t.numel()]
        return t

    if case == "strided":
        q, k, v = (codes(b, s, h, d).transpose(1, 2) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
        scales = (torch.rand(hq, generator=g) * 0.02, torch.rand(hkv, generator=g) * 0.02,
                  torch.rand(hkv, generator=g) * 0.02)
    else:
        q, k, v = codes(b, hq, sq, d), codes(b, hkv, sk, d), codes(b, hkv, sk, d)
        scales = (0.011, 0.013, 0.02)
    mask = None
    if case == "bool":
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    elif case == "float":
        mask = torch.randn(b, hq, sq, sk, generator=g)
    elif case == "window":  # keys i + 20 .. i + 40 as a bool mask, one batch padded too
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        mask = ((j <= i + 40) & (j >= i + 20)).expand(b, 1, sq, sk).clone()
        mask[1, ..., 50:] = False
    elif case == "empty-row":
        mask = torch.ones(b, 1, sq, sk, dtype=torch.bool)
        mask[..., 100:] = False
        mask[:, :, 3] = False
    kw = dict(causal=case == "causal", attn_mask=mask)
    got = attention(q, k, v, *scales, out_dtype=torch.float32, **kw)
    want = quantized_attention_ref(q, k, v, *scales, out_dtype=torch.float64, **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    v_top = float(torch.as_tensor(scales[2]).max()) * 127
    assert (got.double() - want).abs().max() <= (_BF16_P if bf16 else 1e-5) * max(v_top, 1e-3)
    if case == "empty-row":
        assert not got[:, :, 3].any()
    # attention_int8_q: the rows quantized as they are stored equal quantize of the float
    # rows bit for bit, written token-major (clamped codes and both zero-point signs too)
    for step, zp, qmin, qmax in ((max(v_top, 1e-3) / 100, -3, -128, 127),
                                 (max(v_top, 1e-3) / 300, 5, -20, 20)):
        codes_out = attention(q, k, v, *scales, out_q=(step, zp, qmin, qmax), **kw)
        expect = (torch.round(got / torch.tensor(step, dtype=torch.float32)) + zp)
        assert torch.equal(codes_out, expect.clamp(qmin, qmax).to(torch.int8))
        assert codes_out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl, bf16", KERNELS, ids=KERNEL_IDS)
def test_cpu_kernel_skips_dropped_keys_without_changing_a_bit(kind, impl, bf16):
    """The kernel skips the keys a mask drops before the first (in blocks of 16) and after
    the last key any query of a block keeps (padding on either side). Their probabilities
    are exactly 0, so each batch equals, bit for bit, attention over its kept keys alone."""
    attention = _kernel(impl, bf16)
    g = torch.Generator().manual_seed(12)
    b, h, sq, sk, d = 4, 2, 21, 70, 100
    q, k, v = (torch.randint(-128, 128, (b, h, s, d), generator=g, dtype=torch.int8)
               for s in (sq, sk, sk))
    kept = [(0, 70), (16, 53), (0, 5), (32, 33)]  # [lo, hi) per batch; lo a multiple of 16
    keep = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
    for i, (lo, hi) in enumerate(kept):
        keep[i, ..., lo:hi] = True
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -torch.inf)
    scales = (0.011, 0.013, 0.02)
    got = attention(q, k, v, *scales, attn_mask=mask)
    for i, (lo, hi) in enumerate(kept):
        alone = attention(q[i:i + 1], k[i:i + 1, :, lo:hi], v[i:i + 1, :, lo:hi], *scales)
        assert torch.equal(got[i:i + 1], alone), (i, lo, hi)


def test_errors():
    x = torch.zeros(1, 3, 4, 16, dtype=torch.int8)
    kv = torch.zeros(1, 2, 4, 16, dtype=torch.int8)
    with pytest.raises(ValueError):
        quantized_attention_triton(x, kv, kv, 1.0, 1.0, 1.0)  # 3 q heads, 2 kv heads
    with pytest.raises(TypeError):
        quantized_attention_triton(x.float(), x, x, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        quantized_attention_triton(x, x, x, torch.ones(2), 1.0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (12, 12, 64)])
def test_cuda_large(causal, hq, hkv, d):
    floats, quant = _inputs(2, hq, hkv, 300, 300, d, seed=1)
    quant = [t.cuda() for t in quant]
    q, qs, k, ks, v, vs = quant
    out = quantized_attention_triton(q, k, v, qs, ks, vs, causal=causal, out_dtype=torch.float32)
    ref = quantized_attention_ref(*[t.cpu() for t in quant], causal=causal,
                                  out_dtype=torch.float64)  # fmt: skip
    assert (out.cpu().double() - ref).abs().max() <= 2.0**-10 * float(vs.max()) * 127
    assert _rel(out.cpu(), _sdpa(floats, causal=causal)) < 2e-2
