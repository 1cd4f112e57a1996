"""What the process may use of the machine it runs on (torch-free: the service sizes its pools from it,
training and the benchmarks record it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity, and a cgroup v2 CPU quota (a container's CPU limit,
    which `os.cpu_count()` does not see) when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo, else `platform.processor()`, else "unknown")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
