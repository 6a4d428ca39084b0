#!/usr/bin/env bash
# The demo: quantizes all-MiniLM-L6-v2 with the integer-only recipe and reports accuracy,
# speed and where the debug files are. Sets up .venv by itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh" demo
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m qcompile.demo "$@"
