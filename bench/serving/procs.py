"""Server processes for the benchmark: start one, wait until it answers, stop it (and its children)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerStartError(RuntimeError):
    """A server process exited or never became ready; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of a GET to `url`, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file (empty when missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ServerProcess:
    """A running HTTP server that the benchmark started.

    Attributes:
        name: label in the results.
        base_url: `http://127.0.0.1:PORT`.
        classify_path: path (and query) that classifies one image.
        field: multipart field name (or JSON key) of the image.
        body_format: `multipart`, or `json-base64` for servers whose documented recipe takes JSON.
        proc: the process (leader of its own process group).
        log_path: where its stdout and stderr go.
    """

    name: str
    base_url: str
    classify_path: str
    field: str
    proc: subprocess.Popen
    log_path: Path
    body_format: str = "multipart"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return int(self.proc.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT (graceful) to the process group, then SIGKILL to it after `timeout`."""
        if self.proc.poll() is not None:
            return
        # The group holds only this server and the workers it spawned (LitServe starts several).
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers of the group can outlive the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    name: str,
    cmd: Sequence[str],
    *,
    port: int,
    ready_path: str,
    classify_path: str,
    field: str,
    log_path: Path,
    body_format: str = "multipart",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600.0,
) -> ServerProcess:
    """Start `cmd` in its own process group and wait until GET `ready_path` answers 200.

    Raises:
        ServerStartError: the process exited or `timeout` passed first (with the log's tail).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    server = ServerProcess(name, f"http://127.0.0.1:{port}", classify_path, field, proc, log_path, body_format)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{name} exited with status {proc.returncode} before it was ready:\n{log_tail(log_path)}"
            )
        if http_status(server.base_url + ready_path) == 200:
            return server
        time.sleep(0.25)
    server.stop()
    raise ServerStartError(f"{name} was not ready after {timeout:.0f} s:\n{log_tail(log_path)}")
