#!/usr/bin/env bash
# Create .venv with spectrt and everything it needs to build, run and test on a CPU machine.
# torch is pinned to the CPU wheel (torch==2.13.0) in the `build` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# llamacpp (the benchmark's llama.cpp peer) compiles llama.cpp from source: several minutes on 2 cores, once
# (pip caches the built wheel); a native CPU build, as llama.cpp users run it.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    .venv/bin/python -m pip install --quiet -e ".[build,onnxruntime,tensorrt-rtx,serve,dev,llamacpp]"
