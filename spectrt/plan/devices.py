"""Devices a plan is checked against: Jetson modules (unified memory) or a plain budget."""

from __future__ import annotations

from dataclasses import dataclass

from spectrt.runtime.errors import ConfigError

from .calibration import GiB, MiB


# -- devices --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A machine whose memory is shared by the CPU and the GPU (Jetson), or a plain budget (`--memory-gb`)."""

    name: str
    description: str
    memory: int  # bytes of RAM on the module
    reserved: int  # bytes the process cannot have: firmware/GPU carve-outs and the OS
    why: str

    @property
    def usable(self) -> int:
        return self.memory - self.reserved


# What the kernel sees (tegrastats' "RAM used/total") is the module's RAM minus carve-outs for firmware, the GPU and
# the video/camera engines; on top of that a headless JetPack (Ubuntu 22.04/24.04: systemd, networking, nvargus,
# docker) keeps about 1 GiB resident. A desktop session takes about 1 GiB more: pass --memory-gb then.
OS_RESIDENT = 1 * GiB
DEVICES = {
    "orin-nano-8gb": Device("orin-nano-8gb", "Jetson Orin Nano 8 GB", 8 * GiB, 8 * GiB - 7620 * MiB + OS_RESIDENT,
                            "about 7620 MB visible, as tegrastats commonly reports on JetPack 6; headless OS 1 GiB"),
    "orin-nx-16gb": Device("orin-nx-16gb", "Jetson Orin NX 16 GB", 16 * GiB, 16 * GiB - 15400 * MiB + OS_RESIDENT,
                           "about 15.0 GiB visible (assumed: the Orin Nano's carve-outs plus CMA); headless OS 1 GiB"),
    "agx-orin-64gb": Device("agx-orin-64gb", "Jetson AGX Orin 64 GB", 64 * GiB, 64 * GiB - 62841 * MiB + OS_RESIDENT,
                            "62841 MB visible (a tegrastats line in a public issue); headless OS 1 GiB"),
    "agx-thor-128gb": Device("agx-thor-128gb", "Jetson AGX Thor 128 GB", 128 * GiB, 128 * GiB - 125 * GiB + OS_RESIDENT,
                             "about 125 GiB visible (assumed: carve-outs as on AGX Orin); headless OS 1 GiB"),
}


def device_named(name: str | None, memory_gb: float | None) -> Device | None:
    """The device to check against: a known name, or `memory_gb` GiB the process may use (nothing reserved)."""
    if name is not None and memory_gb is not None:
        raise ConfigError("pass --device or --memory-gb, not both.")
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ConfigError(f"--memory-gb must be positive (got {memory_gb}).")
        return Device("custom", f"{memory_gb:g} GiB", int(memory_gb * GiB), 0, "--memory-gb: all of it usable")
    if name is None:
        return None
    if name not in DEVICES:
        raise ConfigError(f"device '{name}' unknown; known devices: {', '.join(DEVICES)} (or pass --memory-gb N).")
    return DEVICES[name]
