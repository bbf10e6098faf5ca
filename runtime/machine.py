"""What machine this is: CPU model and the ISA features that decide which kernels a library picks.

Two runs on different CPUs (AVX-512 with VNNI, AVX2 only, ARM) take different numeric paths and run at
different speeds, so results and cached measurements carry these facts."""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

# the x86 features (Linux /proc/cpuinfo flag names) that select onnxruntime / MLAS kernels, and ARM's
ISA_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2",
                "i8mm", "bf16")


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(CPU model name, flag set) from /proc/cpuinfo; (None, set()) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@lru_cache(maxsize=1)
def machine_facts() -> dict[str, Any]:
    """CPU model, ISA features present, core count, OS and Python: the facts a measurement depends on."""
    model, flags = _cpuinfo()
    if model is None and sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
    facts: dict[str, Any] = {
        "cpu": model or platform.processor() or "unknown",
        "arch": platform.machine(),
        "isa": sorted(f for f in ISA_FEATURES if f in flags),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        facts["onnxruntime"] = None
    return facts


def _sysctl(name: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cache_root() -> Path:
    """spectrt's cache folder: ``$SPECTRT_CACHE``, else ``$XDG_CACHE_HOME/spectrt``, else ``~/.cache/spectrt``."""
    if os.environ.get("SPECTRT_CACHE"):
        return Path(os.environ["SPECTRT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spectrt"
    return Path.home() / ".cache" / "spectrt"
