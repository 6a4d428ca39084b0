#!/usr/bin/env bash
# The test suite: sets up .venv by itself, then runs pytest on 2 workers.
# Triton kernels run in the interpreter here (no GPU); on a CUDA machine they compile.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh" test
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# worksteal: a worker that runs out takes queued tests from the other (with plain load
# scheduling one worker sat idle for minutes behind the other's last long model tests)
exec python -m pytest -n 2 --dist worksteal -q "$@"
