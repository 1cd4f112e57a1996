"""A bounded soak: warm up, then many requests at a fixed concurrency while the server's RSS is sampled.

Memory is judged after the warm-up (sessions created, every batch shape run, caches filled, allocator pools
grown): from there, the resident set may not grow by more than `rss_bound_mb`, at its peak or at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from bench.soak.load import make_images, rss_bytes, run_load

MIB = 1024 * 1024
DEFAULT_RSS_BOUND_MB = 64.0


class RssSampler:
    """Samples a process's RSS every `interval` seconds on a thread; `peak` and `samples` in bytes."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_bytes(self.pid))
            except (OSError, RuntimeError):  # the process is gone; the caller sees that elsewhere
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.samples) if self.samples else 0


def soak(
    url: str,
    pid: int,
    *,
    requests: int,
    concurrency: int,
    images: Sequence[bytes] | None = None,
    warmup: int | None = None,
    rss_bound_mb: float = DEFAULT_RSS_BOUND_MB,
    timeout: float = 60.0,
) -> dict:
    """Run a soak against `url` (served by process `pid`) and return its JSON-ready summary.

    Args:
        url: base URL of the service.
        pid: the server process, whose RSS is sampled.
        requests: requests in the measured phase.
        concurrency: requests in flight.
        images: the images to send; default 1,024 distinct small PNG/JPEG pictures.
        warmup: requests before the baseline is taken; default max(500, requests // 10).
        rss_bound_mb: allowed growth of RSS over the baseline (peak and final).
        timeout: per-request timeout.

    The summary's `passed` is true when no request failed and the growth stayed within the bound.
    """
    images = list(images) if images is not None else make_images(1024, seed=1)
    warmup = max(500, requests // 10) if warmup is None else warmup
    started = time.monotonic()
    warm = run_load(url, images, requests=warmup, concurrency=concurrency, timeout=timeout) if warmup else None
    baseline = rss_bytes(pid)
    with RssSampler(pid) as sampler:
        main = run_load(url, images, requests=requests, concurrency=concurrency, timeout=timeout)
    final = rss_bytes(pid)
    peak = max(sampler.peak, final)
    errors = main.errors + (warm.errors if warm else 0)
    growth_peak = (peak - baseline) / MIB
    growth_final = (final - baseline) / MIB
    return {
        "requests": main.requests,
        "warmup_requests": warm.requests if warm else 0,
        "concurrency": concurrency,
        "distinct_images": len(images),
        "errors": errors,
        "load": main.summary(),
        "rss_mb": {
            "baseline": round(baseline / MIB, 1),
            "peak": round(peak / MIB, 1),
            "final": round(final / MIB, 1),
            "growth_peak": round(growth_peak, 1),
            "growth_final": round(growth_final, 1),
            "bound": rss_bound_mb,
            "samples": len(sampler.samples),
        },
        "seconds": round(time.monotonic() - started, 1),
        "passed": errors == 0 and growth_peak <= rss_bound_mb and growth_final <= rss_bound_mb,
    }
