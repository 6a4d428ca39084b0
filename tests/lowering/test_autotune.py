"""Autotune keys, buckets, the persistent JSON cache, reuse by a fresh process, the CLI;
a damaged cache file is ignored with one warning and rebuilt, and concurrent processes
writing one cache lose no entries.

Without a GPU nothing is timed: the default config is persisted under device "cpu", and
the same code path (key, lookup, persist, reuse) is exercised.
"""

import json
import subprocess
import sys

import pytest
import torch

from qcompile.lowering import autotune
from qcompile.lowering.autotune import (
    M_BUCKET_MAX,
    GemmConfig,
    config_space,
    default_config,
    get_config,
    m_bucket,
    tune_key,
)
from qcompile.lowering.cache_dir import CacheWarning, UnsafeCacheDirError
from tests.helpers import CHILD_ENV, run_together


def test_m_bucket_is_next_power_of_two_capped():
    assert [m_bucket(m) for m in (0, 1, 2, 3, 4, 5, 127, 128, 129, 4097)] == [
        1, 1, 2, 4, 4, 8, 128, 128, 256, 8192,
    ]
    assert m_bucket(10**6) == M_BUCKET_MAX


def test_key_names_device_kernel_signature_n_k_and_m_bucket():
    key = tune_key("NVIDIA H100 80GB HBM3", "gemm_int8", "bias+requant.pc", 100, 4096, 11008)
    assert key == "NVIDIA H100 80GB HBM3|gemm_int8|bias+requant.pc|N=4096|K=11008|M<=128"
    same_bucket = tune_key("NVIDIA H100 80GB HBM3", "gemm_int8", "bias+requant.pc", 128, 4096,
                           11008)
    assert same_bucket == key
    assert tune_key("NVIDIA H100 80GB HBM3", "gemm_int8", "bias+requant.pc", 129, 4096,
                    11008) != key
    assert tune_key("NVIDIA A100-SXM4-80GB", "gemm_int8", "bias+requant.pc", 100, 4096,
                    11008) != key
    assert tune_key("NVIDIA H100 80GB HBM3", "gemm_int8", "int32", 100, 4096, 11008) != key


def test_config_spaces_fit_the_shape():
    decode = config_space((9, 0), 1, 4096, 4096)
    assert decode and all(c.block_m == 16 for c in decode)
    big = config_space((9, 0), 8192, 4096, 4096)
    assert any(c.block_m >= 128 for c in big)
    assert config_space((8, 0), 4096, 4096, 4096) != big  # Ampere has its own space
    assert all(c.block_k >= 32 for c in config_space((8, 0), 64, 64, 20))
    assert config_space(None, 5, 6, 7) == [default_config(None, 5, 6, 7)]
    # Deterministic: the same shape gives the same default every time.
    assert default_config(None, 37, 29, 71) == GemmConfig(64, 32, 64, 8, 4, 2)


def test_cpu_persists_default_and_never_times(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "time_ms", lambda fn: pytest.fail("timed on CPU"))
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    r = get_config("gemm_int8", "bias+requant.pc", 100, 4096, 11008, cache_dir=tmp_path,
                   run=lambda cfg: pytest.fail("ran a config on CPU"))
    assert r.source == "default" and r.ms is None
    assert r.config == default_config(None, 100, 4096, 11008)
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data["version"] == autotune.CACHE_VERSION
    assert data["entries"][r.key]["config"]["block_m"] == r.config.block_m
    # Same bucket in this process: memoised; another bucket: a new entry.
    assert get_config("gemm_int8", "bias+requant.pc", 128, 4096, 11008, cache_dir=tmp_path) is r
    get_config("gemm_int8", "bias+requant.pc", 300, 4096, 11008, cache_dir=tmp_path)
    assert len(json.loads((tmp_path / "autotune.json").read_text())["entries"]) == 2


