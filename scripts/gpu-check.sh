#!/usr/bin/env bash
# The GPU check in one command, for a session on a CUDA machine (an H100 / H200), within
# 8 minutes: finds a Python whose torch sees the GPU (installs only what is missing), runs
# every test that skips without CUDA, then the GPU benchmarks, and writes a summary with
# the device, driver, torch, triton and CUDA versions and each step's exit status.
#
# Usage: scripts/gpu-check.sh [--dry-run]
#   --dry-run   print the plan and run the test selection only (needs no GPU)
# Output: $OUT when set (a device machine returns what is written there, 8 files at most),
# else bench/results/gpu/: summary.json, gpu-check.log (every step's output),
# tests-cuda.xml (JUnit), and the benchmarks' gemm-*.json, hadamard-*.json, w4-*.json,
# e2e-*.json.
# Environment: PYTHON (the interpreter to use, as given), QCOMPILE_WHEELS (a folder of wheels to
# install missing packages from, offline), GPU_CHECK_BUDGET_S (whole run, default 465).
#
# Which tests: those that skip without CUDA, decided by their own skip conditions. They
# are collected once with the GPU hidden (CUDA_VISIBLE_DEVICES=""), keeping each test
# whose skipif condition holds there with a reason naming CUDA or a GPU, or that is
# marked `gpu`; the kept ones then run with the GPU visible.
#
# Each step has its own timeout and the run a deadline (later steps get what is left); a
# failing or timed-out step is recorded and the next one runs; the exit status is 1 if any
# step failed or was skipped for lack of time.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
dry_run=0
failed=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

out="${OUT:-$root/bench/results/gpu}"
mkdir -p "$out"
log="$out/gpu-check.log"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: >"$log"
: >"$work/steps.tsv"
start=$(date +%s)
deadline=$(( start + ${GPU_CHECK_BUDGET_S:-465} ))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR="$work/triton-cache"

say() { echo "$*" | tee -a "$log"; }

# step NAME SECONDS COMMAND...: run with a timeout (cut to the deadline), output to the
# log, one line of status on the console, a row in steps.tsv.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( deadline - $(date +%s) ))
    if (( left < 15 )); then
        say "=== $name: skipped, no time left"
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "no time left before the deadline" \
            >>"$work/steps.tsv"
        return 1
    fi
    (( limit > left )) && limit=$left
    local cmd="$*"
    (( ${#cmd} > 400 )) && cmd="${cmd:0:400} ... ($# arguments)"
    say "=== $name (timeout ${limit}s): $cmd"
    if (( dry_run )); then
        return 0
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 )) note=""
    (( rc == 124 || rc == 137 )) && note="timed out after ${limit}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$note" >>"$work/steps.tsv"
    say "--- $name: exit $rc in ${took}s${note:+ ($note)}"
    if (( rc != 0 )); then
        tail -n 15 "$log" | sed 's/^/    /'
    fi
    return "$rc"
}

# ---------------------------------------------------------------- Python with CUDA torch

