#!/usr/bin/env bash
# A stock Triton Inference Server (2.51, CPU) that serves spectrt model repositories, from the
# nvidia-pytriton==0.7.0 wheel on PyPI, without Docker.
#
#   bash scripts/triton_env.sh tritonserver --model-repository REPO [tritonserver options]
#                                   # starts the server (adds --backend-directory)
#   bash scripts/triton_env.sh CMD ...  # runs any command in the environment below
#   source scripts/triton_env.sh    # exports the environment into the current shell
#   bash scripts/triton_env.sh --print  # prints it as KEY=VALUE lines (tests/test_triton.py reads them)
#
# Once (cached in $SPECTRT_TRITON_VENV, default ~/.cache/spectrt/triton-venv) it makes a venv that
# holds nvidia-pytriton==0.7.0 (the server binary, Python backend and stubs; its Python layer is
# never used; it also brings tritonclient[grpc,http]) together with spectrt's runtime dependencies
# (numpy, tokenizers, jsonschema, jinja2, click, onnxruntime, as pyproject.toml lists them). The
# wheel pins numpy<2, and so must the stub's Python: the stub's pybind11 predates NumPy 2 and
# misreads NumPy 2 arrays (every byte of an input tensor comes out as its first byte). So the stub
# never runs in spectrt's .venv (NumPy 2).
#
# The stub's Python (TRITON_STUB_ENV) is a small venv per checkout, $SPECTRT_TRITON_VENV/checkouts/<id>:
# its site-packages holds this checkout's packages laid out as pyproject.toml's package-dir maps
# them (symlinks, so edits are live: spectrt/, spectrt/runtime -> runtime/, ...) and a .pth line
# that appends the shared venv's site-packages. The stub runs Python isolated (PYTHONPATH and
# other PYTHON* variables are ignored) and finds its interpreter by looking `python3` up on PATH,
# then reads that venv's pyvenv.cfg: so PATH chooses the environment. Two ways, same result:
#  - PATH starts with TRITON_STUB_ENV/bin (what this script exports), for every model of the server;
#  - `spectrt triton-repo --python-env DIR` writes Triton's EXECUTION_ENV_PATH parameter: the backend
#    sources DIR/bin/activate (which puts DIR/bin first on PATH) before it starts that model's stub.
# Also exported: TRITONSERVER, TRITON_BACKENDS (a backend directory: the wheel's Python backend plus
# the stub built for the venv's Python version), TRITON_PYTHON (the shared venv's python, which has
# tritonclient), LD_LIBRARY_PATH (the wheel's libraries and the venv's libpython: the stub links
# libpython3.X.so.1.0; without that folder the system's copy of the same version is used).
# SPECTRT_PYTHON (default: python3 on PATH, >= 3.11) is the interpreter the venvs are made from;
# the wheel's stub for its version (3.8 ... 3.13) is used.

