#!/usr/bin/env bash
# Creates .venv in the repo (once) and installs what qcompile needs into it:
# torch==2.13.0 where no torch is present (the local CPU build; a bare `torch` would
# pull the CUDA wheels), triton, and the package in editable mode with the extras given.
# Idempotent: a stamp keyed on pyproject.toml and the extras skips the work next time.
# Quiet: one line says what it installs and one that it is done; pip's own output goes to
# .venv/pip-install.log, and only when an install fails is its tail printed (and the
# sourcing script stopped: `source` returns 1). The caller's shell options are left as
# they were.
# Usage: source scripts/env.sh [extras]     e.g. `source scripts/env.sh test`

_qcompile_pip() {
    # pip with its output in the log; on failure the log's tail goes to stderr
    echo "+ pip $*" >>"$_qcompile_log"
    if ! PIP_PROGRESS_BAR=off python -m pip "$@" >>"$_qcompile_log" 2>&1; then
        echo "qcompile: 'pip $*' failed; the last lines of $_qcompile_log:" >&2
        tail -n 40 "$_qcompile_log" >&2
        return 1
    fi
}

_qcompile_env() {
    local root extras venv stamp what
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    extras="${1:-test}"
    venv="$root/.venv"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" || return 1
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate" || return 1
    stamp="$venv/.qcompile-$(sha1sum <"$root/pyproject.toml" | cut -c1-12)-$extras"
    if [ -f "$stamp" ]; then
        return 0
    fi
    _qcompile_log="$venv/pip-install.log"
    : >"$_qcompile_log"
    what="triton and qcompile[$extras] (editable)"
    if ! python -c "import torch" >/dev/null 2>&1; then
        what="torch 2.13.0, $what"
    fi
    echo "qcompile: installing $what into .venv (pip's output: .venv/pip-install.log)" >&2
    # a newer pip is welcome, not required: its failure is only logged
    PIP_PROGRESS_BAR=off python -m pip install --upgrade pip >>"$_qcompile_log" 2>&1 ||
        echo "(upgrading pip failed; going on with the pip there is)" >>"$_qcompile_log"
    if ! python -c "import torch" >/dev/null 2>&1; then
        _qcompile_pip install "torch==2.13.0" || return 1
    fi
    _qcompile_pip install triton || return 1
    _qcompile_pip install -e "$root[$extras]" || return 1
    touch "$stamp"
    echo "qcompile: .venv is ready" >&2
}

if _qcompile_env "$@"; then
    unset -f _qcompile_env _qcompile_pip
    unset _qcompile_log
else
    unset -f _qcompile_env _qcompile_pip
    unset _qcompile_log
    return 1 2>/dev/null || exit 1
fi