def test_fresh_process_reuses_the_cache(tmp_path):
    # A stored entry (as a GPU run would leave it) is read back by a new process, which
    # must not tune: time_ms is replaced by a failure there.
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    key = tune_key(dev, "gemm_int8", "bias+requant.pc", 64, 512, 256)
    cfg = GemmConfig(32, 64, 128, 4, 4, 3)
    autotune.AutotuneCache(tmp_path).put(key, {"config": cfg.__dict__, "ms": 0.0123})
    child = f"""
import sys
from qcompile.lowering import autotune
autotune.time_ms = lambda fn: sys.exit("tuned again")
r = autotune.get_config("gemm_int8", "bias+requant.pc", 64, 512, 256, cache_dir={str(tmp_path)!r},
                        run=lambda cfg: sys.exit("ran a config"))
print(r.source, r.config, r.ms, autotune.TUNE_COUNT)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         env=CHILD_ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == f"cache {cfg} 0.0123 0"


def test_atomic_merge_keeps_other_entries(tmp_path):
    c1, c2 = autotune.AutotuneCache(tmp_path), autotune.AutotuneCache(tmp_path)
    c1.put("a", {"config": GemmConfig(16, 16, 32).__dict__})
    c2.put("b", {"config": GemmConfig(32, 32, 32).__dict__})  # c2 never saw "a"
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    assert set(entries) == {"a", "b"}
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_cli_prints_configs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qcompile.lowering.autotune", "--shapes",
         "128x4096x4096,1x4096x11008", "--cache", str(tmp_path)],
        capture_output=True, text=True, env=CHILD_ENV, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert "no GPU found" in out.stdout
    assert "128x4096x4096" in out.stdout and "1x4096x11008" in out.stdout
    assert len(json.loads((tmp_path / "autotune.json").read_text())["entries"]) == 2


# ------------------------------------------------------------ a damaged or shared cache

GOOD = {"config": GemmConfig(16, 32, 64, 8, 4, 2).__dict__, "ms": 0.5,
        "timings": {"16x32x64 g8 w4 s2": 0.5, "32x32x64 g8 w4 s2": float("inf")}}


def cache_warnings(recwarn):
    return [str(w.message) for w in recwarn.list if w.category is CacheWarning]


def ignoring(path, problem):
    return f"qcompile: ignoring the autotune cache {path}: {problem}; it will be rebuilt"


@pytest.mark.parametrize("content, problem", [
    (b'{"version": 1, "entries": {"k": {"con', "it is not valid JSON (truncated?): "
     "Unterminated string starting at: line 1 column 34 (char 33)"),
    (b"", "it is not valid JSON (truncated?): Expecting value: line 1 column 1 (char 0)"),
    (b"\x89PNG\r\n\x1a\n", "it is not UTF-8 text (invalid start byte at byte 0)"),
    (b'[1, 2]', "it holds a JSON list, not an object"),
    (b'{"version": 2, "entries": {}}', "its version is 2, this qcompile reads version 1"),
    (b'{"entries": {}}', "its version is None, this qcompile reads version 1"),
    (b'{"version": 1, "entries": []}', "its 'entries' is not an object"),
])
def test_unreadable_file_is_ignored_with_one_warning_and_rebuilt(tmp_path, recwarn, content,
                                                                  problem):
    path = tmp_path.resolve() / "autotune.json"
    path.write_bytes(content)
    cache = autotune.AutotuneCache(tmp_path)
    assert cache.get("k") is None and cache.get("k", refresh=True) is None
    cache.put("k", GOOD)
    assert cache_warnings(recwarn) == [ignoring(path, problem)]  # once, though read 3 times
    assert json.loads(path.read_text()) == {"version": 1, "entries": {"k": GOOD}}


@pytest.mark.parametrize("entry, problem", [
    ("16x16x32", "the entry is a str, not an object"),
    ({"ms": 1.0}, "it has no 'config' object"),
    ({"config": {**GOOD["config"], "block_k": None}}, "its config's 'block_k' is None, not a "
     "positive integer"),
    ({"config": {k: v for k, v in GOOD["config"].items() if k != "num_stages"}},
     "its config lacks 'num_stages'"),
    ({"config": {**GOOD["config"], "block_m": "16"}}, "its config's 'block_m' is '16', not a "
     "positive integer"),
    ({"config": {**GOOD["config"], "num_warps": True}}, "its config's 'num_warps' is True, not a "
     "positive integer"),
    ({"config": {**GOOD["config"], "block_n": 0}}, "its config's 'block_n' is 0, not a positive "
     "integer"),
    ({"config": {**GOOD["config"], "block_n": 48}}, "its config's 'block_n' is 48, not a power "
     "of two"),
    ({**GOOD, "ms": "fast"}, "its 'ms' is 'fast', not a number"),
    ({**GOOD, "timings": [0.5]}, "its 'timings' is not an object of numbers"),
])
def test_malformed_entry_is_dropped_and_retuned_others_kept(tmp_path, recwarn, entry, problem):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    bad_key = tune_key(dev, "gemm_int8", "int32", 16, 48, 96)
    good_key = tune_key(dev, "gemm_int8", "int32", 16, 48, 64)
    path = tmp_path.resolve() / "autotune.json"
    path.write_text(json.dumps({"version": 1, "entries": {bad_key: entry, good_key: GOOD}}))
    assert autotune.entry_problem(entry) == problem
    kept = get_config("gemm_int8", "int32", 16, 48, 64, cache_dir=tmp_path)
    assert kept.source == "cache" and kept.config == GemmConfig(16, 32, 64, 8, 4, 2)
    if torch.cuda.is_available():
        return  # without `run` a GPU returns the default and stores nothing
    rebuilt = get_config("gemm_int8", "int32", 16, 48, 96, cache_dir=tmp_path)
    assert rebuilt.source == "default"
    assert cache_warnings(recwarn) == [
        ignoring(path, f"1 malformed entries are dropped: {bad_key!r}: {problem}")
    ]
    entries = json.loads(path.read_text())["entries"]
    assert entries[good_key] == GOOD
    assert entries[bad_key]["config"] == rebuilt.config.__dict__


def test_directory_in_place_of_the_file_is_replaced(tmp_path, recwarn):
    path = tmp_path.resolve() / "autotune.json"
    (path / "stray").mkdir(parents=True)
    cache = autotune.AutotuneCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", GOOD)
    assert cache_warnings(recwarn) == [ignoring(path, "it is a directory, not a file")]
    assert json.loads(path.read_text())["entries"] == {"k": GOOD}


def test_malformed_entries_are_never_written(tmp_path):
    with pytest.raises(ValueError,
                       match="malformed autotune cache entry for .k.: its config lacks"):
        autotune.AutotuneCache(tmp_path).put("k", {"config": {"block_m": 16}})
    assert not (tmp_path / "autotune.json").exists()


def test_cache_directory_writable_by_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeCacheDirError, match=(
        rf"refuses the autotune cache directory {shared}: it is writable by group and others"
        r".*Fix: chmod go-w .*; or choose another directory with --cache DIR"
    )):
        get_config("gemm_int8", "int32", 16, 16, 16, cache_dir=shared)
    assert list(shared.iterdir()) == []


WRITER = """
import json, os, sys, time
from pathlib import Path
from qcompile.lowering.autotune import AutotuneCache, GemmConfig

