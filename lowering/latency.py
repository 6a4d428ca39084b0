"""Measured latency of a quantized linear at each width, cached per machine: the cost the
mixed-precision budget {"latency": ...} spends (passes/choose_precision.py), and what
select-layers weighs an online Hadamard's readers by (quantized with the rotation in front,
or float without it).

What: `linear_ms(device, m, k, n, w_bits, a_bits)` times the op a layer of that shape runs
at those widths, with the implementation family `lower` binds there (the CPU path on a
CPU, the Triton kernels on CUDA; on CPU 8- and 4-bit inputs as the quantized graph runs
them: on the layer's route, quantizer and epilogue written out and compiled by Inductor):
int8 / int4-valued weights with 8-bit inputs through
linear_int8_dq (int4 values run the int8 GEMM on CPU; on CUDA linear_w4a8's kernel), 16-bit
inputs through linear_a16w8_dq, each with its input's quantize op; per-token dynamic inputs
through linear_dynamic (8-bit) or linear_a4w4_dynamic (4-bit); a_bits None times
F.linear, the cost of a layer left in float. `hadamard_ms` times the online Hadamard
transform. The fastest of a few calls after two warm-ups, on
random integers (the speed of these kernels does not depend on the values).

Results persist in latency.json beside the autotune cache (~/.cache/qcompile), keyed by the
machine (CPU capabilities and thread count, or the GPU's name), the op and the shape with M
in power-of-two buckets, under the same lock-and-rename discipline (lowering/cache_dir.py),
so a second compile of the model times nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.lowering.autotune import default_cache_dir, m_bucket
from qcompile.lowering.cache_dir import JsonEntries

# 3: quantized CPU layers timed as their graph runs them (_cpu_graph_runner); 2: the fastest
# of 7 calls after two warm-ups (1: the median of 5 after one)
VERSION = 3
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


def _time_ms(fn, device: str, reps: int = 7) -> float:
    """The fastest of `reps` calls after two warm-ups: first calls' allocations and other
    work on a shared machine only ever add time, so the minimum is the steadiest figure."""
    fn()
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
    return min(times)


def _runner(device: str, m: int, k: int, n: int, w_bits: int, a_bits: int | None,
            dynamic: bool = False):
    from qcompile.lowering import a4_ops, a16_ops, ops
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
    if device == "cpu":
        return _cpu_graph_runner(x, wq, ws, b, a_bits, dynamic)
    if a_bits == 4:  # per-token dynamic asymmetric int4 (w4a4), packed int4 weights
        w4 = pack_int4(wq.clamp(-8, 7))
        w_sum = a4_ops.weight_row_sums(w4)
        return lambda: a4_ops.linear_a4w4_dynamic(x, w4, ws, b, 1.0, w_sum, impl=impl)
    if w_bits == 4 and device == "cuda":
        wq = pack_int4(wq)
    if dynamic:  # per-token dynamic int8
        return lambda: ops.linear_dynamic(x, wq, ws, b, impl=impl)

    def run():
        xq = ops.quantize(x, 0.05, 0, -128, 127, impl=impl)
        return ops.linear_int8_dq(xq, wq, b, None, 0.05, ws, torch.float32, impl=impl)

    return run


class _QuantizedLayer(torch.nn.Module):
    """One quantized linear as a CPU graph has it after `lower`: its input's quantization and
    the GEMM op, bound to one route (8-bit: static quantize + linear_int8_dq, or per-token
    linear_dynamic; 4-bit: linear_a4w4_dynamic on the int8 values of grouped weights)."""

    def __init__(self, wq, ws, b, a_bits: int, dynamic: bool, impl: str):
        super().__init__()
        from qcompile.lowering import a4_ops

        self.a_bits, self.dynamic, self.impl = a_bits, dynamic, impl
        for name, t in (("wq", wq), ("ws", ws), ("b", b), ("w_sum", a4_ops.weight_row_sums(wq))):
            self.register_buffer(name, t)

    def forward(self, x):
        q = torch.ops.qcompile
        if self.a_bits == 4:
            return q.linear_a4w4_dynamic.default(x, self.wq, self.ws, self.b, 1.0, self.w_sum,
                                                 impl=self.impl)
        if self.dynamic:
            return q.linear_dynamic.default(x, self.wq, self.ws, self.b, impl=self.impl)
        xq = q.quantize.default(x, 0.05, 0, -128, 127, impl=self.impl)
        return q.linear_int8_dq.default(xq, self.wq, self.b, None, 0.05, self.ws,
                                        torch.float32, impl=self.impl)


def _cpu_graph_runner(x, wq, ws, b, a_bits: int, dynamic: bool):
    """The layer as a quantized CPU graph runs it: on the route select-layers would choose,
    its quantizer and epilogue written out for Inductor (lowering/inline.py) and compiled
    with the graph, so that neither the ops' per-call overhead nor their unfused passes are
    counted (timed as standalone ops, a W4A4 call of 512 x 384 x 384 read 0.88 ms against
    0.78 ms float while its GEMM takes about 0.1 ms)."""
    from torch._inductor.compile_fx import compile_fx

    from qcompile.fx_utils import copy_graph_module
    from qcompile.lowering import cpu_routes
    from qcompile.lowering.inline import inline_for_inductor

    m, k = x.shape
    lo, hi = int(wq.min()), int(wq.max())
    route = cpu_routes.choose_route(cpu_routes.cpu_capabilities(), m, k, wq.shape[0],
                                    (lo, hi)).route.name
    gm = copy_graph_module(torch.fx.symbolic_trace(
        _QuantizedLayer(wq, ws, b, a_bits, dynamic, f"cpu-{route}")))
    inlined = inline_for_inductor(gm)
    compiled = compile_fx(gm, [x], config_patches=inlined.config_patches)
    return lambda: compiled(x)


Spec = tuple  # ("linear", m, k, n, w_bits, a_bits, dynamic) or ("hadamard", m, n)


def linear_spec(m: int, k: int, n: int, w_bits: int, a_bits: int | None,
                dynamic: bool = False) -> Spec:
    return ("linear", m_bucket(m), k, n, w_bits, a_bits, bool(dynamic and a_bits == 8))


def hadamard_spec(m: int, n: int) -> Spec:
    return ("hadamard", m_bucket(m), n)


def linear_ms(device: str, m: int, k: int, n: int, w_bits: int, a_bits: int | None,
              cache_dir: str | None = None, dynamic: bool = False) -> float:
    """Milliseconds per call of one linear [M, K] x [N, K]^T at these widths (a_bits None:
    float32 F.linear), from the cache or measured now. dynamic: per-token activation
    scales computed at run time (linear_dynamic; 4-bit inputs are always per token,
    linear_a4w4_dynamic), else static ones (quantize, then linear_int8_dq). Integer
    weights span w_bits (7: the [-64, 63] of a CPU route without VNNI)."""
    return spec_ms(device, linear_spec(m, k, n, w_bits, a_bits, dynamic), cache_dir)


def hadamard_ms(device: str, m: int, n: int, cache_dir: str | None = None) -> float:
    """Milliseconds per call of the online Hadamard transform (ops.hadamard_transform, the
    implementation `lower` binds on this device) of [M, n] float32 rows."""
    return spec_ms(device, hadamard_spec(m, n), cache_dir)


def _key(device: str, spec: Spec) -> str:
    if spec[0] == "hadamard":
        _, m, n = spec
        return f"{machine_key(device)}|hadamard|m{m}|n{n}"
    _, m, k, n, w_bits, a_bits, dynamic = spec
    op = "float" if a_bits is None else f"w{w_bits}a{a_bits}" + ("d" if dynamic else "")
    return f"{machine_key(device)}|{op}|m{m}|k{k}|n{n}"


def _spec_runner(device: str, spec: Spec):
    if spec[0] == "linear":
        return _runner(device, *spec[1:])
    from qcompile.lowering import ops

    _, m, n = spec
    impl = "triton" if device == "cuda" else "cpu"
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(device)
    return lambda: ops.hadamard_transform(x, impl=impl)


def spec_ms(device: str, spec: Spec, cache_dir: str | None = None) -> float:
    """The cached milliseconds of `spec`, or timed now in this process and stored."""
    global TIMED
    key = _key(device, spec)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        cache = _cache(cache_dir)
        found = cache.get(key, refresh=True)
        if found is None:
            found = _time_ms(_spec_runner(device, spec), device)
            TIMED += 1
            cache.put(key, found)
        _MEMO[key] = found
        return found


def prefetch(device: str, specs: list[Spec], cache_dir: str | None = None) -> None:
    """Times every spec the cache lacks in a fresh Python process (then spec_ms reads the
    cache). Why: inside a torch.compile backend, where select-layers runs, nested
    torch.compile is off, so the CPU kernels' compiled helpers (quantize, epilogues) run as
    eager ops: timed there, a W4A4 call that takes 1.5 ms read 4.8 ms (all-MiniLM-L6-v2's
    384 x 384 at 4096 rows, AVX512-VNNI EPYC) and kept layers float that beat it. If the
    process fails, the specs are timed here after a warning that says so."""
    with _LOCK:
        cache = _cache(cache_dir)
        missing = [s for s in dict.fromkeys(specs)
                   if _key(device, s) not in _MEMO and cache.get(_key(device, s)) is None]
    if not missing:
        return
    directory = str(Path(cache_dir or default_cache_dir()).expanduser())
    cmd = [sys.executable, "-m", "qcompile.lowering.latency", "--device", device,
           "--threads", str(torch.get_num_threads()), "--cache", directory,
           "--specs", json.dumps(missing)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        problem = proc.stderr.strip().splitlines()[-1:] if proc.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        problem = [str(e)]
    if problem:
        warnings.warn(f"qcompile: timing {len(missing)} kernel shape(s) in a fresh process "
                      f"failed ({problem[0] if problem else 'no output'}); timing them in this "
                      "one, where compiled helpers run eagerly: quantized layers may read "
                      "slower than they run", RuntimeWarning, stacklevel=2)


def main(argv: list[str] | None = None) -> int:
    """python -m qcompile.lowering.latency --specs JSON [--device cpu] [--threads N]
    [--cache DIR]: time each spec (prefetch's fresh process) and store it in the cache."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in json.loads(args.specs):
        print(spec, f"{spec_ms(args.device, tuple(spec), args.cache):.3f} ms")
    return 0


def _problem(entry) -> str | None:
    ok = isinstance(entry, (int, float)) and not isinstance(entry, bool) and entry > 0
    return None if ok else f"{entry!r} is not a positive number of milliseconds"


def _cache(cache_dir: str | None) -> JsonEntries:
    return JsonEntries(Path(cache_dir or default_cache_dir()).expanduser() / "latency.json",
                       version=VERSION, what=_WHAT, elsewhere=_ELSEWHERE, problem=_problem)


if __name__ == "__main__":
    raise SystemExit(main())
