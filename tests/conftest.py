"""Fixtures for every kind of test: bundles, Redis, real `vlltr serve` processes, nginx, the reliability log.

tests/unit needs no process and no Redis (tests/unit/runtime and tests/unit/service need no torch either: they
use the committed bundle `bundle_v1`); tests/integration starts Redis servers and processes; tests/e2e runs
servers behind nginx, Prometheus and the command line. The helpers these fixtures use live in tests/support.

Server processes are shared per test module by module-scoped fixtures in the test files; the factories here
clean up whatever they started.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("support")

from support.paths import BUNDLE_V1, TESTS  # noqa: E402
from support.processes import (  # noqa: E402
    Balancer,
    PersistentRedisServer,
    RedisServer,
    ServerProcess,
    free_port,
    redis_answers,
)
from support.reliability import RELIABILITY_PREFIX, RELIABILITY_SUMMARY_ENV, ReliabilityLog  # noqa: E402

KINDS = ("unit", "integration", "e2e")
SHARED_REDIS = ("127.0.0.1", 6379)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Each test gets the marker of its folder, so `-m "not e2e"` and the like select by kind.
    for item in items:
        parts = Path(item.path).relative_to(TESTS).parts
        if parts and parts[0] in KINDS:
            item.add_marker(parts[0])


@pytest.fixture(scope="session", name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """A function returning a currently free TCP port on 127.0.0.1."""
    return free_port


# ---- bundles -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified bundle of a randomly initialised tiny model (6 classes, 4 anchors) with test images.

    Built once per session with this version's exporter (needs torch); the run directory next to it holds the
    generated dataset (`run/data/test.txt` lists its images).
    """
    from support.runs import make_run
    from vlltr.training.export import export_bundle

    root = tmp_path_factory.mktemp("service-bundle")
    run = make_run(root / "run")
    return export_bundle(run, root / "bundle")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle as `vlltr serve` builds it: Digits-LT trained with the tiny config (needs torch, about a
    minute on two cores). Its benchmark lies next to it, `data/test.txt` listing the test images."""
    from vlltr.training.demo import build_demo_bundle

    root = tmp_path_factory.mktemp("demo")
    return build_demo_bundle(root, out=root / "bundle")


@pytest.fixture(scope="session")
def bundle_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed bundle the previous version's exporter wrote (tests/fixtures/bundle-v1), no torch.

    6 classes, 4 anchors, a 16-wide embedding, 32-pixel images; `run/data/test.txt` next to it lists its run's
    test images, as with `service_bundle`. A copy, so a test that writes into it cannot change the fixture.
    """
    root = tmp_path_factory.mktemp("bundle-v1")
    shutil.copytree(BUNDLE_V1 / "bundle", root / "bundle")
    shutil.copytree(BUNDLE_V1 / "run", root / "run")
    return root / "bundle"


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run, bundle): a tiny run with 8 classes and 300 test images, exported by this version (needs torch)."""
    from support.runs import make_run
    from vlltr.training.export import export_bundle

    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "run", n_test=300, num_classes=8)
    return run, export_bundle(run, root / "bundle")


# ---- Redis ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """Start private Redis servers (`factory()` -> a started `RedisServer`); all are killed at the end."""
    yield from _redis_servers(lambda: RedisServer(free_port(), tmp_path_factory.mktemp("redis")))


def _redis_servers(make: Callable[..., RedisServer]) -> Iterator[Callable[..., Any]]:
    """Body of the Redis factory fixtures: yield a factory that starts `make(...)`, kill every server after."""
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
def shared_redis_url(redis_server_factory: Callable[[], RedisServer]) -> str:
    """A Redis the session's tests share: the machine's at 127.0.0.1:6379 when one answers there, otherwise a
    private `redis-server` on a free port. Never flushed: tests use their own key prefixes."""
    if redis_answers(*SHARED_REDIS):
        return "redis://{}:{}/0".format(*SHARED_REDIS)
    return redis_server_factory().url


@pytest.fixture(scope="session")
def persistent_redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PersistentRedisServer]]:
    """Start private persistent Redis servers: `factory(password=None)` -> a started `PersistentRedisServer`."""
    yield from _redis_servers(
        lambda password=None: PersistentRedisServer(free_port(), tmp_path_factory.mktemp("redis-aof"), password)
    )


# ---- servers and the balancer --------------------------------------------------------------------------------


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


@pytest.fixture(scope="session")
def balancer_factory() -> Iterator[Callable[[list[str]], Balancer]]:
    """Start nginx on deploy/nginx's template: `factory(["127.0.0.1:PORT", ...])` -> a `Balancer` whose
    `/lb-healthz` answers (nginx comes from the README's apt line)."""
    started: list[Balancer] = []

    def factory(upstreams: list[str]) -> Balancer:
        balancer = Balancer.start(upstreams)
        started.append(balancer)
        return balancer

    yield factory
    for balancer in started:
        balancer.remove()


# ---- reliability tests (tests/*/test_reliability_*.py; see support/reliability.py) ----------------------------

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
    if RELIABILITY_PREFIX not in report.nodeid:
        return
    if report.when == "call" or report.outcome != "passed":
        previous = _RELIABILITY_LOG.outcomes.get(report.nodeid)
        if previous in (None, "passed"):
            _RELIABILITY_LOG.outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(RELIABILITY_SUMMARY_ENV)
    if not target or not _RELIABILITY_LOG.outcomes:
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_RELIABILITY_LOG.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
