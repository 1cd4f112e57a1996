"""The ceiling: the bundle's image encoder in-process on preprocessed tensors, at each batch size.

Two sessions are measured: the one the service creates (`vlltr.model.runtime.sessions`, no intra-op spinning, its
choice of intra-op threads: `vlltr.model.runtime.encoder_threads`) and one with ONNX Runtime's default options
(spinning on, which is faster when nothing else wants the cores). The ceiling is the best of both at any batch
size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.encoder_threads import create_image_encoder
from vlltr.model.runtime.sessions import CPU, CUDA, CUDA_OPTIONS, ProviderName


@dataclass
class CeilingPoint:
    """Images per second at one batch size with one session configuration."""

    session: str
    batch_size: int
    images_per_s: float
    ms_per_batch: float
    runs: int

    def to_dict(self) -> dict:
        """The point as a JSON-ready dict."""
        return asdict(self)


def _default_session(path: Path, provider: ProviderName) -> Callable[[np.ndarray], object]:
    providers = [(CUDA, CUDA_OPTIONS), CPU] if provider == "cuda" else [CPU]
    session = ort.InferenceSession(str(path), providers=providers)
    return lambda x: session.run(["features"], {"pixels": x})


def measure_ceiling(
    bundle_dir: Path, *, batch_sizes: Sequence[int], seconds: float, provider: ProviderName = "cpu", min_runs: int = 3
) -> list[CeilingPoint]:
    """Throughput of the bundle's image encoder for each batch size and session configuration: one warm-up
    run, then runs until `seconds` passed and at least `min_runs` ran."""
    bundle = load_bundle(bundle_dir)
    fp16 = bundle.precision == "fp16"
    service_encoder, _ = create_image_encoder(
        bundle.image_encoder_path, provider, None, bundle.preprocess.size, fp16=fp16
    )
    sessions: list[tuple[str, Callable[[np.ndarray], object]]] = [("service options", service_encoder.encode)]
    if bundle.precision != "fp16":  # fp16 graphs need the service's optimisation level on CPU
        sessions.append(("onnxruntime defaults", _default_session(bundle.image_encoder_path, provider)))
    size = bundle.preprocess.size
    rng = np.random.default_rng(0)
    points = []
    for name, run in sessions:
        for bs in batch_sizes:
            x = rng.standard_normal((bs, 3, size, size)).astype(np.float32)
            run(x)
            runs, started = 0, time.perf_counter()
            while runs < min_runs or time.perf_counter() - started < seconds:
                run(x)
                runs += 1
            took = time.perf_counter() - started
            points.append(CeilingPoint(name, bs, bs * runs / took, 1000 * took / runs, runs))
    return points


def best(points: Sequence[CeilingPoint]) -> CeilingPoint:
    """The batch size and session with the highest throughput."""
    return max(points, key=lambda p: p.images_per_s)
