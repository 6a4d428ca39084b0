#!/usr/bin/env bash
# Creates .venv in the repo (once) and installs what qcompile needs into it:
# torch==2.13.0 where no torch is present (the local CPU build; a bare `torch` would
# pull the CUDA wheels), triton, and the package in editable mode with the extras given.
# Idempotent: a stamp keyed on pyproject.toml and the extras skips the work next time.
# Usage: source scripts/env.sh [extras]     e.g. `source scripts/env.sh test`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.qcompile-$(cat "$root/pyproject.toml" | sha1sum | cut -c1-12)-$extras"
if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! python -c "import torch" >/dev/null 2>&1; then
        python -m pip install -q "torch==2.13.0"
    fi
    python -m pip install -q triton
    python -m pip install -q -e "$root[$extras]"
    touch "$stamp"
fi
set +euo pipefail
