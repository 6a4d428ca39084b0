"""Exact int8 2-D convolution accumulators on CPU, and which layers run faster than float.

What: `conv_acc(x, w, in_zp, geometry)` returns acc[b, n, oh, ow] =
sum (x - in_zp) * w over each output's window (positions outside the input hold the zero
point, i.e. real zero), bit for bit the reference's accumulator
(kernels/conv.conv2d_acc_ref), held exactly in float32 in channels-last memory, so the
GEMM epilogues of lowering/cpu.py run on its [B*Ho*Wo, N] view unchanged.

Routes (the same facts as the linear routes in lowering/cpu_routes.py, measured with
bench/bench_cpu_conv.py):
  onednn-u8s8  onednn.qconv2d_pointwise on u8 activations x + 128 (zero point 128 + in_zp,
               also the value of the padding, written by padded_u8) and s8 weights,
               float32 output. Without VNNI its VPMADDUBSW sums pairs of u8 x s8 products
               in int16 with saturation: exact only for weights in [-64, 63]
               (2 * 255 * 64 < 2**15); with VNNI / AMX any int8 weights (cpu_routes'
               capability probe). oneDNN accumulates in int32, removes the zero-point
               compensation in int32 and converts to float32 once:
               exact while |acc| <= 2**24: checked at run time where the weights allow
               more (conv_acc); where that check fails, input channels are split into
               chunks that guarantee it (`plan_channel_chunks`), summed in int32.
  float64      the reference accumulator (kernels/conv.conv2d_acc_ref: a float64
               convolution of the integer values, exact for any weights), on every CPU,
               and slow: what the "cpu" implementation runs where no exact int8 route
               exists. A layer on that
               route is never faster than float; select-layers keeps it float under
               kernels="auto" and says why.
`plan_conv` decides per layer, from the shape, whether the int8 route is expected to beat
the float convolution (the crossovers below, measured on AVX2): spatial kernels with
enough channels yes; depthwise / grouped convolutions (0.7-0.8x), the 3-channel stem
(0.85x) and narrow 1 x 1 convolutions (memory-bound: 0.26-0.79x whole) no.

Pre: x int8 [B, C, H, W] (any memory format), w int8 [N, C/groups, kh, kw] within the
route's weight range (`prepare_conv` refuses others: never a wrong value), in_zp in
[-128, 127]. Post: [B, N, Ho, Wo], channels-last, exact integers: float32 from one
oneDNN call, int32 summed over input-channel chunks, int64 from the exact fallback.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qcompile.lowering import cpu_routes
from qcompile.lowering.cpu_routes import F32_EXACT, FULL_RANGE, SEVEN_BIT, CpuCapabilities

X_ABSMAX = 255  # |x - in_zp| for int8 x and an int8 zero point


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, stride, padding, dilation, groups) -> ConvGeometry:
        return cls(tuple(int(s) for s in stride), tuple(int(p) for p in padding),
                   tuple(int(d) for d in dilation), int(groups))


# ---------------------------------------------------------------- the exact fallback


def conv_acc_exact(x: torch.Tensor, w: torch.Tensor, in_zp: int,
                   g: ConvGeometry) -> torch.Tensor:
    """The reference accumulator (int64 [B, N, Ho, Wo]; any CPU, any weights)."""
    from qcompile.lowering.kernels.conv import conv2d_acc_ref

    return conv2d_acc_ref(x, w, in_zp, g.stride, g.padding, g.dilation, g.groups)


# ---------------------------------------------------------------- oneDNN


def onednn_weight_range(caps: CpuCapabilities) -> tuple[int, int]:
    """The weights oneDNN's int8 convolution is exact for on a CPU with these capabilities
    (planning: the linear GEMM's probe result stands for the convolution kernels)."""
    return FULL_RANGE if caps.onednn_full_range else SEVEN_BIT


def _hardware_range() -> tuple[int, int]:
    """The range on this machine, the convolution kernel itself probed (prepare_conv)."""
    caps = cpu_routes._detected()
    return FULL_RANGE if caps.onednn_full_range and _probe_full_range() else SEVEN_BIT


@functools.cache
def _probe_full_range() -> bool:
    """Whether oneDNN's u8 x s8 convolution is exact for full-range weights here: 255 x
    -128 pairs saturate an int16 pair sum (VPMADDUBSW), not a VNNI / AMX dot product."""
    try:
        for c, n in ((8, 16), (64, 32)):
            x = torch.full((2, c, 5, 5), 127, dtype=torch.int8)
            x[:, ::3] = -128
            w = torch.full((n, c, 3, 3), -128, dtype=torch.int8)
            w[:, 1::2] = 127
            g = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
            got = run_prepared(x, _prepare_unchecked(w, 0, g))
            if not torch.equal(got.to(torch.int64), conv_acc_exact(x, w, 0, g)):
                return False
        return True
    except RuntimeError:
        return False


def plan_channel_chunks(w: torch.Tensor, groups: int) -> tuple[tuple[int, int], ...] | None:
    """Input-channel ranges over which |acc| <= 2**24 for every int8 input (float32-exact),
    or None where even one channel can exceed it or a grouped weight would need splitting
    (its groups cannot be split across calls)."""
    n, cg = w.shape[:2]
    if n == 0 or cg == 0:
        return ((0, cg),)
    per_channel = w.to(torch.int64).abs().sum(dim=(2, 3))  # [N, C/g]
    budget = F32_EXACT // X_ABSMAX
    if groups > 1:
        return ((0, cg),) if int(per_channel.sum(dim=1).max()) <= budget else None
    if int(per_channel.max()) > budget:
        return None
    chunks, start = [], 0
    while start < cg:
        reach = (per_channel[:, start:].cumsum(dim=1)).amax(dim=0)  # nondecreasing
        stop = start + max(1, int(torch.searchsorted(reach, budget, right=True)))
        chunks.append((start, min(stop, cg)))
        start = stop
    return tuple(chunks)


@dataclass(frozen=True, eq=False)
class PreparedConv:
    """A weight laid out for oneDNN once, per input zero point: one packed weight per
    input-channel chunk, and the whole weight packed where that takes several (`whole`:
    one call whose float32 output is checked at run time, see conv_acc)."""

    in_zp: int
    geometry: ConvGeometry
    n: int
    chunks: tuple[tuple[int, int, torch.Tensor], ...]
    whole: torch.Tensor | None = None


def _pack(w: torch.Tensor, in_zp: int, g: ConvGeometry) -> torch.Tensor:
    n = w.shape[0]
    return torch.ops.onednn.qconv_prepack(w.contiguous(), torch.ones(n), 1.0, 128 + in_zp,
                                          list(g.stride), [0, 0], list(g.dilation),
                                          g.groups, None)


def prepare_conv(w: torch.Tensor, in_zp: int, g: ConvGeometry) -> PreparedConv:
    """Check w against oneDNN's exact range on this machine (the detected hardware, never
    an override) and pack it, chunked so every chunk's accumulator is float32-exact."""
    caps = cpu_routes._detected()
    if not caps.onednn:
        raise RuntimeError(f"oneDNN int8 convolution is not available on {caps.describe()}")
    lo, hi = _hardware_range()
    if w.numel():
        wmin, wmax = int(w.min()), int(w.max())
        if wmin < lo or wmax > hi:
            raise ValueError(f"oneDNN's int8 convolution is exact only for weights in [{lo}, "
                             f"{hi}] on {caps.describe()}; these are in [{wmin}, {wmax}]")
    return _prepare_unchecked(w, in_zp, g)


def _prepare_unchecked(w: torch.Tensor, in_zp: int, g: ConvGeometry) -> PreparedConv:
    chunks = plan_channel_chunks(w, g.groups)
    if chunks is None:
        raise ValueError("these weights allow |acc| > 2**24 within one input channel (or "
                         "one group): no float32-exact oneDNN chunking exists")
    packed = tuple((s, e, _pack(w[:, s:e], in_zp, g)) for s, e in chunks)
    whole = _pack(w, in_zp, g) if len(chunks) > 1 else None
    return PreparedConv(in_zp, g, w.shape[0], packed, whole)


def _onednn_call(x_u8: torch.Tensor, zp: int, packed: torch.Tensor, n: int,
                 g: ConvGeometry) -> torch.Tensor:
    """oneDNN on an input already padded (padded_u8): the call itself pads nothing."""
    return torch.ops.onednn.qconv2d_pointwise(
        x_u8, 1.0, zp, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64), None,
        list(g.stride), [0, 0], list(g.dilation), g.groups, 1.0, 0, torch.float32,
        "none", [], "")


