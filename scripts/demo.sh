#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then fetch the default Qwen2.5-Coder pair, build its
# bundle (engines/qwen-coder-cpu-gguf: the GGUF files' own blocks) if needed and generate with and without
# speculation. Pass --int4 for the faster re-quantized recipe, --small for the one-minute SmolLM2 version.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/spectrt demo "$@"
