#!/usr/bin/env bash
# Create .venv with spectrt and what a purpose needs, on a CPU machine:
#   bash scripts/setup.sh demo   build + run bundles (what `spectrt demo` uses): build, onnxruntime
#   bash scripts/setup.sh full   (default) also TensorRT-RTX, the server, the test tools and the llama.cpp peer
# torch is pinned to the CPU wheel (torch==2.13.0) in the `build` extra. Re-running only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PURPOSE=${1:-full}
case "$PURPOSE" in
    demo) EXTRAS="build,onnxruntime" ;;
    # llamacpp (the benchmark's llama.cpp peer, tests/test_bench_llamacpp.py) compiles llama.cpp from source:
    # several minutes on 2 cores, once (pip caches the built wheel); a native CPU build, as llama.cpp users run it.
    full) EXTRAS="build,onnxruntime,tensorrt-rtx,serve,dev,llamacpp" ;;
    *) echo "usage: bash scripts/setup.sh [demo|full]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
