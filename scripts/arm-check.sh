#!/usr/bin/env bash
# The ARM (AArch64) check on an x86-64 Debian / Ubuntu machine: qcompile's NEON int8 GEMM
# kernels (lowering/kernels/gemm_neon.py), the ARM route selection and the CPU ops on those
# routes, run by torch's aarch64 wheel under qemu-user, once per emulated CPU:
#   neoverse-n1  Armv8.2 with dot product (asimddp)  -> routes neon-sdot and neon
#   max,sve=off  + int8 matrix multiply (i8mm)        -> routes neon-i8mm, neon-sdot, neon
#                (SVE off: Debian 12's cross GCC crashes on torch's SVE vector headers)
# (the base route, plain Armv8 NEON, is available on both and tested there; an Armv8.0
# CPU such as cortex-a72 cannot be emulated: torch's aarch64 wheel itself faults there)
# Exactness and selection only: emulated timings say nothing about ARM hardware (the
# routes' speed is measured per layer on the machine that runs them, lowering/latency.py).
#
# Usage: sudo bash scripts/arm-check.sh [pytest args]    (about 30 minutes on 2 cores)
# ARM_CPUS: the emulated CPUs, as "qemu-cpu:gcc-march ..." (default: the two below)
# Needs root (apt-get, binfmt_misc) and the package registries (Debian's and PyPI).
# Output: bench/results/arm-check-qemu.json (versions, each CPU's pytest summary); each
# CPU's pytest output in $QCOMPILE_ARM_ENV/pytest-<cpu>.log. The emulated environment
# stays in $QCOMPILE_ARM_ENV (default ~/.cache/qcompile-arm) for the next run.
#
# How: an arm64 Python 3.11 from Debian's arm64 packages, unpacked into a sysroot; torch's
# aarch64 wheel (its CUDA libraries, which an import needs but a CPU run never calls,
# replaced by stubs); torch's Inductor compiling with the host's aarch64 cross compiler,
# which the emulated process runs natively; /proc/cpuinfo for torch's cpuinfo library
# from the sysroot (qemu reads the guest's files there first). qcompile reads the CPU's
# features from the kernel's hwcaps, which qemu sets from the emulated CPU.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
env_dir="${QCOMPILE_ARM_ENV:-$HOME/.cache/qcompile-arm}"
sys="$env_dir/root"
out="$root/bench/results"
host_py="$root/.venv/bin/python"
[ -x "$host_py" ] || host_py=python3
torch_version=$("$host_py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null \
    || echo 2.13.0)
mkdir -p "$env_dir" "$out"
if [ "$(id -u)" != 0 ]; then
    echo "arm-check: needs root (apt-get, binfmt_misc registration)" >&2
    exit 2
fi

step() { echo "== $*" >&2; }

step "host packages: qemu-user-static, the aarch64 cross compiler"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    apt-get install -y -q qemu-user-static g++-aarch64-linux-gnu >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -q >/dev/null
fi

step "arm64 Python 3.11 sysroot"
if [ ! -x "$sys/usr/bin/python3.11" ]; then
    mkdir -p "$env_dir/debs"
    (cd "$env_dir/debs" && for p in python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
            python3.11 libpython3.11 libpython3.11-dev libc6 libexpat1 zlib1g libssl3 libffi8 \
            libbz2-1.0 liblzma5 libsqlite3-0 libstdc++6 libgcc-s1 libgomp1 libncursesw6 \
            libtinfo6 libreadline8 libuuid1 libnsl2 libtirpc3 libdb5.3 libgdbm6 libcrypt1 \
            libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 \
            libzstd1; do
        apt-get download -q "$p:arm64" >/dev/null
    done)
    for deb in "$env_dir"/debs/*.deb; do dpkg -x "$deb" "$sys"; done
fi
# torch's cpuinfo library reads these (the host's describe an x86 CPU)
mkdir -p "$sys/proc" "$sys/sys/devices/system/cpu"
printf '0-1\n' > "$sys/sys/devices/system/cpu/possible"
printf '0-1\n' > "$sys/sys/devices/system/cpu/present"
for i in 0 1; do
    printf 'processor\t: %s\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 0\n\n' "$i"
done > "$sys/proc/cpuinfo"

step "torch $torch_version (aarch64 wheel) and the test dependencies"
pip_aarch64=("$host_py" -m pip install -q --no-compile --only-binary=:all: --python-version 3.11
             --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
             --platform manylinux_2_17_aarch64)
if [ ! -d "$env_dir/site/torch" ]; then
    "$host_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_aarch64 -d "$env_dir/wheels" "torch==$torch_version"
    mkdir -p "$env_dir/site"
    (cd "$env_dir/site" && "$host_py" -m zipfile -e "$env_dir"/wheels/torch-*aarch64.whl .)
fi
if [ ! -d "$env_dir/deps/triton" ]; then  # the Triton interpreter's implementations, too
    triton=$(grep -h -m1 "^Requires-Dist: triton==" "$env_dir"/site/torch-*.dist-info/METADATA \
             | sed 's/Requires-Dist: //; s/;.*//; s/ //g')
    "${pip_aarch64[@]}" --target "$env_dir/deps" numpy sympy typing_extensions filelock jinja2 \
        networkx fsspec setuptools pytest hypothesis "${triton:-triton}"
fi

step "stubs for the CUDA libraries torch's aarch64 wheel links"
mkdir -p "$env_dir/stubs"
"$host_py" - "$env_dir" <<'PY'
import collections, glob, os, subprocess, sys
env = sys.argv[1]
lib = f"{env}/site/torch/lib"
mine = glob.glob(f"{lib}/*.so*") + glob.glob(f"{env}/site/torch/_C*.so")
system = glob.glob(f"{env}/root/lib/aarch64-linux-gnu/*.so*") + \
    glob.glob(f"{env}/root/usr/lib/aarch64-linux-gnu/*.so*")

def nm(f, flag):
    out = subprocess.run(["aarch64-linux-gnu-nm", "-D", flag, f], capture_output=True,
                         text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.split()]

defined = {s.split("@")[0] for f in mine + system if os.path.isfile(f)
           for s in nm(f, "--defined-only")}
need = collections.defaultdict(set)  # version -> undefined names
for f in mine:
    for s in nm(f, "--undefined-only"):
        name, _, ver = s.partition("@")
        if name not in defined and not name.startswith(("__gmon_start__", "_ITM_")):
            need[ver.lstrip("@")].add(name)
missing = set()
for f in mine:
    out = subprocess.run(["aarch64-linux-gnu-readelf", "-d", f], capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        if "(NEEDED)" in line:
            so = line.split("[")[1].rstrip("]")
            if not any(os.path.exists(f"{d}/{so}") for d in (
                    lib, f"{env}/root/lib/aarch64-linux-gnu", f"{env}/root/usr/lib/aarch64-linux-gnu")):
                missing.add(so)
plain = need.pop("", set())
for so in sorted(missing):
    versions = {v: names for v, names in need.items()
                if v == so or (so.startswith("libnvshmem") and v == "NVSHMEM")}
    names = plain.union(*versions.values())
    src = f"{env}/stubs/{so}.c"
    with open(src, "w") as f:  # an error code (100) from anything a CPU run might call
        f.writelines(f"long {n}(void) {{ return 100; }}\n" for n in sorted(names))
    cmd = ["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-o", f"{env}/stubs/{so}", src,
           f"-Wl,-soname,{so}"]
    if versions:
        with open(f"{src}.map", "w") as f:
            f.writelines(f"{v} {{ global: {'; '.join(sorted(n))}; }};\n"
                         for v, n in versions.items())
        cmd.append(f"-Wl,--version-script={src}.map")
    subprocess.run(cmd, check=True)
PY

step "the compiler Inductor calls: the host's aarch64 cross compiler"
mkdir -p "$env_dir/bin" "$env_dir/pyinc/aarch64-linux-gnu"
ln -sfn "$sys/usr/include/aarch64-linux-gnu/python3.11" "$env_dir/pyinc/aarch64-linux-gnu/python3.11"
cat > "$env_dir/bin/g++" <<EOF
#!/bin/bash
# -march=native names the emulated CPU's architecture; link against the stubs
args=(); link=()
for a in "\$@"; do
  case "\$a" in
    -march=native|-mcpu=native) args+=("-march=\${ARM_MARCH:-armv8-a}");;
    -shared) args+=("\$a"); link=(-Wl,-rpath-link=$env_dir/stubs:$env_dir/site/torch/lib -Wl,--allow-shlib-undefined);;
    *) args+=("\$a");;
  esac
