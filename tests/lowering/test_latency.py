"""lowering/latency.py: timings of kernel shapes, cached per machine, and taken in a fresh
process where the caller runs inside a torch.compile backend (select-layers does)."""

import pytest
import torch

from qcompile.lowering import latency


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(latency, "_MEMO", {})
    return tmp_path


def test_specs_name_what_they_time():
    # M in power-of-two buckets; "dynamic" only means something for 8-bit inputs
    assert latency.linear_spec(10, 32, 16, 8, 8, dynamic=True) == \
        ("linear", 16, 32, 16, 8, 8, True)
    assert latency.linear_spec(10, 32, 16, 8, 4, dynamic=True) == \
        ("linear", 16, 32, 16, 8, 4, False)
    assert latency.hadamard_spec(100, 384) == ("hadamard", 128, 384)
    keys = {latency._key("cpu", s) for s in (
        latency.linear_spec(16, 32, 16, 8, 8), latency.linear_spec(16, 32, 16, 8, 8, True),
        latency.linear_spec(16, 32, 16, 7, 8), latency.linear_spec(16, 32, 16, 8, 4),
        latency.linear_spec(16, 32, 16, 8, None), latency.hadamard_spec(16, 32))}
    assert len(keys) == 6


@pytest.mark.parametrize("spec", [latency.linear_spec(8, 32, 16, 8, 8, dynamic=True),
                                  latency.linear_spec(8, 32, 16, 8, 4),
                                  latency.hadamard_spec(8, 48)], ids=["a8-dynamic", "a4", "had"])
def test_every_runner_runs_its_op(cache, spec):
    before = latency.TIMED
    ms = latency.spec_ms("cpu", spec)
    assert ms > 0 and latency.TIMED == before + 1
    assert latency.spec_ms("cpu", spec) == ms and latency.TIMED == before + 1  # memo
    assert latency._cache(None).get(latency._key("cpu", spec)) == ms


def test_a_failed_fresh_process_warns_and_times_here(cache, monkeypatch):
    monkeypatch.setattr(latency.sys, "executable", str(cache / "no-such-python"))
    spec = latency.hadamard_spec(8, 32)
    with pytest.warns(RuntimeWarning, match="timing 1 kernel shape.*in a fresh process failed"):
        latency.prefetch("cpu", [spec])
    before = latency.TIMED
    assert latency.spec_ms("cpu", spec) > 0 and latency.TIMED == before + 1


@pytest.mark.slow
def test_prefetch_times_in_a_fresh_process(cache):
    specs = [latency.hadamard_spec(8, 32), latency.linear_spec(8, 32, 16, 8, 8),
             latency.linear_spec(8, 32, 16, 8, None)]
    before = latency.TIMED
    latency.prefetch("cpu", specs + specs[:1])
    assert latency.TIMED == before  # nothing timed in this process
    stored = latency._cache(None)
    key = latency._key("cpu", specs[1])
    assert f"threads={torch.get_num_threads()}" in key
    assert all(stored.get(latency._key("cpu", s)) > 0 for s in specs)
    assert [latency.spec_ms("cpu", s) for s in specs] == \
        [stored.get(latency._key("cpu", s)) for s in specs] and latency.TIMED == before
    latency.prefetch("cpu", specs)  # all cached: no process
