"""Shared fixtures: a small bundle, private Redis servers and real `vlltr serve` processes.

Everything here is a fixture (or the small class a fixture returns). Server processes are shared per test
module by module-scoped fixtures in the test files; the factories here clean up whatever they started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a currently free TCP port on 127.0.0.1."""
    return _free_port


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified bundle of a randomly initialised tiny model (6 classes, 4 anchors) with test images.

    Built once per session with the exporter; the run directory next to it holds the generated dataset
    (`run/data/test.txt` lists its images).
    """
    from test_export_support import make_run
    from training.export import export_bundle

    root = tmp_path_factory.mktemp("service-bundle")
    run = make_run(root / "run")
    return export_bundle(run, root / "bundle")


class RedisServer:
    """A private `redis-server` on a free port, without persistence; can be stopped and started again."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait_port(self.port, 10):
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """Start private Redis servers (`factory()` -> a started `RedisServer`); all are killed at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    started: list[RedisServer] = []

    def factory() -> RedisServer:
        server = RedisServer(_free_port(), tmp_path_factory.mktemp("redis"))
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def shared_redis_url() -> str:
    """The machine's Redis at 127.0.0.1:6379 (never flushed: tests use their own key prefixes)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis answers at 127.0.0.1:6379")
    finally:
        client.close()
    return "redis://127.0.0.1:6379/0"


class ServerProcess:
    """A real `vlltr serve` process on a free port, with its log in a file.

    Args:
        env: `VLLTR_*` settings for the process (on top of a private cache dir).
        args: extra command-line flags.
        workdir: where the log and the default cache dir go.
    """

    def __init__(self, env: dict[str, str], args: list[str], workdir: Path) -> None:
        self.env = env
        self.args = args
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        """Start and wait until `/readyz` answers 200 (raises with the log if it does not)."""
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
        env.update({"VLLTR_CACHE_DIR": str(self.workdir / "cache"), "VLLTR_LOG_LEVEL": "info"})
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "vlltr.cli", "serve", "--port", str(self.port), *self.args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vlltr serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"vlltr serve was not ready after {timeout} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start `vlltr serve` processes: `factory(env={...}, args=[...], workdir=None, timeout=90)` -> a ready
    server.

    Servers are stopped at the end of the session at the latest; module fixtures may stop them sooner.
    """
    started: list[ServerProcess] = []

    def factory(env: dict[str, str] | None = None, args: list[str] | None = None,
                workdir: Path | None = None, timeout: float = 90.0) -> ServerProcess:
        server = ServerProcess(dict(env or {}), list(args or []), workdir or tmp_path_factory.mktemp("serve"))
        started.append(server)
        return server.start(timeout)

    yield factory
    for server in started:
        server.stop()
