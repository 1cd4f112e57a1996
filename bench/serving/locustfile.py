"""Locust user for the serving benchmark: each user posts JPEG files (multipart) in a closed loop.

Configured by environment variables (set by `bench.serving.load`):
    BENCH_IMAGES   a directory of .jpg files (sent round-robin, each user from its own offset)
    BENCH_PATH     path and query of the classify endpoint
    BENCH_FIELD    multipart field name (or JSON key)
    BENCH_FORMAT   `multipart` (default) or `json-base64` ({FIELD: base64 of the file}, LitServe's image recipe)
    BENCH_WARMUP_S seconds of warm-up (recorded; the summary counts only requests completed after it)
    BENCH_DURATION_S measured seconds after the warm-up; then the run stops itself
    BENCH_OUT      JSON file receiving every request: [start_time, latency_ms, ok], and `cpu_window`: this
                   process's CPU seconds at the end of the warm-up and at the end, with those two times
                   (what Locust itself costs over the measured window, its start-up excluded)
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import resource
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, events, task

_IMAGES = sorted(Path(os.environ.get("BENCH_IMAGES", ".")).glob("*.jpg"))
_BOUNDARY = "vlltrbenchboundary7d1a"
_FIELD = os.environ.get("BENCH_FIELD", "file")
_FORMAT = os.environ.get("BENCH_FORMAT", "multipart")
_PATH = os.environ.get("BENCH_PATH", "/v1/classify")
_WARMUP_S = float(os.environ.get("BENCH_WARMUP_S", "0"))
_DURATION_S = float(os.environ.get("BENCH_DURATION_S", "0"))
_OUT = os.environ.get("BENCH_OUT")
_T0 = time.time()
_RECORDS: list[tuple[float, float, bool]] = []
_OFFSETS = itertools.count(0, 7)
_CPU: list[float] = []


def _cpu_mark() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _CPU.extend([usage.ru_utime + usage.ru_stime, time.time()])


def _body(path: Path) -> bytes:
    if _FORMAT == "json-base64":
        return json.dumps({_FIELD: base64.b64encode(path.read_bytes()).decode("ascii")}).encode()
    head = (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{_FIELD}"; filename="{path.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + path.read_bytes() + f"\r\n--{_BOUNDARY}--\r\n".encode()


# Built once: the load generator should spend its (shared) CPU on sending, not on building bodies.
_BODIES = [_body(p) for p in _IMAGES]
_HEADERS = {
    "Content-Type": "application/json" if _FORMAT == "json-base64" else f"multipart/form-data; boundary={_BOUNDARY}"
}


@events.request.add_listener
def _record(
    request_type, name, response_time, response_length, response, context, exception, start_time, **kwargs
) -> None:
    _RECORDS.append((start_time, float(response_time), exception is None))


@events.test_start.add_listener
def _schedule_stop(environment, **kwargs) -> None:
    # Locust's own --run-time starts before this file is imported; stopping from here makes the measured
    # window exactly warm-up + duration after the clock the records use.
    if _DURATION_S > 0 and environment.runner is not None:
        gevent.spawn_later(max(0.0, _T0 + _WARMUP_S + _DURATION_S - time.time()), environment.runner.quit)
    gevent.spawn_later(max(0.0, _T0 + _WARMUP_S - time.time()), _cpu_mark)


@events.quitting.add_listener
def _dump(environment, **kwargs) -> None:
    if _OUT:
        cpu_window = None
        if len(_CPU) == 2:
            _cpu_mark()
            cpu_window = [_CPU[0], _CPU[2], _CPU[1], _CPU[3]]  # cpu at warm-up end, at the end; their times
        Path(_OUT).write_text(
            json.dumps(
                {
                    "t0": _T0,
                    "warmup_s": _WARMUP_S,
                    "duration_s": _DURATION_S,
                    "end": time.time(),
                    "records": _RECORDS,
                    "cpu_window": cpu_window,
                }
            )
        )


class ClassifyUser(FastHttpUser):
    """One closed-loop client: send, wait for the answer, send the next image."""

    connection_timeout = 60.0
    network_timeout = 600.0

    def on_start(self) -> None:
        """Start this user's round of images at its own offset."""
        if not _BODIES:
            raise RuntimeError(f"no .jpg files in BENCH_IMAGES={os.environ.get('BENCH_IMAGES')!r}")
        start = next(_OFFSETS) % len(_BODIES)
        self._cycle = itertools.cycle(_BODIES[start:] + _BODIES[:start])

    @task
    def classify(self) -> None:
        """Post the next image; any status but 200 counts as a failure."""
        with self.client.post(
            _PATH, data=next(self._cycle), headers=_HEADERS, name="classify", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200] if resp.text else ''}")
