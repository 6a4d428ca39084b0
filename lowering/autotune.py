"""Autotuning of GEMM kernel configs, with a persistent per-device cache.

What: per-kernel config spaces (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) for Hopper
(sm90+) and older GPUs; `get_config` looks a shape up by
key = (device name, kernel, epilogue signature, N, K, power-of-two bucket of M), tunes on
a miss with triton.testing.do_bench, and stores the winner (with every candidate's time)
in a JSON file (default ~/.cache/qcompile/autotune.json), so later processes reuse it
without tuning.

The file is safe to share between processes (lowering/cache_dir.py): each write merges
with what is on disk under an flock on autotune.json.lock and renames a complete new file
into place, so concurrent tuners lose no entries and readers never see half a file. A file
that is not valid JSON, has another version, or holds malformed entries is ignored (those
entries, or all of it) with one CacheWarning and rebuilt. The directory must be private
to this user (cache_dir.trusted_dir).

Without a GPU the same path runs but times nothing: a miss yields a deterministic
default config (small blocks suited to the Triton interpreter), persisted under the
device name "cpu" so the cache and its keys behave the same everywhere.

CLI: python -m qcompile.lowering.autotune --shapes 128x4096x4096,1x4096x11008 [--cache DIR]
(shapes are M x K x N) prints the chosen configs and their timings.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qcompile.lowering import device as qdevice
from qcompile.lowering.cache_dir import JsonEntries

CACHE_VERSION = 1
M_BUCKET_MAX = 16384  # every M above shares one config: tiles are saturated long before


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of a tiled GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} "
            f"w{self.num_warps} s{self.num_stages}"
        )

    @classmethod
    def from_dict(cls, d: dict) -> GemmConfig:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


@dataclass
class TuneResult:
    """The config for one key; source is "cache", "tuned" or "default"."""

    key: str
    config: GemmConfig
    source: str
    ms: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _c(bm, bn, bk, g, w, s) -> GemmConfig:
    return GemmConfig(bm, bn, bk, g, w, s)


# Hopper: larger K tiles and deep pipelines feed int8 wgmma; small-M tiles for decode.
SM90_CONFIGS = (
    _c(128, 256, 128, 8, 8, 3), _c(256, 128, 128, 8, 8, 3), _c(128, 128, 128, 8, 8, 4),
    _c(128, 128, 128, 8, 4, 4), _c(128, 64, 128, 8, 4, 4), _c(64, 128, 128, 8, 4, 4),
    _c(64, 64, 128, 8, 4, 5), _c(64, 128, 256, 8, 4, 3), _c(32, 64, 128, 8, 4, 5),
    _c(32, 128, 256, 8, 4, 3), _c(16, 64, 256, 1, 4, 4), _c(16, 128, 128, 1, 4, 4),
    _c(16, 64, 128, 1, 2, 5), _c(16, 32, 256, 1, 2, 5),
)
# Ampere and older: the Triton matmul tutorial's int8 space (BLOCK_K 64/128, 3-5 stages),
# with at most 64 accumulators a thread: at 128 (128 x 128 on 4 warps, 128 x 256 on 8)
# ptxas spills on sm_80 for every epilogue, 0.7 KB a thread for int32 and up to 15 KB with
# requantization (tests/lowering/test_gpu_aot.py compiles every config here for sm_80).
SM80_CONFIGS = (
    _c(128, 128, 128, 8, 8, 3), _c(128, 128, 64, 8, 8, 4), _c(64, 256, 64, 8, 8, 3),
    _c(256, 64, 64, 8, 8, 3), _c(128, 64, 64, 8, 4, 4), _c(64, 128, 64, 8, 4, 4),
    _c(64, 64, 64, 8, 4, 4), _c(64, 64, 128, 8, 4, 3), _c(32, 64, 64, 8, 4, 5),
    _c(32, 32, 128, 8, 2, 5), _c(16, 64, 128, 1, 4, 4), _c(16, 128, 64, 1, 4, 4),
)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Smallest power of two >= M (1 for M <= 1), capped at M_BUCKET_MAX."""
    return min(_pow2(max(1, m)), M_BUCKET_MAX)


def tune_key(device: str, kernel: str, signature: str, m: int, n: int, k: int) -> str:
    """The cache key: device, kernel, epilogue signature, N, K and the bucket of M."""
    return f"{device}|{kernel}|{signature}|N={n}|K={k}|M<={m_bucket(m)}"