def padded_u8(x: torch.Tensor, in_zp: int, g: ConvGeometry) -> torch.Tensor:
    """int8 x -> uint8 x + 128, channels-last, with g.padding rows and columns of the zero
    point (128 + in_zp: real zero) around it. The padding is written here, not left to
    oneDNN: its AVX512-VNNI grouped kernel returned garbage (|acc| ~ 1e9) for outputs
    whose window lies wholly in the padding when the u8 zero point was not 0 (groups 3, a
    2 x 3 kernel, padding 2 x 1, stride 2 x 1: tests/lowering/test_cpu_conv.py)."""
    ph, pw = g.padding
    if not (ph or pw):
        return cpu_routes._to_u8(x).contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    out = torch.full((b, c, h + 2 * ph, w + 2 * pw), 128 + in_zp, dtype=torch.uint8
                     ).contiguous(memory_format=torch.channels_last)
    out[:, :, ph:ph + h, pw:pw + w] = cpu_routes._to_u8(x)
    return out


def run_prepared(x: torch.Tensor, p: PreparedConv) -> torch.Tensor:
    """acc [B, N, Ho, Wo] channels-last, exact: float32 from one chunk (|acc| <= 2**24),
    int32 summed over several (each chunk exact; their sum may pass 2**24)."""
    x_u8 = padded_u8(x, p.in_zp, p.geometry)
    zp = 128 + p.in_zp
    if len(p.chunks) == 1:
        return _onednn_call(x_u8, zp, p.chunks[0][2], p.n, p.geometry)
    out = None
    for s, e, packed in p.chunks:
        part = x_u8[:, s:e].contiguous(memory_format=torch.channels_last)
        f = _onednn_call(part, zp, packed, p.n, p.geometry)
        f = f.view(torch.int32).copy_(f)  # each chunk exact; their sum in int32
        out = f if out is None else out.add_(f)
    return out


