"""The op registry (lowering/registry.py), over every declared op: each has a reference;
every implementation that runs on this machine gives the reference's outputs (bit for bit
for integer ops, within the declared tolerance for float softmax / rotation ops) on
hypothesis-drawn shapes and values, extremes included; `prepare` hooks never change a
result; binding chooses as documented. Adding an op means adding its sample inputs here:
a registered op without them fails `test_every_op_has_samples_and_a_reference`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile.lowering import cpu_routes, ops, registry
from qcompile.lowering.device import triton_target
from qcompile.numerics import ibert
from qcompile.numerics.dyadic import quantize_multiplier
from qcompile.numerics.specs import pack_int4

DEV = "cuda" if triton_target() == "cuda" else "cpu"


def _int8(g, *shape, lo=-128, hi=127, extreme=False):
    if extreme:  # the ends of the range, in a random pattern
        pick = torch.randint(0, 2, shape, generator=g).bool()
        return torch.where(pick, torch.full(shape, hi), torch.full(shape, lo)).to(torch.int8)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)


def _dims(g, *bounds):
    return [int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in bounds]


def _requant_qs(g, n, k, extreme):
    """Per-channel (q, shift) that keep outputs mostly in range; extremes: q at both ends
    of [2**30, 2**31) and the smallest shift."""
    if extreme:
        q = torch.where(torch.arange(n) % 2 == 0, torch.tensor(2**30), torch.tensor(2**31 - 1))
        return q.to(torch.int64), torch.full((n,), 31 + max(1, k).bit_length() + 7)
    m = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)) * 100 / (5000 * math.sqrt(k))
    return quantize_multiplier(m)


def _linear_args(g, extreme, *, int4=False):
    m, k, n = _dims(g, (1, 33), (1, 64), (1, 40))
    k += k % 2 if int4 else 0
    lo, hi = (-8, 7) if int4 else (-128, 127)
    x = _int8(g, 2, m, k, extreme=extreme)
    w = _int8(g, n, k, lo=lo, hi=hi, extreme=extreme)
    bias = torch.randint(-2**16, 2**16, (n,), generator=g, dtype=torch.int32)
    zp = int(torch.randint(-20, 21, (1,), generator=g))
    zp_term = (zp * w.long().sum(1)).to(torch.int32) if zp else None
    q, shift = _requant_qs(g, n, k, extreme)
    out_zp = int(torch.randint(-10, 11, (1,), generator=g))
    w_arg = pack_int4(w) if int4 else w
    return (x, w_arg, bias if m % 2 else None, zp_term, q, shift, out_zp, -128, 127)


def _grouped_args(g, extreme):
    """linear_w4a8_grouped: groups of 2..16 columns; symmetric (multipliers across 1..16)
    or with a zero point per group (across [-8, 7], multipliers 1..8), at both ends when
    extreme; the zero-point term of the integer weight (q - wzp) * mult."""
    m, groups, gsel, n, sym = _dims(g, (1, 33), (1, 6), (0, 3), (1, 40), (0, 1))
    gs = (2, 4, 8, 16)[gsel]
    k = groups * gs
    x = _int8(g, 2, m, k, extreme=extreme)
    w = _int8(g, n, k, lo=-8, hi=7, extreme=extreme)
    mult = _int8(g, n, groups, lo=1, hi=16 if sym else 8, extreme=extreme)
    wzp = None if sym else _int8(g, n, groups, lo=-8, hi=7, extreme=extreme)
    wi = w.long() - (0 if sym else wzp.long().repeat_interleave(gs, dim=1))
    wi = wi * mult.long().repeat_interleave(gs, dim=1)
    bias = torch.randint(-2**16, 2**16, (n,), generator=g, dtype=torch.int32)
    zp = int(torch.randint(-20, 21, (1,), generator=g))
    zp_term = (zp * wi.sum(1)).to(torch.int32) if zp else None
    q, shift = _requant_qs(g, n, k, extreme)
    return (x, pack_int4(w), mult, wzp, bias if m % 2 else None, zp_term, q, shift,
            int(torch.randint(-10, 11, (1,), generator=g)), -128, 127)


def _a16_args(g, extreme, *, int4=False):
    """int16 x [2, M, K] (both ends of int16 when extreme), int8 (or packed int4) w [N, K]."""
    m, k, n = _dims(g, (1, 33), (1, 64), (1, 40))
    k += k % 2 if int4 else 0
    if extreme:
        pick = torch.randint(0, 2, (2, m, k), generator=g).bool()
        x = torch.where(pick, 2**15 - 1, -(2**15)).to(torch.int16)
    else:
        x = torch.randint(-(2**15), 2**15, (2, m, k), generator=g, dtype=torch.int16)
    lo, hi = (-8, 7) if int4 else (-128, 127)
    w = _int8(g, n, k, lo=lo, hi=hi, extreme=extreme)
    return x, (pack_int4(w) if int4 else w), m, n, k


def _a16_requant_args(g, extreme):
    int4 = bool(torch.randint(0, 2, (1,), generator=g))
    x, w, m, n, k = _a16_args(g, extreme, int4=int4)
    if extreme:  # both ends of the range |acc + bias| < 2**62 allows
        top = 2**62 - 1 - 2**22 * k
        bias = torch.where(torch.arange(n) % 2 == 0, top, -top)
    else:
        bias = torch.randint(-2**22, 2**22, (n,), generator=g)
    q, shift = _requant_qs(g, n, k, extreme)
    shift = (shift + 8).clamp(max=62)  # the accumulator is 2**8 times an int8 one's
    if m % 3 == 0:  # per tensor
        q, shift = q[:1], shift[:1]
    return (x, w, bias if m % 2 else None, q, shift,
            int(torch.randint(-10, 11, (1,), generator=g)), -128, 127)


def _attention_args(g, extreme):
    b, hkv, group, sq, sk, d = _dims(g, (1, 2), (1, 2), (1, 2), (1, 17), (1, 19), (4, 16))
    hq = hkv * group
    q, k, v = (_int8(g, b, h, s, d, extreme=extreme) for h, s in ((hq, sq), (hkv, sk),
                                                                 (hkv, sk)))
    scales = [torch.tensor(float(s)) for s in torch.rand(3, generator=g) * 0.02 + 1e-3]
    mask = None
    if sk > 3 and not extreme:
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        mask[..., 0] = True  # every query sees a key: rows with none differ by design
    causal = bool(extreme) and sq <= sk
    return (q, k, v, *scales, mask, causal, None, torch.float32)


def _conv_args(g, extreme):
    """x int8 [B, C, H, W], w [N, C/groups, kh, kw] and a geometry: dense, grouped or
    depthwise, strided, padded, dilated. Weights are 7-bit unless extreme, so the CPU's
    oneDNN route runs (full-range weights take its exact fallback on CPUs without VNNI)."""
    b, cg, ng, h, wd, kh, kw, stride, pad, dil, gsel = _dims(
        g, (1, 2), (1, 6), (1, 6), (1, 9), (1, 9), (1, 3), (1, 3), (1, 2), (0, 2), (1, 2),
        (0, 2))
    groups = (1, 2, 3)[gsel]
    if gsel == 2:  # depthwise (a channel multiplier of ng)
        cg = 1
    c, n = cg * groups, ng * groups
    h = max(h, dil * (kh - 1) + 1 - 2 * pad)
    wd = max(wd, dil * (kw - 1) + 1 - 2 * pad)
    x = _int8(g, b, c, h, wd, extreme=extreme)
    lo, hi = (-128, 127) if extreme else (-64, 63)
    w = _int8(g, n, cg, kh, kw, lo=lo, hi=hi, extreme=extreme)
    geometry = ([stride, 1], [pad, pad // 2], [dil, 1], groups)
    return x, w, geometry


def _samples(name, g, extreme):
    if name == "conv2d_int8":
        x, w, geometry = _conv_args(g, extreme)
        n, k = w.shape[0], math.prod(w.shape[1:])
        bias = torch.randint(-2**14, 2**14, (n,), generator=g, dtype=torch.int32)
        in_zp = int(torch.randint(-128, 128, (1,), generator=g)) if not extreme else 127
        q, shift = _requant_qs(g, n, k, extreme)
        return (x, w, bias if n % 2 else None, in_zp, q, shift, -3, -128, 127, *geometry)
    if name == "conv2d_int8_dq":
        x, w, geometry = _conv_args(g, extreme)
        n = w.shape[0]
        bias = torch.randn(n, generator=g) if n % 2 else None
        in_zp = int(torch.randint(-128, 128, (1,), generator=g))
        return (x, w, bias, in_zp, 0.0173, torch.rand(n, generator=g) * 0.01, torch.float32,
                *geometry)
    if name == "conv2d_dynamic":
        x, w, geometry = _conv_args(g, extreme)
        xf = torch.randn(*x.shape, generator=g) * 3
        xf[0] = 0.0  # an all-zero sample: the scale guard
        return (xf, w, torch.rand(w.shape[0], generator=g) * 0.01, torch.randn(w.shape[0]),
                *geometry)
    if name == "lut_int8":
        table = _int8(g, 256, extreme=extreme)
        return (_int8(g, 3, 40, extreme=extreme), table)
    if name == "avg_pool2d_int8":
        k, s = _dims(g, (1, 4), (1, 4))
        hw = k + int(torch.randint(0, 6, (1,), generator=g))
        x = _int8(g, 2, 3, hw, hw + 2, extreme=extreme)
        count = k * k
        q, shift = quantize_multiplier(0.7 / count)
        return (x, -5 if not extreme else 127, int(q), int(shift), 3, -128, 127, [k, k],
                [s, s])
    if name == "max_pool2d_int8":
        k, s, d = _dims(g, (1, 3), (1, 3), (1, 2))
        pad = int(torch.randint(0, k // 2 + 1, (1,), generator=g))
        hw = d * (k - 1) + 1 + int(torch.randint(0, 6, (1,), generator=g))
        return (_int8(g, 2, 3, hw, hw + 1, extreme=extreme), [k, k], [s, s], [pad, pad],
                [d, d], bool(extreme))
    if name == "quantize":
        x = torch.randn(3, 37, generator=g) * 4
        scale = float(torch.rand(1, generator=g)) * 0.05 + 0.01
        if extreme:  # exact ties and saturation
            x = (torch.arange(-70, 70, dtype=torch.float32) + 0.5) * scale * 2
        return (x, scale, int(torch.randint(-20, 21, (1,), generator=g)), -128, 127)
    if name == "dequantize":
        return (_int8(g, 4, 9, extreme=extreme), 0.0371, -5, torch.float32)
    if name == "quantize_int16":
        x = torch.randn(3, 37, generator=g) * 4
        scale = float(torch.rand(1, generator=g)) * 1e-3 + 1e-4
        if extreme:  # exact ties (a power-of-two scale) and saturation at both ends
            scale = 2.0**-10
            x = torch.cat([torch.arange(-70, 70) + 0.5,
                           torch.tensor([-4e4, 4e4, 32767.5, -32768.5])]) * scale
            return (x.reshape(2, 72), scale, -(2**15) + 1, 2**15 - 1)
        return (x, scale, -(2**15), 2**15 - 1)
    if name == "linear_a16w8":
        return _a16_requant_args(g, extreme)
    if name == "linear_a16w8_dq":
        int4 = bool(torch.randint(0, 2, (1,), generator=g))
        x, w, m, n, k = _a16_args(g, extreme, int4=int4)
        bias = torch.randn(n, generator=g) * 100 if n % 2 else None
        out_dtype = torch.bfloat16 if m % 2 else torch.float32
        return (x, w, bias, 3.1e-6, torch.rand(n, generator=g) * 0.01, out_dtype)
    if name == "requant_int8":
        q, s = quantize_multiplier(float(torch.rand(1, generator=g)) * 3 + 0.01)
        return (_int8(g, 5, 23, extreme=extreme), 7, q, s, -3, -128, 127)
    if name == "add_int8":
        ma, mb = (float(v) * 2 + 1e-3 for v in torch.rand(2, generator=g))
        if extreme:  # shifts more than 23 apart, mb still a valid multiplier (>= 2**-31)
            ma = max(ma, 0.5)
            mb = ma * 2.0**-30
        a, b = _int8(g, 3, 5, 8, extreme=extreme), _int8(g, 5, 8, extreme=extreme)
        return (a, b, 4, -9, *ops.add_multipliers(ma, mb), 2, -128, 127)
    if name in ("linear_int8", "linear_w4a8"):
        return _linear_args(g, extreme, int4=name == "linear_w4a8")
    if name == "linear_w4a8_grouped":
        return _grouped_args(g, extreme)
    if name == "linear_int8_dq":
        x, w, _, zp_term, *_ = _linear_args(g, extreme)
        n = w.shape[0]
        bias = torch.randn(n, generator=g) if n % 2 else None
        return (x, w, bias, zp_term, 0.0173, torch.rand(n, generator=g) * 0.01, torch.float32)
    if name == "linear_dynamic":
        x, w, *_ = _linear_args(g, extreme)
        xf = torch.randn(*x.shape, generator=g) * 3
        xf[0, 0] = 0.0  # an all-zero row: the scale guard
        return (xf, w, torch.rand(w.shape[0], generator=g) * 0.01, torch.randn(w.shape[0]))
    if name == "quantize_per_token_int4":
        m, k = _dims(g, (1, 9), (1, 33))
        x = torch.randn(2, m, 2 * k, generator=g) * 3
        if extreme:  # an all-zero row, a row of one value, a huge outlier
            x[0, 0], x[1, 0], x[1, -1, 0] = 0.0, -2.5, 1e30
        return (x, bool(m % 2), 0.3 if extreme else 0.9)  # clip 0.3: most of a row saturates
    if name == "quantize_int4_groups":
        m, groups, gsel = _dims(g, (1, 9), (1, 6), (0, 3))
        gs = (2, 4, 8, 16)[gsel]
        # groups of magnitudes six decades apart: multipliers across 1..15
        mag = 10.0 ** (torch.rand(2, m, groups, 1, generator=g) * 6 - 4)
        x = (torch.randn(2, m, groups, gs, generator=g) * mag).reshape(2, m, groups * gs)
        if extreme:  # an all-zero row, a row of one value, a huge outlier
            x[0, 0], x[1, 0], x[1, -1, 0] = 0.0, -2.5, 1e30
        return (x, gs, 0.3 if extreme else 0.9)  # clip 0.3: most of a group saturates
    if name in ("linear_a4w4_dynamic", "linear_a4w4_grouped_dynamic"):
        if name == "linear_a4w4_dynamic":
            x, w, *_ = _linear_args(g, extreme, int4=True)  # w: packed int4, -8 / 7 if extreme
            head = (w,)
        else:
            x, w, mult, wzp, *_ = _grouped_args(g, extreme)
            head = (w, mult, wzp)
        n, k = w.shape[0], x.shape[-1]
        xf = torch.randn(*x.shape, generator=g) * 3
        xf[0, 0] = 0.0  # an all-zero row: the scale guard
        if extreme:  # a row of one value and a huge outlier
            xf[1, 0], xf[1, -1, 0] = -2.5, 1e6
        args = (xf, *head, torch.rand(n, generator=g) * 0.01,
                torch.randn(n, generator=g) if n % 2 else None, 0.3 if extreme else 0.9)
        if _dims(g, (0, 1))[0]:  # activations in groups: the largest of 8, 4, 2 dividing K
            args += (None, next(gs for gs in (8, 4, 2) if k % gs == 0))
        return args
    if name == "linear_w4a16":
        m, groups, n = _dims(g, (1, 9), (1, 3), (1, 24))
        k, gs = groups * 32, 32
        w = _int8(g, n, k, lo=-8, hi=7, extreme=extreme)
        scales = torch.rand(n, groups, generator=g) * 0.1 + 0.01
        zeros = _int8(g, n, groups, lo=-8, hi=7, extreme=extreme).int() if m % 2 else None
        return (torch.randn(m, k, generator=g), pack_int4(w), scales, zeros, gs, None)
    if name == "quantize_absmax":
        return (torch.randn(4, 21, generator=g) * 3, 127)
    if name in ("attention_int8", "attention_int8_isoftmax"):
        return _attention_args(g, extreme)
    if name == "attention_int8_q":
        args = _attention_args(g, extreme)[:-1]
        # a step of at least v's scale: the float outputs of two implementations (bf16 P on
        # AVX512-BF16: 2**-9 relative) then round at most one code apart
        step = float(args[5]) * (1 + float(torch.rand((), generator=g)))
        zp = int(torch.randint(-10, 11, (), generator=g))
        qmin, qmax = (-20, 20) if extreme else (-128, 127)
        return (*args, step, zp, qmin, qmax)
    if name == "hadamard_transform":
        n = [12, 16, 20, 24, 40, 64][int(torch.randint(0, 6, (1,), generator=g))]
        return (torch.randn(3, n, generator=g) * 2,)
    if name == "gelu_int8":
        s_in, s_out = (float(v) * 0.2 + 1e-3 for v in torch.rand(2, generator=g))
        return (_int8(g, 3, 50, extreme=extreme), *ibert.gelu_params(s_in, 3, s_out, -60))
    if name == "layernorm_int8":
        c = _dims(g, (2, 70))[0]
        w, b = torch.randn(c, generator=g) * 0.5 + 1, torch.randn(c, generator=g) * 0.3
        p = ibert.layernorm_params(0.05, 2, c, w, b, 1e-5, 0.03, -4)
        return (_int8(g, 3, c, extreme=extreme), *p)
    if name == "linear_residual_layernorm_int8":
        x, w, bias, zp_term, *_ = _linear_args(g, extreme)
        n = w.shape[0]
        e, s_ref = 7, 0.1
        s_h, bound = s_ref / 2**e, 1 << (9 + e)
        gamma, beta = torch.randn(n, generator=g) * 0.3 + 1, torch.randn(n, generator=g) * 0.2
        p = ibert.layernorm_params(s_h, 0, n, gamma, beta, 1e-5, 0.03, 4,
                                   in_range=(-bound, bound))
        s_w = torch.rand(n, generator=g, dtype=torch.float64) * 2e-3 + 1e-3
        pairs = [ibert.fit_multiplier(m, 1 << 31) for m in (0.02 * s_w / s_h).tolist()]
        acc_q, acc_shift = (torch.tensor(v, dtype=torch.int64) for v in zip(*pairs))
        r_q, r_shift = ibert.fit_multiplier(0.05 / s_h, 255)
        r = _int8(g, *x.shape[:-1], n, extreme=extreme)
        return (x, w, bias, zp_term, acc_q, acc_shift, r, -7, r_q, r_shift, bound, p.gamma,
                p.beta, *p[3:])
    raise KeyError(name)


OPS = sorted(registry.all_ops(), key=lambda op: op.name)
PAIRS = [(op, name) for op in OPS for name in sorted(op.impls) if name != "reference"]


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _same(op, got, want):
    if isinstance(want, tuple):
        for a, b in zip(got, want, strict=True):
            _same(op, a, b)
        return
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    if op.exact:
        assert torch.equal(got, want), (got.double() - want.double()).abs().max()
    else:
        torch.testing.assert_close(got, want, **op.tolerance)


def _within_route_range(op, impl, args):
    """A CPU route refuses weights outside its exact range on this machine (7-bit weights
    for oneDNN without VNNI): give it weights inside."""
    route = cpu_routes.ROUTES.get(impl.removeprefix("cpu-")) if impl.startswith("cpu-") else None
    if route is None or "w" not in op.params:
        return args
    lo, hi = route.weight_range(cpu_routes.cpu_capabilities())
    i = op.params.index("w")
    w = args[i]
    if "mult" in op.params:  # grouped int4: the integer weight is (q - wzp) * mult: bound mult
        j = op.params.index("mult")
        wzp = args[op.params.index("wzp")] if "wzp" in op.params else None
        q_lo, q_hi = (-8, 7) if wzp is None else (-15, 15)  # q - wzp for q, wzp in [-8, 7]
        top = max(1, min(lo // q_lo, hi // q_hi))
        return (*args[:j], args[j].clamp(max=top), *args[j + 1:])
    if w.dtype != torch.int8:  # packed int4 values are inside every route's range
        return args
    return (*args[:i], w.clamp(lo, hi), *args[i + 1:])


def test_every_op_has_samples_and_a_reference():
    for op in OPS:
        assert "reference" in op.impls, op.name
        assert op.exact or op.tolerance, op.name
        _samples(op.name, torch.Generator().manual_seed(0), False)  # KeyError if missing


@pytest.mark.parametrize("op, impl", PAIRS, ids=[f"{op.name}-{name}" for op, name in PAIRS])
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), extreme=st.booleans())
def test_implementation_equals_reference(op, impl, seed, extreme):
    chosen = op.impls[impl]
    if not chosen.runs_on(DEV):
        pytest.skip(f"{impl} does not run on {DEV} here")
    args = _samples(op.name, torch.Generator().manual_seed(seed), extreme)
    args = _within_route_range(op, impl, args)
    want = op(*args, impl="reference")
    _same(op, op(*_to(args, DEV), impl=impl), want)
    if chosen.prepare is not None:  # the prepared form of the constants gives the same
        names = [p for p, a in zip(op.params, args) if isinstance(a, torch.Tensor)]
        prepared = chosen.prepare({n: args[op.params.index(n)] for n in names})
        args = tuple(prepared.get(n, a) for n, a in zip(op.params, args))
        _same(op, op(*_to(args, DEV), impl=impl), want)


# the arguments that carry rows (tokens) of activations, per op parameter name; attention's
# q, k, v carry queries and keys along dim 2 instead
_ROW_ARGS = ("x", "a", "b", "r")


def _no_rows(args: tuple, params: tuple, dims: dict[str, int]) -> tuple:
    """args with the named tensors cut to size 0 along the given dims."""
    out = list(args)
    for name, dim in dims.items():
        i = params.index(name)
        if isinstance(out[i], torch.Tensor):
            out[i] = out[i].narrow(dim, 0, 0)
    return tuple(out)


def _zero_row_cases(op, args) -> list[tuple[str, tuple]]:
    """Empty batches: 0 rows of every activation, or for attention 0 queries, 0 keys and
    a batch of 0."""
    p = op.params
    if "groups" in p or "kernel_size" in p:  # images: a batch of 0 (0 rows is no image)
        return [("batch of 0", _no_rows(args, p, {"x": 0}))]
    if "attn_mask" in p:
        return [
            ("0 queries", _no_rows(args, p, {"q": 2, "attn_mask": 2})),
            # keys cut after the causal flag is dropped: causal needs Sq <= Sk
            ("0 keys", _no_rows(args[:p.index("is_causal")] + (False,)
                                + args[p.index("is_causal") + 1:], p,
                                {"k": 2, "v": 2, "attn_mask": 3})),
            ("batch of 0", _no_rows(args, p, {"q": 0, "k": 0, "v": 0, "attn_mask": 0})),
        ]
    rows = {n: -2 if args[p.index(n)].dim() >= 2 else 0
            for n in (*_ROW_ARGS, "q") if n in p and (n != "q" or op.name == "dequantize")}
    cases = [("0 rows", _no_rows(args, p, rows))]
    first = {n: 0 for n in rows if args[p.index(n)].dim() >= 3}
    if first:
        cases.append(("batch of 0", _no_rows(args, p, first)))
    return cases


def _fake_shapes(op, args) -> list[tuple]:
    """The output shapes the op's fake implementation promises for args."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = op(*fake, impl="reference")
    return [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("op, impl", [(op, name) for op in OPS for name in sorted(op.impls)],
                         ids=[f"{op.name}-{name}" for op in OPS for name in sorted(op.impls)])
@pytest.mark.parametrize("extreme", [False, True])
def test_empty_batches_give_empty_outputs_of_the_right_shape(op, impl, extreme):
    """0 rows (or 0 queries, 0 keys, a batch of 0) in every implementation: the fake's
    shapes, the reference's values (with 0 keys, every query sees no key: 0, quantized
    where the op quantizes its output)."""
    if not op.impls[impl].runs_on(DEV):
        pytest.skip(f"{impl} does not run on {DEV} here")
    args = _within_route_range(op, impl, _samples(op.name, torch.Generator().manual_seed(3),
                                                  extreme))
    for what, empty in _zero_row_cases(op, args):
        want = op(*empty, impl="reference")
        outs = want if isinstance(want, tuple) else (want,)
        assert [tuple(t.shape) for t in outs] == _fake_shapes(op, empty), what
        assert outs[0].shape.numel() == 0 or what == "0 keys", what
        if what == "0 keys":  # 0, or the code of 0 for an op that quantizes its output
            zero = 0
            if "out_zp" in op.params:
                zero = min(max(args[op.params.index("out_zp")], args[op.params.index("qmin")]),
                           args[op.params.index("qmax")])
            assert outs[0].numel() and (outs[0] == zero).all(), what
        _same(op, op(*_to(empty, DEV), impl=impl), want)


def test_choose_follows_the_family_order():
    assert registry.choose(ops.linear_int8, "auto", "cpu").name == "cpu"
    assert registry.choose(ops.linear_int8, "reference", "cpu").name == "reference"
    # an op without a CPU implementation of its own runs its exact definition
    assert registry.choose(ops.dequantize, "cpu", "cpu").name == "reference"
    with pytest.raises(ValueError, match="unknown kernel family"):
        registry.choose(ops.linear_int8, "fastest", "cpu")
    with pytest.raises(ValueError, match="no implementation 'nope'"):
        ops.linear_int8.run("nope", ())


def test_arguments_by_name_and_binding():
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    x = gm.graph.placeholder("x")
    node = gm.graph.call_function(ops.QUANTIZE, (x, 0.5, 3, -128, 127))
    assert registry.arg(node, "zero_point") == 3 and registry.arg(node, "impl") == ""
    registry.set_arg(node, "zero_point", 4)
    assert node.args[2] == 4
    with pytest.raises(KeyError, match="no argument 'zp'"):
        registry.arg(node, "zp")
    registry.bind(node, registry.choose(ops.quantize, "auto", "cpu"), "graph:node")
    assert node.kwargs == {"impl": "cpu", "origin": "graph:node"}
    assert registry.op_of(node) is ops.quantize and registry.is_op(node, ops.quantize)


def test_unbound_call_runs_the_device_default_and_bad_names_are_loud():
    x = torch.randn(4, 16)
    unbound = ops.quantize(x, 0.1, 0, -128, 127)
    assert torch.equal(unbound, ops.quantize(x, 0.1, 0, -128, 127, impl="cpu"))
    with pytest.raises(ValueError, match="no implementation 'gpu'"):
        ops.quantize(x, 0.1, 0, -128, 127, impl="gpu")
    with pytest.raises(ValueError, match="declare positional arguments only"):
        @registry.quantized_op
        def bad_op(x: torch.Tensor, *, flag: bool) -> torch.Tensor:
            """Keyword-only arguments are not part of a declaration."""


def test_grouped_int4_weights_whose_products_leave_int8_are_refused():
    """(q - wzp) * mult must be an int8 value: a multiplier of 9 on q - wzp = 15, or 16 on
    q = -8 less a zero point, or a zero point outside int4, is a ValueError, never a
    wrapped integer; the extremes that fit pass exactly."""
    q = torch.tensor([[7, -8, 7, -8]], dtype=torch.int8)
    w = pack_int4(q)
    ok = ops.grouped_int4_values(w, torch.tensor([[8, 16]], dtype=torch.int8),
                                 torch.tensor([[-8, 0]], dtype=torch.int8))
    assert ok.tolist() == [[(7 + 8) * 8, (-8 + 8) * 8, 7 * 16, -8 * 16]]
    for mult, wzp, match in (([[9, 1]], [[-8, 0]], "int8 value"),
                             ([[1, 16]], [[0, 1]], "int8 value"),
                             ([[1, 1]], [[-9, 0]], r"zero points must lie in \[-8, 7\]"),
                             ([[0, 1]], None, "must be >= 1")):
        with pytest.raises(ValueError, match=match):
            ops.grouped_int4_values(w, torch.tensor(mult, dtype=torch.int8),
                                    None if wzp is None else torch.tensor(wzp, dtype=torch.int8))