cuda_python() {
    # $PYTHON is taken as given; otherwise the first whose torch sees a GPU.
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
        return 0
    fi
    local py
    for py in "$root/.venv/bin/python" python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
            >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

setup_env() {
    # A CUDA-capable torch is kept as it is (never reinstalled); without one, a venv like
    # scripts/env.sh's, with the default (CUDA) torch wheels.
    if ! PY="$(cuda_python)"; then
        [ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv" || return 1
        PY="$root/.venv/bin/python"
        "$PY" -m pip install -q torch || return 1
    fi
    echo "python: $PY"
    local pip_src=()
    [ -n "${QCOMPILE_WHEELS:-}" ] && pip_src=(--no-index --find-links "$QCOMPILE_WHEELS")
    local missing
    missing="$("$PY" - <<'EOF'
import importlib.util
need = {"triton": "triton", "sympy": "sympy", "numpy": "numpy", "pytest": "pytest",
        "xdist": "pytest-xdist", "hypothesis": "hypothesis", "transformers": "transformers",
        "safetensors": "safetensors"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)"
    if [ -n "$missing" ]; then
        echo "installing: $missing"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q "${pip_src[@]}" $missing || echo "could not install: $missing"
    fi
    # qcompile from this checkout (editable, no dependencies: they are the machine's own).
    if ! "$PY" -c "import qcompile, sys; sys.exit(0 if qcompile.__file__.startswith('$root/') else 1)" \
        >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e "$root" || return 1
    fi
    "$PY" -c "import qcompile.lowering.gemm, triton" || return 1
}

if (( dry_run )); then
    PY="$(cuda_python)" || PY="${PYTHON:-$root/.venv/bin/python}"
    say "dry run: python $PY, output $out, deadline ${GPU_CHECK_BUDGET_S:-465}s"
else
    export -f cuda_python setup_env
    export root
    step env 60 bash -c 'setup_env; rc=$?; echo "$PY" >"$0"; exit $rc' "$work/python" \
        || failed=1
    PY="$(cat "$work/python" 2>/dev/null || true)"
    if [ -z "$PY" ]; then
        PY="$(cuda_python || echo python3)"
    fi
fi

# ---------------------------------------------------------------- steps

cat >"$work/info.py" <<'EOF'
import json, subprocess, sys
import torch, triton
info = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
            cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
    info["nvidia_smi"] = smi
except Exception as e:
    info["nvidia_smi"] = f"unavailable: {e}"
git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
info["commit"] = git.stdout.strip() or "unknown"
info["python_path"] = sys.executable
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"))
EOF

# The selection plugin: with CUDA hidden, keep the tests skipped for a CUDA/GPU reason.
mkdir -p "$work/plugin"
cat >"$work/plugin/gpu_check_select.py" <<'EOF'
import os
import re

REASON = re.compile(r"\bcuda\b|\bgpu\b", re.IGNORECASE)


def _needs_cuda(item):
    if item.get_closest_marker("gpu"):
        return True
    for mark in item.iter_markers("skipif"):
        cond = mark.args[0] if mark.args else mark.kwargs.get("condition")
        if isinstance(cond, bool) and cond and REASON.search(str(mark.kwargs.get("reason", ""))):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    ids = [item.nodeid for item in items if _needs_cuda(item)]
    with open(os.environ["GPU_CHECK_IDS"], "w") as f:
        f.write("\n".join(ids) + ("\n" if ids else ""))
EOF

if (( ! dry_run )); then
    step info 30 "$PY" "$work/info.py" "$work/info.json" || failed=1
fi
# The selection runs in dry runs too: it needs no GPU.
dry_run_saved=$dry_run
dry_run=0
step select-cuda-tests 60 env CUDA_VISIBLE_DEVICES="" GPU_CHECK_IDS="$work/ids.txt" \
    PYTHONPATH="$work/plugin${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m pytest --collect-only -qq -p no:cacheprovider -p gpu_check_select tests \
    || failed=1
dry_run=$dry_run_saved
n_ids=$(grep -c . "$work/ids.txt" 2>/dev/null || echo 0)
say "selected $n_ids tests that skip without CUDA (listed in $log)"
sed 's/^/    /' "$work/ids.txt" >>"$log" 2>/dev/null
head -n 5 "$work/ids.txt" 2>/dev/null | sed 's/^/    /'
if (( n_ids == 0 )); then
    say "no CUDA tests selected: the selection is broken"
    failed=1
fi

xdist=()
"$PY" -c "import xdist" >/dev/null 2>&1 && xdist=(-n 4)
if (( n_ids > 0 )); then
    mapfile -t ids <"$work/ids.txt"
    step tests-cuda 150 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${xdist[@]}" \
        --junitxml "$out/tests-cuda.xml" "${ids[@]}" || failed=1
fi
# Autotuning compiles every candidate config once per M specialisation: M 128 and 4096
# share one set of kernels, so the second M costs only timings.
step bench-gemm 150 "$PY" bench/bench_gemm.py --m 128,4096 --cache "$work/autotune" \
    --out "$out" || failed=1
step bench-hadamard 40 "$PY" bench/bench_hadamard.py --out "$out" || failed=1
step bench-w4 60 "$PY" bench/bench_w4.py --out "$out" || failed=1
step bench-e2e 90 "$PY" bench/bench_e2e.py --device cuda --models llama-1b \
    --configs eager,qc-w8a8,qc-w8a8-static --rounds 2 --prompt 256 --new-tokens 8 \
    --out "$out" || failed=1

# ---------------------------------------------------------------- summary

if (( dry_run )); then
    say "dry run: nothing else was run"
    exit "$failed"
fi
"$PY" - "$work/steps.tsv" "$work/info.json" "$out/summary.json" "$(( $(date +%s) - start ))" \
    <<'EOF' | tee -a "$log"
import json, sys
steps_tsv, info_json, summary, total = sys.argv[1:5]
steps = []
for line in open(steps_tsv):
    name, rc, secs, note = (line.rstrip("\n").split("\t") + [""])[:4]
    steps.append(dict(step=name, exit=rc if rc == "skipped" else int(rc), seconds=int(secs),
                      note=note))
try:
    info = json.load(open(info_json))
except (OSError, ValueError):
    info = {"error": "the info step did not run"}
ok = all(s["exit"] == 0 for s in steps)
json.dump(dict(ok=ok, total_seconds=int(total), **info, steps=steps), open(summary, "w"),
          indent=1)
print(f"device {info.get('device')}, torch {info.get('torch')}, triton {info.get('triton')}, "
      f"CUDA {info.get('cuda')}, driver {info.get('nvidia_smi')}")
for s in steps:
    print(f"  {s['step']:<18} exit {s['exit']!s:<8} {s['seconds']:>4} s  {s['note']}")
print(f"{'all steps passed' if ok else 'SOME STEPS FAILED'} in {total} s; wrote {summary}")
EOF
(( PIPESTATUS[0] == 0 )) || {
    printf '{"ok": false, "error": "the summary could not be written by %s"}\n' "$PY" \
        >"$out/summary.json"
    failed=1
}
exit "$failed"
