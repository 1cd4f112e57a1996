"""What a run was computed with: the installed versions of the software that changes its numbers, and the
machine. Training appends one record per start of a run (the first and every resume) to RUN/environment.json,
so a run resumed elsewhere says so; the exporter writes the versions into the bundle's manifest."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from vlltr.model.runtime.machine import cpu_model, usable_cpus
from vlltr.training.checkpoint import atomic_write_json

ENVIRONMENT_FILE = "environment.json"
# The packages whose version can change a run's or a bundle's numbers (Pillow's resize, torch's kernels, ...).
RECORDED_SOFTWARE = ("pillow", "numpy", "onnx", "onnxruntime", "torch", "torchvision", "timm", "open_clip_torch")


def software_versions() -> dict[str, str]:
    """The installed versions of `RECORDED_SOFTWARE` (those installed)."""
    out = {}
    for name in RECORDED_SOFTWARE:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def describe_environment(device: torch.device) -> dict[str, Any]:
    """This process's software and machine, as one JSON-ready record."""
    record: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "software": software_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpus_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        record["cuda"] = {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return record


def record_environment(run_dir: Path, device: torch.device) -> None:
    """Append this start's record to RUN/environment.json (a list, oldest first)."""
    path = run_dir / ENVIRONMENT_FILE
    history: list[Any] = []
    with contextlib.suppress(OSError, ValueError):  # none yet, or a file cut short: start the list afresh
        earlier = json.loads(path.read_text())
        history = earlier if isinstance(earlier, list) else []
    atomic_write_json([*history, describe_environment(device)], path)
