"""Drive a server with the load generator (wrk by default, Locust on request) and summarise one load cell.

Every cell is closed loop: `concurrency` clients each send their next image when the previous answer
arrives. A warm-up run comes first and is not counted; the measured run follows on a drained server. Each
cell records what the load generator itself cost in CPU, since it shares the cores with the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.procs import ServerProcess, log_tail
from bench.serving.wrk import WrkRun, request_body, run_wrk, write_bodies

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
GENERATORS = ("wrk", "locust")
WRK_THREADS = 1  # one event loop keeps up with every server here (its CPU per request is in each cell)


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
    generator: str = ""
    # CPU the load generator used during the measured run (user + system), per answered request.
    client_cpu_s: float | None = None
    client_cpu_us_per_request: float | None = None
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
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


def drain(server: ServerProcess, images_dir: Path, timeout: float = 600.0) -> float:
    """Send one request and wait for its answer; returns the seconds it took.

    When a load cell ends, its clients hang up, but a server still works through the requests it has
    accepted (none of these servers cancels a request whose client left). Requests are served in arrival
    order, so once this probe is answered the backlog ahead of it is gone and the next cell starts on an
    idle server."""
    body, ctype = request_body(sorted(images_dir.glob("*.jpg"))[0], server.field, server.body_format)
    req = urllib.request.Request(
        server.base_url + server.classify_path, data=body, method="POST", headers={"content-type": ctype}
    )
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
    return time.monotonic() - started


def _from_wrk(run: WrkRun, concurrency: int) -> LoadResult:
    s = run.summary
    kinds = {k: int(v) for k, v in s["errors"].items()}
    lat = s["latency_us"]
    seconds = s["duration_us"] / 1e6
    answered = int(s["requests"])
    ok = answered - kinds["status"]
    if answered == 0:
        raise LoadError(f"wrk completed no request in {seconds:.1f} s (errors {kinds})")
    return LoadResult(
        concurrency,
        round(seconds, 3),
        answered,
        sum(kinds.values()),
        ok / seconds,
        lat["p50"] / 1000,
        lat["p95"] / 1000,
        lat["p99"] / 1000,
        lat["mean"] / 1000,
        generator=f"wrk ({run.threads} thread{'s' if run.threads > 1 else ''})",
        client_cpu_s=round(run.cpu_s, 4),
        client_cpu_us_per_request=1e6 * run.cpu_s / answered,
        error_kinds=kinds,
    )


def _run_wrk_cell(
    server: ServerProcess,
    images_dir: Path,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    work_dir: Path,
    tag: str,
    records: bool,
) -> tuple[LoadResult, list[tuple[float, float, bool]]]:
    index, ctype = write_bodies(images_dir, work_dir, server.field, server.body_format)
    url = server.base_url + server.classify_path
    try:
        if warmup_s > 0:
            run_wrk(
                url,
                index,
                ctype,
                connections=concurrency,
                duration_s=warmup_s,
                out_dir=work_dir,
                tag=f"{tag}-warmup",
                threads=WRK_THREADS,
            )
            drain(server, images_dir)
        run = run_wrk(
            url,
            index,
            ctype,
            connections=concurrency,
            duration_s=duration_s,
            out_dir=work_dir,
            tag=tag,
            threads=WRK_THREADS,
            records=records,
        )
    except RuntimeError as exc:
        raise LoadError(f"{exc}\nserver log:\n{log_tail(server.log_path)}") from exc
    drained = drain(server, images_dir)
    result = _from_wrk(run, concurrency)
    result.drain_s = round(drained, 3)
    return result, run.records


def _run_locust_cell(
    server: ServerProcess,
    images_dir: Path,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    work_dir: Path,
    tag: str,
) -> tuple[LoadResult, list[tuple[float, float, bool]]]:
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
    records = [
        (float(r[0]), float(r[1]), bool(r[2]))
        for r in data["records"]
        if window_start <= r[0] + r[1] / 1000.0 <= window_end
    ]
    window = max(1e-6, window_end - window_start)
    if not records:
        raise LoadError(f"no request completed in {tag} ({time.time() - started:.0f} s):\n{log_tail(log_path)}")
    result = summarise(records, window, concurrency)
    result.drain_s = round(drained, 3)
    result.generator = "locust (FastHttpUser, one process)"
    cpu = data.get("cpu_window")  # the locustfile's own CPU over the measured window (its start-up excluded)
    if cpu:
        result.client_cpu_s = round(cpu[1] - cpu[0], 4)
        answered = sum(1 for r in data["records"] if cpu[2] <= r[0] + r[1] / 1000.0 <= cpu[3])
        result.client_cpu_us_per_request = 1e6 * (cpu[1] - cpu[0]) / max(answered, 1)
    return result, records


def run_load(
    server: ServerProcess,
    images_dir: Path,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    work_dir: Path,
    tag: str,
    generator: str = "wrk",
    records: bool = False,
) -> tuple[LoadResult, list[tuple[float, float, bool]]]:
    """One load cell: a warm-up of `warmup_s`, then `duration_s` measured; returns the summary and, with
    `records` (or with Locust, which always keeps them), each measured request as (start time, latency ms,
    ok).

    Raises:
        LoadError: the load generator failed, or no request was answered.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    if generator == "wrk":
        return _run_wrk_cell(
            server,
            images_dir,
            concurrency=concurrency,
            duration_s=duration_s,
            warmup_s=warmup_s,
            work_dir=work_dir,
            tag=tag,
            records=records,
        )
    if generator == "locust":
        return _run_locust_cell(
            server,
            images_dir,
            concurrency=concurrency,
            duration_s=duration_s,
            warmup_s=warmup_s,
            work_dir=work_dir,
            tag=tag,
        )
    raise ValueError(f"unknown load generator {generator!r} (one of {', '.join(GENERATORS)})")


def describe_generator(generator: str) -> dict[str, Any]:
    """What drives the load, for the report."""
    if generator == "wrk":
        return {
            "name": "wrk",
            "text": f"wrk (system package, {WRK_THREADS} thread, one connection per client, closed loop; "
            "request bodies built beforehand, sent by a LuaJIT script)",
        }
    return {"name": "locust", "text": "locust (FastHttpUser, closed loop, one process)"}
