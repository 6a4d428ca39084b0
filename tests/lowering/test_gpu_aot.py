"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90), ahead of time, without one.

What: qcompile.lowering.aot lists the launches the kernel wrappers make (the generated int8
GEMM for every epilogue at every autotune and default config, and every handwritten
kernel). One compile worker per test session compiles those the selected tests need and
keeps the PTX and ptxas's report; the tests then check, per launch:
- it compiles;
- its matrix products run on tensor cores: mma.sync on sm_80; on sm_90 wgmma for tiles of
  64 rows or more (wgmma works on 64-row blocks, smaller tiles use mma.sync there too);
- integer-only kernels and GEMM epilogues contain no floating-point instruction at all;
- its shared memory fits the 227 KB a block may use (every config the autotuner may pick);
- no register spills at the configs launched by default.

Why: every other kernel test runs in the Triton interpreter, which accepts programs the
GPU compiler rejects and knows nothing of registers or shared memory.

The worker is a separate process with TRITON_INTERPRET unset: this one interprets kernels
(conftest.py sets it without a GPU, and Triton decides when a kernel is decorated). Under
pytest-xdist the first worker to get there compiles for all; the others read its results.

Tier: marker `aot`. A representative subset (below), compiled for sm_90 only, runs in the
fast tier; the rest (sm_80 included) is also marked `slow`. The full suite compiles every
handwritten kernel at its default config, and the generated GEMM for every epilogue at the
default config of M = 4096 (the largest tile), for the epilogues that hold the most
registers (TUNED_EPILOGUES: each of the others is a subset of one of them, and the main
loop is the same) at the default config of every M and at every autotune config. The full
cross product of configs and epilogues (about 500 compiles more, some 5 minutes on two
cores) runs with QCOMPILE_AOT_ALL=1. On sm_80 the autotune configs are compiled for two of
those epilogues (448 -> 424 compiles: the suite ran 19 minutes on a 2-core Zen 3). Before
the first trim the compiles were a third of the full suite's CPU time (656 of 1920
CPU-seconds on a 2-core EPYC).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys

import pytest
from torch.testing import FileCheck

pytest.importorskip("triton")

from qcompile.lowering import aot  # noqa: E402
from qcompile.lowering.autotune import (  # noqa: E402
    SM80_CONFIGS,
    SM90_CONFIGS,
    GemmConfig,
    default_config,
)

pytestmark = pytest.mark.aot

# The default (fast) subset: each kernel family once, at its heaviest variant. GEMM
# epilogues: the static w8a8 requantization and the widest float epilogue; every autotune
# config is in the slow tier.
FAST_GEMM_EPILOGUES = {"requant.pt", "izp+dequant.float32+fbias"}
FAST_TUNED_EPILOGUES: set[str] = set()
# Every autotune config is compiled for these epilogues (all of them with QCOMPILE_AOT_ALL=1):
# the widest requantizing epilogue, the widest int32 one, the widest float32 one and a 16-bit
# output; every other epilogue adds a subset of one of these to the same main loop.
TUNED_EPILOGUES = {"izp+bias+requant.pc", "izp+dequant.float32+fbias",
                   "dequant.bfloat16+fbias", "izp+bias"}
SM80_TUNED_EPILOGUES = {"izp+bias+requant.pc", "izp+dequant.float32+fbias"}
ALL_TUNED = os.environ.get("QCOMPILE_AOT_ALL") == "1"
FAST_KERNELS = {
    "quantize_per_tensor[bfloat16]", "requantize[per_channel]",
    "quantize_per_token[bfloat16] K=4096", "hadamard_quantize_per_token[bfloat16] n=3072",
    "hadamard[bfloat16] n=3072", "w4a16[float16] M=128", "w4a8[requant.pc+bias] M=128",
    "attention[bfloat16+causal] D=128", "gelu_int8", "layernorm_int8 C=768",
    "isoftmax_attention[float16+mask] D=128",
    "quantize_per_token_int4_packed[bfloat16, asymmetric] K=4096",
    "gemm_w4a4[rzp+dequant.float32+fbias] 128x128x128 g8 w8 s4 M=4096",
}  # fmt: skip
# Spills at the configs the kernel wrappers choose (launch-name pattern, why); strict: a
# fix makes these tests fail until the entry goes.
KNOWN_SPILLS = [
    # 28-40 bytes: 512 x 32 floats on 16 warps (512 threads, so at most 128 registers each)
    # through nine butterfly stages; hadamard_launch_meta chooses the warps.
    (r"^hadamard(_quantize_per_token)?\[\w+\] n=14336$", "a 14336-wide row spills at 16 warps"),
]
TUNED_SPILL_LIMIT = 1024  # bytes a thread; see test_tuned_configs_spill_at_most_1kb