done
exec aarch64-linux-gnu-g++ -I$env_dir/pyinc -I$sys/usr/include/python3.11 "\${args[@]}" "\${link[@]}"
EOF
chmod +x "$env_dir/bin/g++"

step "qcompile from this working tree, its backend entry point"
mkdir -p "$env_dir/qc/qcompile-0.0.dist-info"
printf 'Metadata-Version: 2.1\nName: qcompile\nVersion: 0.0\n' \
    > "$env_dir/qc/qcompile-0.0.dist-info/METADATA"
printf '[torch_dynamo_backends]\nqcompile = qcompile.backend:qcompile_backend\n' \
    > "$env_dir/qc/qcompile-0.0.dist-info/entry_points.txt"
cat > "$env_dir/qc/sitecustomize.py" <<EOF
# pyproject.toml's package-dir: qcompile.passes and qcompile.lowering are top-level folders
import importlib.abc, importlib.util, sys
_MAP = {"qcompile": "$root/qcompile", "qcompile.passes": "$root/passes",
        "qcompile.lowering": "$root/lowering"}
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in _MAP:
            return importlib.util.spec_from_file_location(
                name, _MAP[name] + "/__init__.py", submodule_search_locations=[_MAP[name]])
        return None
sys.meta_path.insert(0, _Finder())
EOF