folder, me, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(folder / f"ready{me}").touch()
deadline = time.time() + 120
while not (folder / "go").exists():  # start together, so the writes overlap
    assert time.time() < deadline, "never told to go"
    time.sleep(0.005)
cache, path, mine = AutotuneCache(folder / "cache"), folder / "cache" / "autotune.json", []
for j in range(count):
    key = f"proc{me}-entry{j}"
    cache.put(key, {"config": GemmConfig(16 << me, 16, 32, 1, 4, j + 1).__dict__})
    mine.append(key)
    entries = json.loads(path.read_text())["entries"]  # always a whole file
    lost = [k for k in mine if k not in entries]
    assert not lost, f"entries lost: {lost}"
print("ok")
"""


def test_concurrent_processes_lose_no_entries(tmp_path):
    procs, count = 4, 25
    run_together(WRITER, tmp_path, procs, count, timeout=120)
    entries = json.loads((tmp_path / "cache" / "autotune.json").read_text())["entries"]
    assert entries == {
        f"proc{i}-entry{j}": {"config": GemmConfig(16 << i, 16, 32, 1, 4, j + 1).__dict__}
        for i in range(procs) for j in range(count)
    }
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "autotune.json", "autotune.json.lock"
    ]


def test_latency_cache_shares_the_file_discipline(tmp_path):
    """lowering/latency.py keeps its timings in the same kind of file: a bad entry is
    dropped with a warning, a good one read back by another process's cache object."""
    import json

    from qcompile.lowering import latency

    cache = latency._cache(str(tmp_path))
    cache.put("a", 1.5)
    with pytest.raises(ValueError, match="positive number"):
        cache.put("b", -1.0)
    data = json.loads((tmp_path / "latency.json").read_text())
    data["entries"]["c"] = "fast"
    (tmp_path / "latency.json").write_text(json.dumps(data))
    with pytest.warns(Warning, match="malformed entries are dropped"):
        fresh = latency._cache(str(tmp_path))
        assert fresh.get("a") == 1.5 and fresh.get("c") is None
