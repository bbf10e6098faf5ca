"""The few CUDA runtime calls the GPU executors need, through ctypes over the system's libcudart.

Why not a Python CUDA package: cuda-bindings 13 needs a driver >= 580 (not JetPack 6) and drops
Python 3.10 (JetPack 6's), CuPy is ~90 MB per wheel, polygraphy.cuda has no pinned host memory.
libcudart comes with every CUDA install (JetPack's own, /usr/local/cuda, or the nvidia-cuda-runtime
wheels that onnxruntime-gpu and torch pull in), and the calls used here exist unchanged in CUDA 11-13.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

from spectrt.runtime.errors import BackendUnavailableError

MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
MEMCPY_DEVICE_TO_DEVICE = 3
_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


def _candidates() -> list[str]:
    """Library names and paths to try, most specific first: SPECTRT_CUDART, CUDA_HOME / the usual install folders,
    the nvidia wheels in site-packages, then the loader's own search."""
    paths = []
    if os.environ.get("SPECTRT_CUDART"):
        paths.append(os.environ["SPECTRT_CUDART"])
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/aarch64-linux/lib", "targets/x86_64-linux/lib"):
            paths.extend(sorted(glob.glob(str(Path(root, sub, "libcudart.so*"))), reverse=True))
    for site in sys.path:
        paths.extend(sorted(glob.glob(str(Path(site, "nvidia", "*", "lib", "libcudart.so*"))), reverse=True))
        paths.extend(sorted(glob.glob(str(Path(site, "nvidia", "cuda_runtime", "lib", "libcudart.so*"))), reverse=True))
    return [*paths, *_NAMES]


class CudaError(RuntimeError):
    pass


class CudaRuntime:
    """A loaded libcudart: memory, copies and streams. Every call raises CudaError with CUDA's message on failure."""

    def __init__(self, library: str | None = None):
        errors = []
        self.lib = None
        for candidate in ([library] if library else _candidates()):
            try:
                self.lib = ctypes.CDLL(candidate)
                self.path = candidate
                break
            except OSError as exc:
                errors.append(f"{candidate}: {exc}")
        if self.lib is None:
            raise BackendUnavailableError(
                "the CUDA runtime library (libcudart) was not found; install the CUDA toolkit or JetPack, or set "
                "SPECTRT_CUDART to the path of libcudart.so. Tried: " + "; ".join(errors[-3:]))
        lib = self.lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        for name in ("cudaMalloc", "cudaMallocHost"):
            getattr(lib, name).argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaMemGetInfo.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        lib.cudaGetDeviceCount.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cudaSetDevice.argtypes = [ctypes.c_int]

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self.lib.cudaGetErrorString(status).decode(errors="replace")
            raise CudaError(f"{what} failed: CUDA error {status} ({message})")

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        status = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        return count.value if status == 0 else 0

    def set_device(self, device: int) -> None:
        self._check(self.lib.cudaSetDevice(device), f"cudaSetDevice({device})")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(pointer), max(nbytes, 1)), f"cudaMalloc({nbytes})")
        return pointer.value

    def malloc_host(self, nbytes: int) -> int:
        """Pinned (page-locked) host memory: asynchronous device-to-host copies need it."""
        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaMallocHost(ctypes.byref(pointer), max(nbytes, 1)), f"cudaMallocHost({nbytes})")
        return pointer.value

    def free(self, pointer: int) -> None:
        self._check(self.lib.cudaFree(pointer), "cudaFree")

    def free_host(self, pointer: int) -> None:
        self._check(self.lib.cudaFreeHost(pointer), "cudaFreeHost")

    def memcpy(self, destination: int, source: int, nbytes: int, kind: int) -> None:
        self._check(self.lib.cudaMemcpy(destination, source, nbytes, kind), "cudaMemcpy")

    def memcpy_async(self, destination: int, source: int, nbytes: int, kind: int, stream: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(destination, source, nbytes, kind, stream), "cudaMemcpyAsync")

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value

    def stream_synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        self._check(self.lib.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def synchronize(self) -> None:
        """Wait for all work on the device (copies on the legacy default stream do not order other streams)."""
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value


_RUNTIME: CudaRuntime | None = None


def cuda_runtime() -> CudaRuntime:
    """The process's CudaRuntime (loaded once); BackendUnavailableError without libcudart or without a GPU."""
    global _RUNTIME
    if _RUNTIME is None:
        runtime = CudaRuntime()
        if runtime.device_count() == 0:
            raise BackendUnavailableError(f"no CUDA GPU is visible (libcudart {runtime.path} loaded, but "
                                          f"cudaGetDeviceCount found none); use the CPU backend.")
        _RUNTIME = runtime
    return _RUNTIME
