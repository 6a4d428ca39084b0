"""What machine a benchmark ran on, and how it is timed: shared by the bench scripts (run
as files, so this module is imported from bench/ itself). Every CPU number names its CPU
model, ISA, VNNI / AMX or not and the thread count: the CPU facts come from qcompile's own
capability probe (lowering/cpu_routes.py), the one place that decides CPU routes."""

from __future__ import annotations

import time


def cpu_info() -> dict:
    """CPU model, ISA (torch's CPU capability), int8 dot-product extensions, threads."""
    import torch

    from qcompile.lowering.cpu_routes import cpu_capabilities

    caps = cpu_capabilities()
    return {"cpu": caps.model or caps.arch, "isa": caps.isa, "vnni": caps.vnni,
            "avx512_vnni": caps.avx512_vnni, "amx": caps.amx, "capabilities": caps.describe(),
            "threads": torch.get_num_threads()}


def results_slug() -> str:
    """host, CPU family and ISA for results file names: one VM name covers CPUs of
    different kinds (an AVX512-VNNI EPYC, an AVX2 EPYC and an AVX512-VNNI Xeon were all
    "vm"), and their numbers must not mix."""
    import socket

    from qcompile.lowering.cpu_routes import cpu_capabilities

    caps = cpu_capabilities()
    isa = caps.isa.lower() + ("-vnni" if caps.vnni and "vnni" not in caps.isa.lower() else "")
    family = cpu_family(caps.model)
    host = socket.gethostname().split(".")[0] or "host"
    return "-".join(p for p in (host, family, isa) if p)


def cpu_family(model: str | None) -> str:
    """The first word of a CPU model name past vendor and trademark words, lower case:
    "Intel(R) Xeon(R) Processor" -> "xeon", "AMD EPYC 7B13 64-Core Processor" -> "epyc";
    "" where the OS names no model."""
    import re

    skip = {"intel", "amd", "genuine", "authentic", "cpu", "processor"}
    words = re.sub(r"\((r|tm)\)", " ", (model or "").lower()).split()
    words = [w for w in words if w not in skip and re.fullmatch(r"[a-z0-9][a-z0-9-]*", w)]
    return words[0] if words else ""


def cpu_model() -> str | None:
    """The CPU's model name, or None where the OS does not say."""
    return cpu_info()["cpu"] or None


# How a benchmark is timed. wall: latency as a user sees it, disturbed by whatever else runs
# on the machine; cpu: CPU time of this process, all threads summed (robust on a shared
# machine); thread: this thread's CPU time (with --threads 1, the single-core latency).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}


def warm_then_interleaved(fns: dict, rounds: int, clock) -> tuple[dict, dict]:
    """(seconds of each function's first call, where compiles happen; interleaved's ms per
    call over `rounds` after a second, warm call)."""
    first_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first_s[name] = round(time.perf_counter() - t0, 3)
        fn()
    return first_s, interleaved(fns, rounds, clock)


def interleaved(fns: dict, rounds: int, clock) -> dict[str, list[float]]:
    """ms per call of each function, run in turns within each round, so that a disturbance
    of the machine falls on all of them alike (report medians over rounds)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    return times


def earlier_results(path: str) -> dict:
    """The "results" of an earlier run's JSON at path ({} when there is none): a bench script
    rerunning some configurations (--only) keeps the others', each naming its machine."""
    import json

    try:
        with open(path) as f:
            return json.load(f).get("results", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
