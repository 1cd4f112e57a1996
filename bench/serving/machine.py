"""A description of the machine and software a benchmark ran on."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from vlltr.model.runtime.machine import cpu_model, usable_cpus

PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "open_clip_torch",
    "fastapi",
    "uvicorn",
    "pillow",
    "numpy",
    "litserve",
    "locust",
)


def _memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def describe() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and the versions of the packages that matter."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cpus(),  # what this process may use: its CPU affinity and cgroup quota
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes' CPU use makes timings noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
