"""Autotune keys, buckets, the persistent JSON cache, reuse by a fresh process, the CLI.

Without a GPU nothing is timed: the default config is persisted under device "cpu", and
the same code path (key, lookup, persist, reuse) is exercised.
"""

import json
import os
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

CHILD_ENV = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}


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
