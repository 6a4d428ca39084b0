#!/usr/bin/env bash
# The long graph-fuzzer run: random models from tests/fuzz/grammar.py under every recipe
# (or those named), checked by tests/fuzz/oracle.py. Sets up .venv by itself.
# Usage: scripts/fuzz.sh [EXAMPLES_PER_RECIPE] [RECIPE ...] [-- --seed N --threads N]
#   scripts/fuzz.sh 2000                  every recipe, 2000 examples each
#   scripts/fuzz.sh 500 w8a8 w4a4         two recipes
# A new failure is shrunk and printed as a Case(...) to paste into
# tests/fuzz/test_regressions.py; each recipe ends with a SUMMARY line (examples,
# failures by signature, refusals). Runs on one thread: one example takes ~0.7 s on CPU.
# Exit status 1 when any recipe failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh" test
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
examples="${1:-200}"
[ $# -gt 0 ] && shift
recipes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    recipes+=(--recipe "$1")
    shift
done
[ "${1:-}" = "--" ] && shift
exec python -m tests.fuzz.run --examples "$examples" "${recipes[@]}" "$@"