FAST_ARCH = 90  # the GPU the device checks run on (H200); sm_80 is in the full suite


def _fast(launch: aot.Launch) -> bool:
    if launch.arch != FAST_ARCH:
        return False
    if "gemm" in launch.tags:
        fast = FAST_GEMM_EPILOGUES if "default" in launch.tags else FAST_TUNED_EPILOGUES
        return launch.kernel.signature() in fast
    return launch.name in FAST_KERNELS


def _in_suite(launch: aot.Launch) -> bool:
    if ALL_TUNED or "gemm" not in launch.tags:
        return True
    sig = launch.kernel.signature()
    if "tuned" in launch.tags:  # sm_80: the widest integer and float epilogues (a config's
        # shared memory, what differs most from sm_90, does not depend on the epilogue)
        return sig in (TUNED_EPILOGUES if launch.arch == FAST_ARCH else SM80_TUNED_EPILOGUES)
    # default configs: every epilogue at the largest (M = 4096's), the superset epilogues
    # at every M's (a smaller tile holds fewer registers; the main loop is the same)
    ms = launch.name.rsplit("M=", 1)[1].split(",")
    return "4096" in ms or sig in TUNED_EPILOGUES | FAST_GEMM_EPILOGUES


def _params(select=lambda launch: True, xfail=None):
    out = []
    for arch in aot.ARCHS:
        for launch in aot.launches(arch):
            if not (select(launch) and _in_suite(launch)):
                continue
            marks = [] if _fast(launch) else [pytest.mark.slow]
            reason = xfail(launch) if xfail else None
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(launch, id=launch.id, marks=marks))
    return out


def _needed_ids(session) -> list[str]:
    ids = set()
    for item in session.items:
        launch = getattr(item, "callspec", None) and item.callspec.params.get("launch")
        if isinstance(launch, aot.Launch):
            ids.add(launch.id)
    return sorted(ids)