# ---------------------------------------------------------------- per-layer plan

# Measured crossovers (bench/bench_cpu_conv.py, AVX2, 2 threads, batch 8 at 224 x 224):
# a call costs about 0.9 ms + 1.1 ns per output and 0.2 ns per input element beyond
# oneDNN's kernel (the u8 conversion, the requantization pass, the dispatch), and oneDNN's
# int8 kernel is 1.6x float32 for spatial kernels (3x3: 925M MACs 9.7 -> 8.8 ms whole, 7x7
# at 14 x 14: 1.45x) but about 1.0-1.2x for 1 x 1 kernels, which are memory-bound: 1 x 1
# layers of K <= 144 measured 0.26-0.79x whole. So:
MIN_C = 16  # input channels per group (the 3-channel stem: 0.85x for oneDNN alone)
MIN_K = 64  # C/groups * kh * kw
MIN_MACS = 1 << 25  # spatial kernels
MIN_K_POINTWISE = 256  # 1 x 1 kernels: only the wide ones
MIN_MACS_POINTWISE = 1 << 27


@dataclass(frozen=True)
class ConvPlan:
    route: str  # "onednn-u8s8" or "float64"
    fast: bool
    reason: str


def plan_conv(caps: CpuCapabilities, x_shape, w_shape, g: ConvGeometry, out_hw: tuple[int, int],
              weight_range: tuple[int, int]) -> ConvPlan:
    """The CPU route of one convolution layer and whether it beats float32 here."""
    n, cg, kh, kw = w_shape
    b = x_shape[0]
    k = cg * kh * kw
    macs = b * out_hw[0] * out_hw[1] * n * k
    if not caps.onednn:
        return ConvPlan("float64", False, f"no oneDNN int8 convolution on {caps.describe()}")
    lo, hi = onednn_weight_range(caps)
    if not (lo <= weight_range[0] and weight_range[1] <= hi):
        return ConvPlan("float64", False,
                        f"weights outside [{lo}, {hi}], oneDNN's exact range on this CPU")
    if g.groups > 1 and not caps.vnni:
        return ConvPlan("onednn-u8s8", False,
                        f"grouped / depthwise convolution (groups={g.groups}): oneDNN's int8 "
                        "kernel measured 0.7-0.8x float32 on AVX2")
    if cg < MIN_C or k < MIN_K:
        return ConvPlan("onednn-u8s8", False,
                        f"{cg} input channels per group, K={k}: too narrow for the int8 "
                        "kernel to beat float32 (the 3-channel stem measured 0.85x)")
    if kh * kw == 1 and (k < MIN_K_POINTWISE or macs < MIN_MACS_POINTWISE):
        return ConvPlan("onednn-u8s8", False,
                        f"a 1 x 1 convolution of K={k}, {macs} MACs per call: memory-bound, "
                        "the int8 kernel's gain does not pay for the conversions and the "
                        "requantization pass (0.26-0.79x measured for K <= 144)")
    if macs < MIN_MACS:
        return ConvPlan("onednn-u8s8", False,
                        f"{macs} MACs per call: too small for the int8 kernel to beat float32")
    return ConvPlan("onednn-u8s8", True, f"oneDNN u8 x s8 convolution, weights in [{lo}, {hi}]")


