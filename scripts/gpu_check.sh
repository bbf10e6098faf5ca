#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and nothing prepared, set up what is missing, then run every
# executor this machine can run (ONNX Runtime CPU reference, cpu-planned, ONNX Runtime CUDA, TensorRT) against
# the CPU reference and time plain vs speculative decoding; one JSON file out (scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh [OUT.json]
#
# Environment:
#   SPECTRT_WHEELS=/dir   install from this folder of wheels only (a machine without registry access), e.g.
#                         onnxruntime_gpu-*.whl, tensorrt*.whl, onnx, tokenizers, llguidance, jsonschema...
#   SPECTRT_BUNDLE=/dir   check this bundle (default: build a tiny random one here; needs torch, transformers, onnx)
#   SPECTRT_REQUIRE=...   executors that must run and be exact, e.g. onnxruntime-cuda,tensorrt (exit 1 otherwise)
#   PYTHON                the interpreter (default python3); its site packages (torch, TensorRT from JetPack,
#                         onnxruntime-gpu) are visible inside the check's virtual environment
# Runs in under 10 minutes on a tiny bundle (the timeout below stops it at 9).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.json}
PY=${PYTHON:-python3}
VENV=${SPECTRT_GPU_VENV:-.gpu-venv}
WORK=${SPECTRT_GPU_WORK:-gpu_check_work}
start=$(date +%s)

[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
VPY="$VENV/bin/python"
pip_install() {  # from the wheel folder when given, else the registry; a failure is reported, not fatal
    if [ -n "${SPECTRT_WHEELS:-}" ]; then
        "$VPY" -m pip install --quiet --no-index --find-links "$SPECTRT_WHEELS" "$@"
    else
        "$VPY" -m pip install --quiet "$@"
    fi
}
have() { "$VPY" -c "$1" >/dev/null 2>&1; }

echo "== setup ($VENV)"
have "import numpy, tokenizers, click, jinja2, jsonschema, llguidance" || \
    pip_install numpy tokenizers click jinja2 jsonschema llguidance || echo "warning: runtime dependencies incomplete"
have "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" || \
    pip_install onnxruntime-gpu || echo "note: no onnxruntime-gpu: the ONNX Runtime CUDA executor will not run"
if ! have "import tensorrt" && ! have "import tensorrt_rtx"; then
    if [ -f /etc/nv_tegra_release ]; then
        echo "note: Jetson without TensorRT's Python module: sudo apt install python3-libnvinfer (JetPack)"
    else
        pip_install tensorrt || echo "note: no TensorRT: the TensorRT executor will not run"
    fi
fi
"$VPY" -m pip install --quiet --no-deps --no-build-isolation -e . || pip_install --no-deps -e .

BUNDLE_ARGS=(--tiny --work "$WORK")
if [ -n "${SPECTRT_BUNDLE:-}" ]; then
    BUNDLE_ARGS=(--bundle "$SPECTRT_BUNDLE")
fi
if [ -z "${SPECTRT_BUNDLE:-}" ] && ! have "import torch, transformers, onnx"; then
    echo "error: building the tiny bundle needs torch, transformers and onnx (or set SPECTRT_BUNDLE)"; exit 2
fi
if [ -z "${SPECTRT_BUNDLE:-}" ]; then
    rm -rf "$WORK"; mkdir -p "$WORK"
    echo "== build a tiny bundle"
    BUNDLE=$("$VPY" scripts/gpu_check.py --tiny --work "$WORK" --build-only | tail -1)
    if have "import tensorrt" || have "import tensorrt_rtx"; then
        echo "== compile TensorRT engines on this machine"
        "$VENV/bin/spectrt" compile "$BUNDLE" || echo "note: engine compile failed: the TensorRT executor will not run"
    fi
    BUNDLE_ARGS=(--bundle "$BUNDLE")
fi

echo "== check"
left=$(( 540 - ($(date +%s) - start) ))
status=0
timeout "$left" "$VPY" scripts/gpu_check.py "${BUNDLE_ARGS[@]}" --out "$OUT" --require "${SPECTRT_REQUIRE:-}" || status=$?
echo "== done in $(( $(date +%s) - start )) s (status $status): $OUT"
exit $status