step "binfmt_misc: aarch64 executables run under qemu (Inductor's workers, latency timing)"
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || \
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

arm_py() {
    LD_LIBRARY_PATH="$env_dir/stubs" CXX="$env_dir/bin/g++" QEMU_LD_PREFIX="$sys" \
        PYTHONPATH="$env_dir/site:$env_dir/deps:$env_dir/qc" TORCHINDUCTOR_CACHE_DIR="$env_dir/inductor-$QEMU_CPU" \
        "$sys/usr/bin/python3.11" "$@"
}

tests=(tests/lowering/test_gemm_neon.py tests/lowering/test_cpu_routes.py)
full=(tests/lowering/test_cpu_gemm.py tests/lowering/test_inline.py tests/lowering/test_registry.py)
status=0
for cpu in ${ARM_CPUS:-neoverse-n1:armv8.2-a+dotprod max,sve=off:armv8.6-a+dotprod+i8mm}; do
    export QEMU_CPU="${cpu%%:*}" ARM_MARCH="${cpu#*:}"
    sel=("${tests[@]}")
    [ "${QEMU_CPU%%,*}" = max ] && sel+=("${full[@]}")  # the ops on every route: once
    step "pytest on $QEMU_CPU: ${sel[*]}"
    log="$env_dir/pytest-$QEMU_CPU.log"
    caps=$(arm_py -c "from qcompile.lowering import cpu_routes as c; print(c.cpu_capabilities().describe())" 2>/dev/null | tail -1)
    set +e
    arm_py -m pytest -q -p no:cacheprovider -m "not slow" "${sel[@]}" "$@" 2>&1 \
        | grep -v "MIDR_EL1\|No CUDA runtime" > "$log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" = 0 ] || status=1
    tail -1 "$log" >&2
    # one entry per emulated CPU in the results file; a rerun replaces its CPU's entry
    "$host_py" - "$out/arm-check-qemu.json" "$QEMU_CPU" "$caps" "$rc" "${sel[*]}" \
        "$(tail -1 "$log")" "$torch_version" <<'PY'
import json, platform, subprocess, sys, time
path, cpu, caps, rc, tests, summary, torch_version = sys.argv[1:]
try:
    with open(path) as f:
        data = json.load(f)
except (OSError, ValueError):
    data = {}
data["what"] = ("scripts/arm-check.sh: the NEON GEMM routes and the CPU ops on them under "
                "qemu-user: exactness and selection, not speed")
data.setdefault("runs", {})[cpu] = {
    "date": time.strftime("%Y-%m-%d"), "capabilities": caps, "exit": int(rc),
    "tests": tests, "summary": summary, "torch": f"{torch_version} (aarch64 wheel)",
    "qemu": subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True,
                           text=True).stdout.splitlines()[0],
    "host": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.machine()),
}
with open(path, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
PY
done
cat "$out/arm-check-qemu.json"
exit $status
