"""`python -m bench.soak`: the long soak (default 50,000 requests at concurrency 32).

Against a running service: `python -m bench.soak --url http://127.0.0.1:8000 --pid 1234`. Without `--url`, a
`vlltr serve` process is started on a free port (`--bundle DIR`, default the demo bundle) and stopped after.
The JSON summary goes to `--summary PATH` (and stdout); the exit status is 1 when a request failed or the
server's RSS grew past `--rss-bound-mb` after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.soak.soak import DEFAULT_RSS_BOUND_MB, soak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(bundle: str | None, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [sys.executable, "-m", "vlltr.cli", "serve", "--port", str(port), "--provider", "cpu"]
    if bundle:
        argv += ["--bundle", bundle]
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # the first start may build the demo bundle
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vlltr serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"vlltr serve was not ready in time; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running service (then --pid is required)")
    parser.add_argument("--pid", type=int, help="process id of that service (its RSS is sampled)")
    parser.add_argument("--bundle", help="bundle to serve when starting a server (default: the demo bundle)")
    parser.add_argument("--requests", type=int, default=50_000, help="measured requests (default 50000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests (default: 10%%, >= 500)")
    parser.add_argument(
        "--rss-bound-mb",
        type=float,
        default=DEFAULT_RSS_BOUND_MB,
        help=f"allowed RSS growth after the warm-up, MiB (default {DEFAULT_RSS_BOUND_MB:g})",
    )
    parser.add_argument("--summary", type=Path, help="write the JSON summary here")
    args = parser.parse_args(argv)
    if args.url and not args.pid:
        parser.error("--url needs --pid (the server process whose memory is measured)")

    proc = None
    url, pid = args.url, args.pid
    if not url:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vlltr-soak-{os.getpid()}.log"
        proc, url = _start_server(args.bundle, log_path)
        pid = proc.pid
    try:
        result = soak(
            url,
            pid,
            requests=args.requests,
            concurrency=args.concurrency,
            warmup=args.warmup,
            rss_bound_mb=args.rss_bound_mb,
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = json.dumps(result, indent=2)
    print(text)
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(text + "\n", encoding="utf-8")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