def config_space(capability: tuple[int, int] | None, m: int, n: int, k: int) -> list[GemmConfig]:
    """Candidate configs for a shape on a GPU of that capability, pruned to fit the shape."""
    if capability is None:
        return [default_config(None, m, n, k)]
    base = SM90_CONFIGS if capability >= (9, 0) else SM80_CONFIGS
    # Tiles much larger than the problem only waste work: cap each block at the problem's
    # power-of-two size (but keep at least 16, the smallest tl.dot, and 32 along K for int8).
    fits = [
        c for c in base
        if c.block_m <= max(16, m_bucket(m)) and c.block_n <= max(16, _pow2(n))
        and c.block_k <= max(32, _pow2(k))
    ]
    return fits or [min(base, key=lambda c: (c.block_m, c.block_n, c.block_k))]


def default_config(capability: tuple[int, int] | None, m: int, n: int, k: int) -> GemmConfig:
    """A deterministic config without timing anything.

    Interpreter (capability None): blocks of 16..64 covering small test shapes with few
    programs (each program is a Python-level loop). GPU: a middle-of-the-road tile by M
    that compiles without register spills for every epilogue (checked for sm_80 and
    sm_90 by tests/lowering/test_gpu_aot.py): 128-row tiles take 8 warps, so a thread
    holds 64 accumulators, not 128; on sm_90 small M takes 64 columns and deep K tiles.
    """
    if capability is None:
        clamp = lambda x: min(64, max(16, _pow2(x)))
        return GemmConfig(clamp(m), clamp(n), clamp(k), group_m=8, num_warps=4, num_stages=2)
    if capability >= (9, 0):
        cfg = (_c(16, 64, 256, 1, 4, 4) if m <= 16 else _c(64, 128, 128, 8, 4, 4) if m <= 64
               else _c(128, 128, 128, 8, 8, 4))
    else:
        cfg = (_c(16, 128, 128, 1, 4, 3) if m <= 16 else _c(64, 128, 128, 8, 4, 3) if m <= 64
               else _c(128, 128, 128, 8, 8, 3))
    # A short K takes a K tile no longer than K (but at least 64).
    return replace(cfg, block_k=min(cfg.block_k, max(64, 1 << (max(1, k).bit_length() - 1))))


def default_cache_dir() -> Path:
    """~/.cache/qcompile (resolved when called, not at import)."""
    return Path.home() / ".cache" / "qcompile"


_POW2_FIELDS = ("block_m", "block_n", "block_k", "num_warps")  # Triton needs powers of two
_WHAT = "autotune cache"
_ELSEWHERE = ("choose another directory with --cache DIR (python -m qcompile.lowering.autotune) "
              "or cache_dir=")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def entry_problem(entry: object) -> str | None:
    """What is wrong with one cache entry, or None if get_config can use it.

    An entry is {"config": {every GemmConfig field: positive int}, "ms": number or null
    (optional), "timings": {config text: number} (optional), any other keys (notes)}.
    """
    if not isinstance(entry, dict):
        return f"the entry is a {type(entry).__name__}, not an object"
    config = entry.get("config")
    if not isinstance(config, dict):
        return "it has no 'config' object"
    for name in GemmConfig.__dataclass_fields__:
        if name not in config:
            return f"its config lacks {name!r}"
        v = config[name]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            return f"its config's {name!r} is {v!r}, not a positive integer"
        if name in _POW2_FIELDS and v & (v - 1):
            return f"its config's {name!r} is {v}, not a power of two"
    ms = entry.get("ms")
    if ms is not None and not (_is_number(ms) and not math.isnan(ms)):
        return f"its 'ms' is {ms!r}, not a number"
    timings = entry.get("timings", {})
    if not isinstance(timings, dict) or not all(
        isinstance(k, str) and _is_number(v) for k, v in timings.items()
    ):
        return "its 'timings' is not an object of numbers"
    return None


class AutotuneCache(JsonEntries):
    """The JSON file of tuned configs: {"version": 1, "entries": {key: entry}}
    (cache_dir.JsonEntries: memoised reads, merged atomic writes)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        super().__init__(Path(cache_dir or default_cache_dir()).expanduser() / "autotune.json",
                         version=CACHE_VERSION, what=_WHAT, elsewhere=_ELSEWHERE,
                         problem=entry_problem)


_LOCK = threading.Lock()
_CACHES: dict[str, AutotuneCache] = {}
_MEMO: dict[tuple[str, str], TuneResult] = {}
TUNE_COUNT = 0  # how many keys this process has timed (tests check reuse with it)


def _cache(cache_dir: str | os.PathLike | None) -> AutotuneCache:
    path = str(Path(cache_dir or default_cache_dir()).expanduser().resolve())
    if path not in _CACHES:
        _CACHES[path] = AutotuneCache(path)
    return _CACHES[path]


def time_ms(fn: Callable[[], object]) -> float:
    """Median time of fn in milliseconds on the GPU (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50))


