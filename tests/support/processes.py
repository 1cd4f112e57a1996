"""Processes the integration and end-to-end tests start: private `redis-server`s, real `vlltr serve`
processes and nginx running the deployment's load-balancer template. Fixtures in tests/conftest.py start
them and clean up whatever they started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support.deploy import load_tool, shipped_redis_flags
from support.paths import PYTHON, REPO
from support.programs import program


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    """True once something accepts connections on 127.0.0.1:`port`, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def redis_answers(host: str, port: int) -> bool:
    """Whether a Redis server answers PING at `host`:`port` (without a password)."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisServer:
    """A private `redis-server` on a free port, without persistence; can be stopped and started again."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        """The `redis-server` command line."""
        return [
            program("redis-server", "redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
        ]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port, 10):
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        self.wait_ready()

    def wait_ready(self) -> None:
        """Return once the server answers commands (an open port is enough without persistence)."""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class PersistentRedisServer(RedisServer):
    """A private `redis-server` persisting exactly as the shipped deployment's does (the flags of
    docker-compose.yml's `redis` service, which the Kubernetes StatefulSet shares), with an optional password.

    Killing it (SIGKILL) and starting it again on the same directory and port brings back what it had.
    """

    def __init__(self, port: int, workdir: Path, password: str | None = None) -> None:
        super().__init__(port, workdir)
        self.password = password

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [
            program("redis-server", "redis-server"),
            *shipped_redis_flags(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def wait_ready(self) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()  # answers LOADING while the AOF is replayed
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()


# `VLLTR_TEST_WORKERS=2 python -m pytest tests/integration tests/e2e` runs every server the tests start as the
# multi-process service (2 HTTP front-ends and one engine) instead of a single process; a test's own
# `VLLTR_WORKERS` or `--workers` still wins (the tests of a per-process limit pin `--workers 1`).
TEST_WORKERS_ENV = "VLLTR_TEST_WORKERS"
# How much of a server's log an assertion message shows.
LOG_TAIL = 6000


def workers_for_tests() -> str:
    """The `--workers` the tests' servers run with (`VLLTR_TEST_WORKERS`, default 1: a single process)."""
    return os.environ.get(TEST_WORKERS_ENV, "1")


class ServerProcess:
    """A real `vlltr serve` process on a free port, with its log in a file (with `VLLTR_TEST_WORKERS` > 1, the
    supervisor of a multi-process service: `pid` is the supervisor's, whose children die with it).

    Args:
        env: `VLLTR_*` settings for the process (on top of a private cache dir).
        args: extra command-line flags.
        workdir: where the log and the default cache dir go.
    """

    def __init__(self, env: dict[str, str], args: list[str], workdir: Path) -> None:
        self.env = env
        self.args = args
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> ServerProcess:
        """Start and wait until `/readyz` answers 200 (raises with the log if it does not)."""
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
        env.update({"VLLTR_CACHE_DIR": str(self.workdir / "cache"), "VLLTR_LOG_LEVEL": "info"})
        env["VLLTR_WORKERS"] = workers_for_tests()
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "vlltr.cli", "serve", "--port", str(self.port), *self.args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def log(self, tail: int | None = LOG_TAIL) -> str:
        """The server's output so far: its last `tail` characters (for an assertion message), or all of it
        (`tail=None`, for reading facts such as pids that a busy run pushes out of any tail)."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]


class Balancer:
    """Real nginx running the deployment's rendered site template in front of given upstreams."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path

    @classmethod
    def start(cls, upstreams: list[str]) -> Balancer:
        """Start nginx on deploy/nginx's template in front of `upstreams` and wait until `/lb-healthz` answers."""
        import httpx

        nginx = program("nginx", "nginx")
        # Outside pytest's private (0700) temp tree: nginx workers (nobody, when tests run as root) must reach
        # their temp dirs.
        prefix = Path(tempfile.mkdtemp(prefix="vlltr-nginx-"))
        prefix.chmod(0o755)
        port = free_port()
        conf = load_tool("render").write_nginx_prefix(prefix / "p", listen=f"127.0.0.1:{port}", upstreams=upstreams)
        log_path = prefix / "nginx.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [nginx, "-p", str(prefix / "p"), "-c", str(conf), "-g", "daemon off;"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        balancer = cls(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                message = f"nginx exited with {proc.returncode}:\n{balancer.log()}"
                balancer.remove()
                raise RuntimeError(message)
            try:
                if httpx.get(f"{balancer.url}/lb-healthz", timeout=1).status_code == 200:
                    return balancer
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        message = f"nginx did not answer on {balancer.url}:\n{balancer.log()}"
        balancer.remove()
        raise RuntimeError(message)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def remove(self) -> None:
        """Stop nginx and delete its prefix directory."""
        self.stop()
        shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def log(self) -> str:
        """The tails of nginx's output and error log."""
        parts = []
        for path in (self.log_path, self.log_path.parent / "p" / "logs" / "error.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)