_spectrt_triton_env() {
    local here repo py venv pyver site backends stub marker deps stubenv libdir
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    repo="$(dirname "$here")"
    py="${SPECTRT_PYTHON:-$(command -v python3)}"
    venv="${SPECTRT_TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/spectrt/triton-venv}"
    # spectrt's runtime dependencies, as pyproject.toml lists them (core + the onnxruntime extra)
    deps="$("$py" -c '
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(" ".join(project["dependencies"] + project["optional-dependencies"]["onnxruntime"]))
' "$repo/pyproject.toml")" || { echo "triton_env: cannot read $repo/pyproject.toml with $py (needs Python >= 3.11)" >&2; return 1; }
    marker="$venv/.spectrt-ready"
    if [ "$(cat "$marker" 2>/dev/null)" != "nvidia-pytriton==0.7.0 $deps" ]; then
        mkdir -p "$(dirname "$venv")"
        (
            flock 9
            if [ "$(cat "$marker" 2>/dev/null)" != "nvidia-pytriton==0.7.0 $deps" ]; then
                echo "triton_env: installing nvidia-pytriton==0.7.0 and spectrt's runtime dependencies into $venv" >&2
                if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
                    echo "triton_env: $venv exists and is not a venv; not touching it" >&2
                    exit 1
                fi
                [ -f "$venv/pyvenv.cfg" ] || "$py" -m venv "$venv" >&2 || exit 1
                # one resolution: pytriton's numpy<2 pin holds for onnxruntime & co. too
                # shellcheck disable=SC2086
                "$venv/bin/python" -m pip install -q --disable-pip-version-check "nvidia-pytriton==0.7.0" $deps >&2 \
                    || exit 1
                echo "nvidia-pytriton==0.7.0 $deps" >"$marker"
            fi
        ) 9>"$venv.lock" || { echo "triton_env: installing into $venv failed" >&2; return 1; }
    fi
    pyver="$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" || return 1
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    stub="$site/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub"
    if [ ! -x "$stub" ]; then
        echo "triton_env: the wheel has no Python backend stub for Python $pyver ($stub)" >&2
        return 1
    fi
    backends="$venv/backends-$pyver"
    if [ ! -x "$backends/python/triton_python_backend_stub" ]; then
        rm -rf "$backends.tmp.$$" && mkdir -p "$backends.tmp.$$/python" || return 1
        cp "$site"/pytriton/tritonserver/backends/python/{libtriton_python.so,triton_python_backend_utils.py} \
            "$stub" "$backends.tmp.$$/python/" || return 1
        rm -rf "$backends" && mv "$backends.tmp.$$" "$backends" || return 1
    fi
    stubenv="$venv/checkouts/$(printf '%s' "$repo" | sha1sum | cut -c1-12)"
    if [ ! -f "$stubenv/bin/activate" ]; then
        "$venv/bin/python" -m venv --without-pip "$stubenv" >&2 || return 1
    fi
    "$stubenv/bin/python" -c '
import os, shutil, sys, sysconfig, tomllib
repo, shared = sys.argv[1], sys.argv[2]
out = sysconfig.get_paths()["purelib"]
with open(os.path.join(out, "spectrt-triton-shared.pth"), "w") as pth:
    pth.write(shared + "\n")
package_dir = tomllib.load(open(os.path.join(repo, "pyproject.toml"), "rb"))["tool"]["setuptools"]["package-dir"]
tmp = os.path.join(out, f".spectrt-links.{os.getpid()}")
shutil.rmtree(tmp, ignore_errors=True)
for package in sorted(package_dir, key=lambda p: p.count(".")):
    target = os.path.join(tmp, *package.split("."))
    source = os.path.join(repo, package_dir[package])
    if "." in package:  # a subpackage kept elsewhere in the checkout: one link to its folder
        os.symlink(source, target)
    else:  # a top-level package: a real folder of links, so that mapped subpackages sit beside them
        os.makedirs(target)
        for entry in os.listdir(source):
            if entry != "__pycache__" and f"{package}.{entry}" not in package_dir:
                os.symlink(os.path.join(source, entry), os.path.join(target, entry))
for top in os.listdir(tmp):
    shutil.rmtree(os.path.join(out, top), ignore_errors=True)
    os.rename(os.path.join(tmp, top), os.path.join(out, top))
os.rmdir(tmp)
' "$repo" "$site" || return 1
    libdir="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
    export TRITON_VENV="$venv"
    export TRITON_STUB_ENV="$stubenv"
    export TRITON_PYTHON="$venv/bin/python"
    export TRITONSERVER="$site/pytriton/tritonserver/bin/tritonserver"
    export TRITON_BACKENDS="$backends"
    export LD_LIBRARY_PATH="$site/nvidia_pytriton.libs${libdir:+:$libdir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PATH="$stubenv/bin:$venv/bin:$PATH"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced
    _spectrt_triton_env
    return $?
fi
set -euo pipefail
_spectrt_triton_env
case "${1:-}" in
    --print)
        for key in TRITON_VENV TRITON_STUB_ENV TRITON_PYTHON TRITONSERVER TRITON_BACKENDS LD_LIBRARY_PATH PATH; do
            printf '%s=%s\n' "$key" "${!key}"
        done ;;
    tritonserver)
        shift
        exec "$TRITONSERVER" --backend-directory "$TRITON_BACKENDS" "$@" ;;
    "")
        echo "usage: bash scripts/triton_env.sh tritonserver --model-repository REPO [options] | --print | CMD ..." >&2
        exit 2 ;;
    *)
        exec "$@" ;;
esac