def get_config(
    kernel: str,
    signature: str,
    m: int,
    n: int,
    k: int,
    *,
    run: Callable[[GemmConfig], object] | None = None,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TuneResult:
    """The config for this GEMM: from memory, the JSON cache, tuning, or the default.

    run(config) launches the kernel once with config; given on CUDA, a cache miss times
    every candidate with it and persists the winner. Without CUDA nothing is timed: the
    default config is persisted instead. With CUDA but no `run`, the default is returned
    and not persisted (no measurement stands behind it).
    """
    global TUNE_COUNT
    cap = qdevice.cuda_capability() if qdevice.triton_target() == "cuda" else None
    dev = device or (qdevice.device_name() if cap is not None else "cpu")
    key = tune_key(dev, kernel, signature, m, n, k)
    cache = _cache(cache_dir)
    memo_key = (str(cache.path), key)
    with _LOCK:
        if memo_key in _MEMO:
            return _MEMO[memo_key]
        hit = cache.get(key) or cache.get(key, refresh=True)
        if hit is not None:
            result = TuneResult(key, GemmConfig.from_dict(hit["config"]), "cache", hit.get("ms"),
                                hit.get("timings", {}))
        elif cap is None:
            result = TuneResult(key, default_config(None, m, n, k), "default")
            cache.put(key, {"config": asdict(result.config), "ms": None, "timings": {},
                            "note": "no GPU: default config, nothing timed"})
        elif run is None:
            return TuneResult(key, default_config(cap, m, n, k), "default")
        else:
            result = _tune(key, config_space(cap, m, n, k), run)
            TUNE_COUNT += 1
            cache.put(key, {"config": asdict(result.config), "ms": result.ms,
                            "timings": result.timings,
                            "tuned_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        _MEMO[memo_key] = result
        return result


def _tune(
    key: str, candidates: list[GemmConfig], run: Callable[[GemmConfig], object]
) -> TuneResult:
    timings: dict[str, float] = {}
    best: tuple[float, GemmConfig] | None = None
    for cfg in candidates:
        try:
            ms = time_ms(lambda cfg=cfg: run(cfg))
        except Exception as e:  # noqa: BLE001 - e.g. OutOfResources: too much shared memory
            timings[str(cfg)] = float("inf")
            print(f"qcompile autotune: {cfg} failed on {key}: {type(e).__name__}")
            continue
        timings[str(cfg)] = ms
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best is None:
        raise RuntimeError(f"every candidate config failed for {key}")
    return TuneResult(key, best[1], "tuned", best[0], timings)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"MxKxN[,MxKxN...]" -> [(M, K, N), ...], each size a positive int (argparse type)."""
    shapes = []
    for item in text.split(","):
        parts = item.lower().strip().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"shape {item!r} is not MxKxN with M, K and N positive integers")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompile.lowering.autotune", description=__doc__)
    p.add_argument("--shapes", required=True, type=parse_shapes, help="MxKxN[,MxKxN...]")
    p.add_argument("--cache", default=None, help="cache directory (default ~/.cache/qcompile)")
    p.add_argument("--epilogue", default="requant", choices=["requant", "dequant", "int32"])
    args = p.parse_args(argv)
    from qcompile.lowering.gemm import example_epilogue, tune_gemm  # gemm imports this module

    epilogue = example_epilogue(args.epilogue)
    if qdevice.triton_target() != "cuda":
        print("no GPU found: showing the default configs (nothing is timed)")
    print(f"epilogue {epilogue.signature()}, cache {_cache(args.cache).path}")
    print(f"{'M x K x N':>20} {'M bucket':>8} {'config':>26} {'ms':>9} {'TOPS':>7} {'source':>8}")
    for m, k, n in args.shapes:
        kernels = Path(args.cache) / "kernels" if args.cache else None
        r = tune_gemm(m, n, k, epilogue, cache_dir=args.cache, kernel_cache_dir=kernels)
        ms = f"{r.ms:.4f}" if r.ms else "-"
        tops = f"{2 * m * n * k / (r.ms * 1e-3) / 1e12:.1f}" if r.ms else "-"
        print(f"{f'{m}x{k}x{n}':>20} {m_bucket(m):>8} {str(r.config):>26} {ms:>9} {tops:>7} "
              f"{r.source:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
