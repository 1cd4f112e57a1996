"""A closed-loop load generator over HTTP and a resident-memory probe (Linux `/proc`).

The generator keeps exactly `concurrency` requests in flight until `requests` have been answered, on one
asyncio event loop with one connection pool, so it stays cheap next to the server it measures. Every answer
that is not a 200 with predictions, and every transport error, is counted as an error with a short reason.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image


def rss_bytes(pid: int) -> int:
    """Resident set size of a process in bytes (from `/proc/<pid>/status`)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_images(count: int, *, seed: int = 0, min_side: int = 24, max_side: int = 96) -> list[bytes]:
    """`count` distinct small images (noisy pictures, alternately PNG and JPEG) as encoded bytes.

    Distinct bytes mean distinct cache keys, so a soak over more images than the cache holds keeps the cache
    evicting: the memory bound is then measured with the cache full, not while it is still filling.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out


@dataclass
class LoadResult:
    """What one load run saw.

    Attributes:
        requests: requests answered (or failed).
        ok: 200 answers with a non-empty prediction list.
        errors: everything else.
        reasons: error reason -> count (`HTTP 503`, `ConnectError`, ...).
        statuses: HTTP status -> count.
        seconds: wall time of the run.
        latencies_ms: sorted per-request latencies.
    """

    requests: int = 0
    ok: int = 0
    errors: int = 0
    reasons: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """Latency percentile `q` (0..100) in milliseconds; 0 when nothing ran."""
        if not self.latencies_ms:
            return 0.0
        index = min(len(self.latencies_ms) - 1, int(round(q / 100.0 * (len(self.latencies_ms) - 1))))
        return self.latencies_ms[index]

    def summary(self) -> dict:
        """A JSON-ready summary."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "error_reasons": dict(self.reasons),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
            "latency_ms": {
                "p50": round(self.percentile(50), 2),
                "p99": round(self.percentile(99), 2),
                "max": round(self.latencies_ms[-1], 2) if self.latencies_ms else 0.0,
            },
        }


async def _run(
    url: str,
    images: Sequence[bytes],
    requests: int,
    concurrency: int,
    timeout: float,
    progress: Callable[[int], None] | None,
    top_k: int,
) -> LoadResult:
    result = LoadResult()
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            for n in counter:
                data = images[rng.randrange(len(images))]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", params={"top_k": top_k}, files={"file": ("img", data)})
                    result.statuses[r.status_code] += 1
                    if r.status_code == 200 and r.json().get("predictions"):
                        result.ok += 1
                    else:
                        result.errors += 1
                        result.reasons[f"HTTP {r.status_code}"] += 1
                except httpx.HTTPError as exc:
                    result.errors += 1
                    result.reasons[type(exc).__name__] += 1
                result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                result.requests += 1
                if progress is not None:
                    progress(n + 1)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.seconds = time.monotonic() - started
    result.latencies_ms.sort()
    return result


def run_load(
    url: str,
    images: Sequence[bytes],
    *,
    requests: int,
    concurrency: int,
    timeout: float = 60.0,
    progress: Callable[[int], None] | None = None,
    top_k: int = 3,
) -> LoadResult:
    """Send `requests` classifications of randomly chosen `images` to `url`, `concurrency` at a time.

    Args:
        url: the service's base URL.
        images: encoded images to choose from.
        requests: total requests.
        concurrency: requests kept in flight.
        timeout: per-request timeout in seconds.
        progress: called on the event loop with the number of the request just finished (keep it cheap).
        top_k: the `top_k` query parameter.
    """
    if requests < 1 or concurrency < 1 or not images:
        raise ValueError("requests and concurrency must be >= 1 and images non-empty")
    return asyncio.run(_run(url, images, requests, concurrency, timeout, progress, top_k))
