#!/usr/bin/env bash
# The test suite: sets up .venv by itself, then runs pytest on 2 workers.
# Triton kernels run in the interpreter here (no GPU); on a CUDA machine they compile.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh" test
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -n 2 -q "$@"
