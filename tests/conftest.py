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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

    from vlltr.training.export import export_bundle

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

    def argv(self) -> list[str]:
        """The `redis-server` command line."""
        return [
            "redis-server",
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
        if not _wait_port(self.port, 10):
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


@pytest.fixture(scope="session")
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """Start private Redis servers (`factory()` -> a started `RedisServer`); all are killed at the end."""
    yield from _redis_servers(lambda: RedisServer(_free_port(), tmp_path_factory.mktemp("redis")))


def _redis_servers(make: Callable[..., RedisServer]) -> Iterator[Callable[..., Any]]:
    """Body of the Redis factory fixtures: yield a factory that starts `make(...)`, kill every server after."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    started: list[RedisServer] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        server = make(*args, **kwargs)
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

    def start(self, timeout: float = 90.0) -> ServerProcess:
        """Start and wait until `/readyz` answers 200 (raises with the log if it does not)."""
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
        env.update({"VLLTR_CACHE_DIR": str(self.workdir / "cache"), "VLLTR_LOG_LEVEL": "info"})
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start `vlltr serve` processes: `factory(env={...}, args=[...], workdir=None, timeout=90)` -> a ready
    server.

    Servers are stopped at the end of the session at the latest; module fixtures may stop them sooner.
    """
    started: list[ServerProcess] = []

    def factory(
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        workdir: Path | None = None,
        timeout: float = 90.0,
    ) -> ServerProcess:
        server = ServerProcess(dict(env or {}), list(args or []), workdir or tmp_path_factory.mktemp("serve"))
        started.append(server)
        return server.start(timeout)

    yield factory
    for server in started:
        server.stop()


# ---- reliability tests (tests/test_reliability_*.py) --------------------------------------------------------
#
# Each reliability test adds what it did to one session-wide log (requests served, faults injected, hostile
# inputs tried, errors, data lost). With VLLTR_RELIABILITY_SUMMARY=PATH the log and the outcome of every
# reliability test are written there as JSON at the end of the run; `python -m bench.soak.report PATH` turns
# that file into docs/reliability.md, so the figures in the doc always come from a run.

RELIABILITY_SUMMARY_ENV = "VLLTR_RELIABILITY_SUMMARY"


class ReliabilityLog:
    """Figures of the reliability tests, summed per theme, plus each reliability test's outcome."""

    FIGURES = ("requests", "faults", "inputs", "errors", "data_lost")

    def __init__(self) -> None:
        self.themes: dict[str, dict[str, float]] = {}
        self.outcomes: dict[str, str] = {}
        self.extra: dict[str, object] = {}

    def add(self, theme: str, **figures: float) -> None:
        """Add figures (any of `FIGURES`) to a theme; unknown names are refused so typos cannot hide."""
        unknown = set(figures) - set(self.FIGURES)
        if unknown:
            raise ValueError(f"unknown reliability figures {sorted(unknown)}; known: {self.FIGURES}")
        row = self.themes.setdefault(theme, dict.fromkeys(self.FIGURES, 0))
        for name, value in figures.items():
            row[name] += value

    def note(self, key: str, value: object) -> None:
        """Keep a named detail for the report (e.g. the soak's memory figures)."""
        self.extra[key] = value

    def to_json(self) -> dict:
        totals = {name: sum(row[name] for row in self.themes.values()) for name in self.FIGURES}
        return {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "themes": self.themes,
            "totals": totals,
            "outcomes": self.outcomes,
            "details": self.extra,
        }


_RELIABILITY_LOG = ReliabilityLog()


@pytest.fixture(scope="session")
def reliability_log() -> ReliabilityLog:
    """The session's `ReliabilityLog`."""
    return _RELIABILITY_LOG


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the full soak (50,000 requests at concurrency 32) instead of the reduced one",
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "test_reliability_" not in report.nodeid:
        return
    if report.when == "call" or report.outcome != "passed":
        previous = _RELIABILITY_LOG.outcomes.get(report.nodeid)
        if previous in (None, "passed"):
            _RELIABILITY_LOG.outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(RELIABILITY_SUMMARY_ENV)
    if not target or not _RELIABILITY_LOG.outcomes:
        return
    import json

    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_RELIABILITY_LOG.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


class PersistentRedisServer(RedisServer):
    """A private `redis-server` with an append-only file (fsync every write) and an optional password.

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
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
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


@pytest.fixture(scope="session")
def persistent_redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PersistentRedisServer]]:
    """Start private persistent Redis servers: `factory(password=None)` -> a started `PersistentRedisServer`."""
    yield from _redis_servers(
        lambda password=None: PersistentRedisServer(_free_port(), tmp_path_factory.mktemp("redis-aof"), password)
    )


class Balancer:
    """Real nginx running the deployment's rendered site template in front of given upstreams."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        """The tails of nginx's output and error log."""
        parts = []
        for path in (self.log_path, self.log_path.parent / "p" / "logs" / "error.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)


@pytest.fixture(scope="session")
def balancer_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[list[str]], Balancer]]:
    """Start nginx on deploy/nginx's template: `factory(["127.0.0.1:PORT", ...])` -> a `Balancer` whose
    `/lb-healthz` answers. Needs nginx (deploy/validate.sh --install puts it there)."""
    import importlib.util

    import httpx

    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).is_file()), None)
    if nginx is None:
        pytest.fail("nginx not found (Debian package nginx); install it with: bash deploy/validate.sh --install")
    render_py = REPO / "deploy" / "tools" / "render.py"
    spec = importlib.util.spec_from_file_location("vlltr_deploy_render_conftest", render_py)
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    started: list[Balancer] = []

    def factory(upstreams: list[str]) -> Balancer:
        import tempfile

        # Outside pytest's private (0700) temp tree: nginx workers (nobody, when tests run as root) must reach
        # their temp dirs.
        prefix = Path(tempfile.mkdtemp(prefix="vlltr-nginx-"))
        prefix.chmod(0o755)
        port = _free_port()
        conf = render.write_nginx_prefix(prefix / "p", listen=f"127.0.0.1:{port}", upstreams=upstreams)
        log_path = prefix / "nginx.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [nginx, "-p", str(prefix / "p"), "-c", str(conf), "-g", "daemon off;"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        balancer = Balancer(proc, f"http://127.0.0.1:{port}", log_path)
        started.append(balancer)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n{balancer.log()}")
            try:
                if httpx.get(f"{balancer.url}/lb-healthz", timeout=1).status_code == 200:
                    return balancer
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"nginx did not answer on {balancer.url}:\n{balancer.log()}")

    yield factory
    for balancer in started:
        balancer.stop()
        shutil.rmtree(Path(balancer.log_path).parent, ignore_errors=True)
