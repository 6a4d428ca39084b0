"""Measured latency of a quantized linear at each width, cached per machine: the cost the
mixed-precision budget {"latency": ...} spends (passes/choose_precision.py).

What: `linear_ms(device, m, k, n, w_bits, a_bits)` times the op a layer of that shape runs
at those widths, with the implementation family `lower` binds there (the CPU path on a
CPU, the Triton kernels on CUDA): int8 / int4-valued weights with 8-bit inputs through
linear_int8_dq (int4 values run the int8 GEMM on CPU; on CUDA linear_w4a8's kernel), 16-bit
inputs through linear_a16w8_dq, each with its input's quantize op; `float_ms` times
F.linear, the cost of a layer left in float. Medians of a few calls after a warm-up, on
random integers (the speed of these kernels does not depend on the values).

Results persist in latency.json beside the autotune cache (~/.cache/qcompile), keyed by the
machine (CPU capabilities and thread count, or the GPU's name), the op and the shape with M
in power-of-two buckets, under the same lock-and-rename discipline (lowering/cache_dir.py),
so a second compile of the model times nothing.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.lowering.autotune import default_cache_dir, m_bucket
from qcompile.lowering.cache_dir import JsonEntries

VERSION = 1
_WHAT = "latency cache"
_ELSEWHERE = "choose another cache directory (the cache_dir argument)"
_LOCK = threading.Lock()
_MEMO: dict[str, float] = {}
TIMED = 0  # how many shapes this process has timed (tests check reuse with it)


def machine_key(device: str) -> str:
    if device == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}"
    from qcompile.lowering.cpu_routes import cpu_capabilities

    return f"cpu:{cpu_capabilities().describe()}:threads={torch.get_num_threads()}"


def _time_ms(fn, device: str, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _runner(device: str, m: int, k: int, n: int, w_bits: int, a_bits: int | None):
    from qcompile.lowering import a16_ops, ops
    from qcompile.numerics.specs import pack_int4

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device)
    if a_bits is None:  # the float layer
        w, b = torch.randn(n, k, generator=g).to(device), torch.randn(n).to(device)
        return lambda: F.linear(x, w, b)
    impl = "triton" if device == "cuda" else "cpu"
    lo = -(1 << (w_bits - 1))
    wq = torch.randint(lo, -lo, (n, k), dtype=torch.int8, generator=g).to(device)
    ws, b = (torch.rand(n) * 1e-3).to(device), torch.randn(n).to(device)
    if a_bits == 16:
        return lambda: a16_ops.linear_a16w8_dq(
            a16_ops.quantize_int16(x, 1e-3, -32768, 32767, impl=impl), wq, b, 1e-3, ws,
            torch.float32, impl=impl)
    if w_bits == 4 and device == "cuda":
        wq = pack_int4(wq)

    def run():
        xq = ops.quantize(x, 0.05, 0, -128, 127, impl=impl)
        return ops.linear_int8_dq(xq, wq, b, None, 0.05, ws, torch.float32, impl=impl)

    return run


def linear_ms(device: str, m: int, k: int, n: int, w_bits: int, a_bits: int | None,
              cache_dir: str | None = None) -> float:
    """Milliseconds per call of one linear [M, K] x [N, K]^T at these widths (a_bits None:
    float32 F.linear), from the cache or measured now."""
    global TIMED
    key = (f"{machine_key(device)}|{'float' if a_bits is None else f'w{w_bits}a{a_bits}'}|"
           f"m{m_bucket(m)}|k{k}|n{n}")
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        cache = _cache(cache_dir)
        found = cache.get(key, refresh=True)
        if found is None:
            found = _time_ms(_runner(device, m_bucket(m), k, n, w_bits, a_bits), device)
            TIMED += 1
            cache.put(key, found)
        _MEMO[key] = found
        return found


def _problem(entry) -> str | None:
    ok = isinstance(entry, (int, float)) and not isinstance(entry, bool) and entry > 0
    return None if ok else f"{entry!r} is not a positive number of milliseconds"


def _cache(cache_dir: str | None) -> JsonEntries:
    return JsonEntries(Path(cache_dir or default_cache_dir()).expanduser() / "latency.json",
                       version=VERSION, what=_WHAT, elsewhere=_ELSEWHERE, problem=_problem)
