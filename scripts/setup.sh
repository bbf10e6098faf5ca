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
# llama.cpp (the llamacpp extra) is built for this CPU, but without its AMX kernels: on an AMX CPU (Xeon Sapphire
# Rapids and later) a native build crashes at its first evaluation (SmolLM2 Q4_1 and Qwen Q4_K_M alike, 1 or 2
# threads; ggml-org/llama.cpp#20824, "segfault in ggml_backend_amx_mul_mat"); without them it runs on AVX-512.
if [ "$(uname -m)" = x86_64 ]; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
if [ "$PURPOSE" = full ] && ! .venv/bin/python -c \
        "import sys, llama_cpp; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())"; then
    # a wheel pip cached from an earlier build with the AMX kernels: drop it and build again, without them (the
    # new wheel is cached in its place)
    echo "setup: rebuilding llama-cpp-python without its AMX kernels (a few minutes)" >&2
    .venv/bin/python -m pip cache remove "llama_cpp_python*" >/dev/null 2>&1 || true
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} .venv/bin/python -m pip install --quiet \
        --force-reinstall --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
fi