# ---------------------------------------------------------------- the accumulator

def _prepared(w: torch.Tensor, in_zp: int, g: ConvGeometry) -> PreparedConv | None:
    """prepare_conv(w, in_zp, g) once per weight (again if w changed in place), kept beside
    the weight with its GEMM layouts (lowering/cpu.py); None where no exact oneDNN route
    exists for it (the exact fallback runs)."""
    from qcompile.lowering.cpu import _cache_of

    per_use = _cache_of(w)
    key = ("conv", in_zp, g)
    entry = per_use.get(key)
    if entry is None or entry[0] != w._version:
        try:
            p = prepare_conv(w, in_zp, g)
        except (RuntimeError, ValueError):
            p = None
        entry = per_use[key] = (w._version, p)
    return entry[1]


def conv_acc(x: torch.Tensor, w: torch.Tensor, in_zp: int, g: ConvGeometry) -> torch.Tensor:
    """acc as exact integers in channels-last memory: float32 from oneDNN where one chunk
    holds |acc| <= 2**24, int32 summed over several chunks, int64 from the exact fallback
    (each accepted by lowering/cpu.run_epilogue on the [B*Ho*Wo, N] row view)."""
    p = _prepared(w, in_zp, g) if x.shape[0] and w.shape[0] else None
    if p is None:
        return conv_acc_exact(x, w, in_zp, g).contiguous(memory_format=torch.channels_last)
    if p.whole is not None:
        # Weights that allow |acc| > 2**24 rarely produce one: run the whole convolution
        # once and check. oneDNN rounds the exact int32 accumulator to float32 once, and
        # rounding is monotone, so |acc| > 2**24 cannot come out below 2**24: every
        # |value| < 2**24 proves them all exact. Otherwise the chunked, exact run.
        x_u8 = padded_u8(x, p.in_zp, p.geometry)
        y = _onednn_call(x_u8, 128 + p.in_zp, p.whole, p.n, p.geometry)
        lo, hi = torch.aminmax(y)
        if -F32_EXACT < lo.item() and hi.item() < F32_EXACT:
            return y
    return run_prepared(x, p)
