"""Drive a server with wrk (the system package, C with a LuaJIT script): closed loop, one connection per
concurrent client, request bodies built beforehand, and the CPU wrk itself used, read from the kernel.

wrk's event loop sends and parses without an interpreter in the way, so the load generator takes a small
share of the cores it shares with the server under test (`client_cpu_us_per_request` of every cell).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.serving.procs import log_tail

WRK_SCRIPT = Path(__file__).with_name("wrk_classify.lua")
BOUNDARY = "vlltrbenchboundary7d1a"
# Socket timeout of a request. A ViT-B/16 on two cores answers concurrency 64 in several seconds; wrk counts a
# slower answer as a timeout error (and sizes its latency histogram from this value, touching only the
# range of latencies it saw).
TIMEOUT_S = 60


class WrkError(RuntimeError):
    """wrk is missing, failed, or wrote no summary."""


@dataclass
class WrkRun:
    """One wrk invocation: its summary (from the script's done() hook), what it cost, its per-request records."""

    summary: dict[str, Any]
    cpu_s: float  # user + system CPU seconds of the wrk process (getrusage of the child)
    wall_s: float
    threads: int
    records: list[tuple[float, float, bool]]  # (start time, latency ms, status < 400); only when asked for


def wrk_path() -> str | None:
    """The wrk executable on PATH, or None."""
    return shutil.which("wrk")


def request_body(path: Path, field: str, body_format: str) -> tuple[bytes, str]:
    """One request's body and Content-Type: multipart with the file under `field`, or JSON
    `{field: base64}` (`json-base64`, LitServe's image recipe)."""
    if body_format == "json-base64":
        return json.dumps({field: base64.b64encode(path.read_bytes()).decode("ascii")}).encode(), "application/json"
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + path.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def write_bodies(images_dir: Path, work_dir: Path, field: str, body_format: str) -> tuple[Path, str]:
    """Every image of `images_dir` as a request body file (written once per image set and format); returns
    the index file the Lua script reads and the Content-Type."""
    images = sorted(images_dir.glob("*.jpg"))
    if not images:
        raise WrkError(f"no .jpg files in {images_dir}")
    out = work_dir / "bodies" / f"{images_dir.name}-{body_format}-{field}"
    index = out / "index.txt"
    ctype = request_body(images[0], field, body_format)[1]
    listed = index.read_text().split("\n")[:-1] if index.is_file() else []
    wanted = [str(out / f"{p.stem}.body") for p in images]
    if listed != wanted:
        out.mkdir(parents=True, exist_ok=True)
        for p, body_path in zip(images, wanted):
            Path(body_path).write_bytes(request_body(p, field, body_format)[0])
        index.write_text("".join(f"{w}\n" for w in wanted))  # written last: a complete index means complete bodies
    return index, ctype


def _wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for `proc` (SIGKILL after `timeout`); its exit code and the CPU seconds it used."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code  # reaped here, so Popen must not wait for it again
            return code, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.05)


def run_wrk(
    url: str,
    index: Path,
    content_type: str,
    *,
    connections: int,
    duration_s: float,
    out_dir: Path,
    tag: str,
    threads: int = 1,
    records: bool = False,
) -> WrkRun:
    """wrk for `duration_s` (whole seconds, rounded up) with `connections` closed-loop connections.

    With `records`, wrk runs one thread per connection and the script records every request (start time,
    latency, status); otherwise `threads` threads share the connections and only the summary is kept.

    Raises:
        WrkError: wrk is not installed, exited non-zero, or wrote no summary.
    """
    exe = wrk_path()
    if exe is None:
        raise WrkError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    threads = connections if records else max(1, min(threads, connections))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / f"{tag}.wrk.json"
    records_path = out_dir / f"{tag}.records.csv"
    log_path = out_dir / f"{tag}.wrk.log"
    for p in (summary_path, records_path):
        p.unlink(missing_ok=True)
    base, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    env = dict(
        os.environ,
        BENCH_INDEX=str(index),
        BENCH_CONTENT_TYPE=content_type,
        BENCH_PATH="/" + path,
        BENCH_THREADS=str(threads),
        BENCH_OUT=str(summary_path),
    )
    if records:
        env["BENCH_RECORDS"] = str(records_path)
    seconds = max(1, math.ceil(duration_s))
    cmd = [
        exe,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        f"{TIMEOUT_S}s",
        "-s",
        str(WRK_SCRIPT),
        f"{base}://{host}/",
    ]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    code, cpu = _wait_with_rusage(proc, seconds + 120)
    wall = time.monotonic() - started
    if code != 0 or not summary_path.is_file():
        raise WrkError(f"wrk exited with {code} for {tag}:\n{log_tail(log_path)}")
    summary = json.loads(summary_path.read_text())
    rows: list[tuple[float, float, bool]] = []
    if records and records_path.is_file():
        for line in records_path.read_text().splitlines():
            start, latency, status = line.split(",")
            rows.append((float(start), float(latency), int(status) < 400))
    return WrkRun(summary, cpu, wall, threads, rows)
