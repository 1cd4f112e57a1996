"""Run the load generator (Locust, headless, closed loop) against a server and summarise what it recorded."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.serving.procs import ServerProcess, log_tail

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class LoadError(RuntimeError):
    """The load generator failed or recorded nothing."""


@dataclass
class LoadResult:
    """One load cell: closed-loop clients at `concurrency` for `duration_s` after a warm-up."""

    concurrency: int
    duration_s: float
    requests: int
    errors: int
    throughput: float  # successful requests (= images) per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    drain_s: float = 0.0  # time the server took, after the cell, to finish the requests it had accepted

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict."""
        return asdict(self)


def summarise(records: list[tuple[float, float, bool]], window_s: float, concurrency: int) -> LoadResult:
    """Throughput and latency percentiles of recorded requests over a window of `window_s` seconds."""
    ok = np.array([r[1] for r in records if r[2]], dtype=np.float64)
    errors = sum(1 for r in records if not r[2])
    if ok.size == 0:
        nan = float("nan")
        return LoadResult(concurrency, window_s, len(records), errors, 0.0, nan, nan, nan, nan)
    p50, p95, p99 = np.percentile(ok, [50, 95, 99])
    return LoadResult(
        concurrency,
        round(window_s, 2),
        len(records),
        errors,
        float(ok.size / window_s),
        float(p50),
        float(p95),
        float(p99),
        float(ok.mean()),
    )


def _probe_body(path: Path, server: ServerProcess) -> tuple[bytes, str]:
    if server.body_format == "json-base64":
        return json.dumps(
            {server.field: base64.b64encode(path.read_bytes()).decode("ascii")}
        ).encode(), "application/json"
    boundary = "vlltrbenchprobe"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{server.field}"; filename="{path.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def drain(server: ServerProcess, images_dir: Path, timeout: float = 600.0) -> float:
    """Send one request and wait for its answer; returns the seconds it took.

    When a load cell ends, its clients hang up, but a server still works through the requests it has
    accepted (none of these servers cancels a request whose client left). Requests are served in arrival
    order, so once this probe is answered the backlog ahead of it is gone and the next cell starts on an
    idle server."""
    body, ctype = _probe_body(sorted(images_dir.glob("*.jpg"))[0], server)
    req = urllib.request.Request(
        server.base_url + server.classify_path, data=body, method="POST", headers={"content-type": ctype}
    )
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
    return time.monotonic() - started


def run_load(
    server: ServerProcess,
    images_dir: Path,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    work_dir: Path,
    tag: str,
) -> tuple[LoadResult, list[tuple[float, float, bool]]]:
    """Run Locust for `warmup_s + duration_s` and return the summary plus the raw records (start time,
    latency ms, ok) of requests completed after the warm-up.

    Raises:
        LoadError: Locust failed, or no request was recorded.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / f"{tag}.records.json"
    out.unlink(missing_ok=True)
    log_path = work_dir / f"{tag}.locust.log"
    env = dict(
        os.environ,
        BENCH_IMAGES=str(images_dir),
        BENCH_PATH=server.classify_path,
        BENCH_FIELD=server.field,
        BENCH_FORMAT=server.body_format,
        BENCH_WARMUP_S=str(warmup_s),
        BENCH_DURATION_S=str(duration_s),
        BENCH_OUT=str(out),
    )
    total = warmup_s + duration_s
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(concurrency),
        "-r",
        str(max(concurrency, 1)),
        "-t",
        f"{total + 60:.0f}s",
        "--host",
        server.base_url,
        "--loglevel",
        "WARNING",
        "--stop-timeout",
        "0",
        "--exit-code-on-error",
        "0",
    ]
    started = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=total + 180)
    drained = drain(server, images_dir)
    if proc.returncode != 0 or not out.is_file():
        raise LoadError(
            f"locust exited with {proc.returncode} for {tag}:\n{log_tail(log_path)}\n"
            f"server log:\n{log_tail(server.log_path)}"
        )
    data = json.loads(out.read_text())
    # Counted by completion time: a closed loop's throughput is completions per second of the window.
    window_start = data["t0"] + data["warmup_s"]
    window_end = min(data["end"], window_start + data["duration_s"])
    records = [tuple(r) for r in data["records"] if window_start <= r[0] + r[1] / 1000.0 <= window_end]
    window = max(1e-6, window_end - window_start)
    if not records:
        raise LoadError(f"no request completed in {tag} ({time.time() - started:.0f} s):\n{log_tail(log_path)}")
    result = summarise(records, window, concurrency)
    result.drain_s = round(drained, 3)
    return result, records  # type: ignore[arg-type]