@pytest.fixture(scope="session")
def compiled(request, tmp_path_factory) -> dict[str, dict]:
    """id -> the compile worker's result (see aot.compile_launch), for this session's tests."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the xdist workers' common directory
    out = root / "gpu-aot"
    out.mkdir(exist_ok=True)
    results = out / "results.json"
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one compiles, the others wait and read
        if not results.exists():
            ids = out / "ids.txt"
            ids.write_text("\n".join(_needed_ids(request.session)) + "\n")
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            jobs = len(os.sched_getaffinity(0))
            cmd = [sys.executable, "-m", "qcompile.lowering.aot", "--ids", str(ids),
                   "--out", str(out), "--json", str(results), "--jobs", str(jobs)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
            (out / "worker.log").write_text(proc.stdout + proc.stderr)
            if not results.exists():
                raise RuntimeError(f"the compile worker failed ({proc.returncode}):\n"
                                   f"{proc.stderr[-4000:]}")  # fmt: skip
    data = json.loads(results.read_text())
    if "unavailable" in data:
        pytest.skip(f"cannot compile for a GPU here: {data['unavailable']}")
    return {r["id"]: r for r in data["results"]}


def _result(compiled: dict, launch: aot.Launch) -> dict:
    r = compiled[launch.id]
    if not r["ok"]:
        pytest.fail(f"{launch.id} does not compile for sm_{launch.arch}:\n{r['error']}")
    return r


def _ptx(compiled: dict, launch: aot.Launch) -> str:
    with open(_result(compiled, launch)["ptx"]) as f:
        return f.read()


# --------------------------------------------------------------------------- catalogue


def test_catalogue_covers_every_config_the_autotuner_may_pick():
    for arch, space in ((80, SM80_CONFIGS), (90, SM90_CONFIGS)):
        gemms = [x for x in aot.launches(arch) if "gemm" in x.tags]
        cfgs = {GemmConfig(x.args["BLOCK_M"], x.args["BLOCK_N"], x.args["BLOCK_K"],
                           x.args["GROUP_M"], x.options["num_warps"], x.options["num_stages"])
                for x in gemms}  # fmt: skip
        cap = (arch // 10, arch % 10)
        assert set(space) <= cfgs
        assert {default_config(cap, m, 4096, 4096) for m in aot.DEFAULT_CONFIG_M} <= cfgs
        sigs = {x.kernel.signature() for x in gemms}
        assert FAST_GEMM_EPILOGUES | FAST_TUNED_EPILOGUES | TUNED_EPILOGUES <= sigs
        assert len(sigs) == len(aot.gemm_epilogues()) == 20
    names = {x.name for x in aot.launches(90)}
    assert FAST_KERNELS <= names


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize("launch", _params())
def test_compiles(compiled, launch):
    _result(compiled, launch)


_MMA = {
    "s8": r"\.s32\.s8\.s8",
    "f16": r"\.f32\.f16\.f16",
    "bf16": r"\.f32\.bf16\.bf16",
}


@pytest.mark.parametrize(
    "launch", _params(lambda x: any(t.startswith("mma:") for t in x.tags))
)
def test_matrix_products_use_tensor_cores(compiled, launch):
    ptx = _ptx(compiled, launch)
    wgmma = launch.arch >= 90 and launch.args["BLOCK_M"] >= 64
    op = r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k\d+" if wgmma else r"mma\.sync\.aligned\.\S*"
    for tag in sorted(launch.tags):
        if tag.startswith("mma:"):
            FileCheck().check_regex(op + _MMA[tag[4:]]).run(ptx)
    if wgmma:  # the whole product on wgmma, none of it left on the older path
        FileCheck().check_not("mma.sync").run(ptx)


# Any PTX type suffix of a floating-point format: instructions (add.f32, cvt.rn.f32.s32,
# fma.rn.f16x2, ...) and register declarations (.reg .f32).
_FLOAT_TYPES = (".f16", ".bf16", ".f32", ".f64", ".tf32", ".e4m3", ".e5m2")


@pytest.mark.parametrize("launch", _params(lambda x: "integer_only" in x.tags))
def test_integer_only_kernels_have_no_float_instruction(compiled, launch):
    ptx = _ptx(compiled, launch)
    check = FileCheck()
    for t in _FLOAT_TYPES:
        check = check.check_not(t)
    check.run(ptx)


@pytest.mark.parametrize(
    "launch", _params(lambda x: "gemm" in x.tags and "integer_only" not in x.tags)
)
def test_float_epilogues_show_float_instructions(compiled, launch):
    """The check above is not vacuous: a float epilogue's conversion is there to see."""
    FileCheck().check_regex(r"cvt\.rn\.f32\.s(32|64)").run(_ptx(compiled, launch))


@pytest.mark.parametrize("launch", _params())
def test_shared_memory_fits_a_block(compiled, launch):
    shared = _result(compiled, launch)["shared"]
    assert shared <= aot.SHARED_MEMORY_LIMIT, f"{shared} bytes of shared memory"


def _known_spill(launch: aot.Launch) -> str | None:
    return next((why for pattern, why in KNOWN_SPILLS if re.search(pattern, launch.name)), None)


@pytest.mark.parametrize(
    "launch", _params(lambda x: "default" in x.tags, xfail=_known_spill)
)
def test_default_configs_do_not_spill(compiled, launch):
    r = _result(compiled, launch)
    assert r["spill_stores"] is not None, "no ptxas report was captured"
    assert (r["spill_stores"], r["spill_loads"]) == (0, 0), (
        f"{r['registers']} registers, {r['spill_stores']} bytes of spill stores, "
        f"{r['spill_loads']} bytes of spill loads"
    )


@pytest.mark.parametrize("launch", _params(lambda x: "tuned" in x.tags))
def test_tuned_configs_spill_at_most_1kb(compiled, launch):
    """The autotuner times every candidate, so a few hundred bytes spilled once per tile in
    a large epilogue only cost that candidate its place; kilobytes mean the main loop
    spills (sm_80 at 128 accumulators a thread spilled 15 KB), which no epilogue survives."""
    r = _result(compiled, launch)
    assert r["spill_stores"] is not None, "no ptxas report was captured"
    assert r["spill_stores"] <= TUNED_SPILL_LIMIT, (
        f"{r['registers']} registers, {r['spill_stores']} bytes of spill stores"
    )
