"""The compose topology rebuilt without Docker: two replicas, real nginx, real Prometheus, Redis.

Each replica is started with the serving image's entrypoint (read from the Dockerfile, only
--host/--port changed), configured through the same VLLTR_* variables compose sets. nginx runs the
rendered deploy/nginx template, Prometheus the rendered deploy/prometheus config with the real
alert rules. Redis is a private redis-server on a free port, so the shared server is never touched.

What it shows:
* a class added through the balancer is served by both replicas (shared class table via Redis);
* the balancer spreads requests over both replicas and keeps /metrics private;
* Prometheus scrapes both replicas (up, request counts, Redis up) and evaluates every alert rule;
* every vlltr_* metric the dashboard and the alert rules use exists in a live replica's /metrics.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from support.deploy import DEPLOY, load_tool
from support.programs import PIP_LINE, program

READY_TIMEOUT_S = 120.0
PROPAGATION_TIMEOUT_S = 10.0
SCRAPE_TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow

T = TypeVar("T")


dockerfile = load_tool("dockerfile")
metric_names = load_tool("metric_names")
render = load_tool("render")


def _vlltr_executable() -> str:
    beside_python = Path(sys.executable).parent / "vlltr"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("vlltr")
    if found is None:
        pytest.fail(f"the vlltr console script is not installed: {PIP_LINE}")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Process:
    """A child process of the stack with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 4000) -> str:
        """The end of the process's output, for failure messages."""
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError as exc:
            return f"<no log: {exc}>"

    def stop(self) -> None:
        """Terminate, then kill if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


@dataclass
class Stack:
    """Addresses of the running topology and its processes."""

    replicas: list[str]
    balancer: str
    prometheus: str
    admin_token: str
    redis_prefix: str
    processes: list[Process] = field(default_factory=list)

    def logs(self) -> str:
        """Tails of every process's output."""
        return "\n".join(f"----- {p.name} (exit {p.popen.poll()}) -----\n{p.tail()}" for p in self.processes)


def _start(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Process:
    log = workdir / f"{name}.log"
    handle = log.open("wb")
    popen = subprocess.Popen(
        argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir
    )
    handle.close()
    return Process(name, popen, log)


def _wait_for(
    what: str, probe: Callable[[], T | None], timeout: float, processes: list[Process], interval: float = 0.25
) -> T:
    """Poll ``probe`` until it returns a value; fail with the stack's logs on timeout or a crash."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n{proc.tail()}")
        try:
            value = probe()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_error = repr(exc)
            value = None
        if value is not None:
            return value
        time.sleep(interval)
    logs = "\n".join(f"----- {p.name} -----\n{p.tail()}" for p in processes)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})\n{logs}")


def _status_is(url: str, status: int = 200) -> Callable[[], bool | None]:
    def probe() -> bool | None:
        return True if httpx.get(url, timeout=5).status_code == status else None

    return probe


def _service_env(bundle: Path, redis_url: str, prefix: str, token: str, state_dir: Path) -> dict[str, str]:
    """The replica environment: what compose sets, with local addresses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
    env.update(
        {
            "VLLTR_BUNDLE": str(bundle),
            "VLLTR_REDIS_URL": redis_url,
            "VLLTR_REDIS_PREFIX": prefix,
            "VLLTR_ADMIN_TOKEN": token,
            "VLLTR_PROVIDER": "cpu",
            "VLLTR_LOG_LEVEL": "info",
            "VLLTR_CACHE_DIR": str(state_dir / "cache"),
            "VLLTR_CLASS_STORE": str(state_dir / "classes.json"),
        }
    )
    return env


@pytest.fixture(scope="module")
def stack(service_bundle: Path) -> Iterator[Stack]:
    """Start Redis, two replicas, nginx and Prometheus; stop them all afterwards.

    The replicas serve the session's tiny exported bundle (conftest's ``service_bundle``), as the
    compose replicas serve the bundle on their shared volume.
    """
    redis_server = program("redis-server", "redis-server")
    nginx = program("nginx", "nginx")
    prometheus = program("prometheus", "prometheus")
    vlltr = _vlltr_executable()

    workdir = Path(tempfile.mkdtemp(prefix="vlltr-topology-"))
    # nginx's workers (nobody, when the tests run as root) must be able to reach their temp dirs.
    workdir.chmod(0o755)
    redis_port, api1_port, api2_port, lb_port, prom_port = _free_ports(5)
    token = secrets.token_urlsafe(24)
    prefix = f"vlltr-topology-{uuid.uuid4().hex[:12]}"
    processes: list[Process] = []
    try:
        (workdir / "redis").mkdir()
        processes.append(
            _start(
                "redis",
                [
                    redis_server,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir / "redis"),
                ],
                workdir,
            )
        )

        def redis_answers() -> bool | None:
            with socket.create_connection(("127.0.0.1", redis_port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return True if conn.recv(16).startswith(b"+PONG") else None

        _wait_for("redis-server", redis_answers, 20, processes)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        replicas = []
        for index, port in enumerate((api1_port, api2_port), start=1):
            state = workdir / f"api-{index}"
            state.mkdir()
            command = dockerfile.serve_command("127.0.0.1", port)
            if command[0] == "vlltr":
                command[0] = vlltr  # the console script of the interpreter running the tests
            processes.append(
                _start(f"api-{index}", command, state, _service_env(service_bundle, redis_url, prefix, token, state))
            )
            replicas.append(f"http://127.0.0.1:{port}")
        for index, base in enumerate(replicas, start=1):
            _wait_for(f"api-{index} /readyz", _status_is(f"{base}/readyz"), READY_TIMEOUT_S, processes, interval=0.5)

        nginx_prefix = workdir / "nginx"
        conf = render.write_nginx_prefix(
            nginx_prefix, listen=f"127.0.0.1:{lb_port}", upstreams=[f"127.0.0.1:{api1_port}", f"127.0.0.1:{api2_port}"]
        )
        processes.append(
            _start("nginx", [nginx, "-p", str(nginx_prefix), "-c", str(conf), "-g", "daemon off;"], workdir)
        )
        balancer = f"http://127.0.0.1:{lb_port}"
        _wait_for("nginx", _status_is(f"{balancer}/lb-healthz"), 20, processes)

        prom_dir = workdir / "prometheus"
        (prom_dir / "data").mkdir(parents=True)
        prom_config = render.write_prometheus_config(
            prom_dir / "prometheus.yml", targets=[f"127.0.0.1:{api1_port}", f"127.0.0.1:{api2_port}"]
        )
        processes.append(
            _start(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={prom_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                prom_dir,
            )
        )
        prom_base = f"http://127.0.0.1:{prom_port}"
        _wait_for("prometheus", _status_is(f"{prom_base}/-/ready"), 30, processes)

        yield Stack(
            replicas=replicas,
            balancer=balancer,
            prometheus=prom_base,
            admin_token=token,
            redis_prefix=prefix,
            processes=processes,
        )
    finally:
        for proc in reversed(processes):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _class_names(payload: Any) -> set[str]:
    """Class names in a GET /v1/classes answer (a list of classes, or an object holding one)."""
    items = payload.get("classes", payload) if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        raise ValueError(f"unexpected /v1/classes answer: {str(payload)[:300]}")
    return {item["name"] if isinstance(item, dict) else str(item) for item in items}


def _png(size: int = 48) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (size, size), (200, 30, 30))
    for x in range(size // 4, 3 * size // 4):
        for y in range(size // 4, 3 * size // 4):
            image.putpixel((x, y), (20, 20, 220))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _route_count(metrics_text: str, route: str) -> float:
    """Sum of vlltr_request_duration_seconds_count samples for one route."""
    total = 0.0
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "vlltr_request_duration_seconds_count" and sample.labels.get("route") == route:
                total += sample.value
    return total


def _prom_query(stack: Stack, query: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": query}, timeout=5).json()
    if answer.get("status") != "success":
        raise ValueError(f"Prometheus query {query!r} failed: {answer}")
    return answer["data"]["result"]


def test_class_added_through_balancer_reaches_every_replica(stack: Stack) -> None:
    name = f"topology-{uuid.uuid4().hex[:8]}"
    body = {
        "name": name,
        "descriptions": [
            "a small red square with a blue centre",
            "a red tile around a blue patch",
            "a blue square framed in red",
        ],
    }
    refused = httpx.post(f"{stack.balancer}/v1/classes", json=body, timeout=30)
    assert refused.status_code == 401, f"adding a class without the token gave {refused.status_code}: {refused.text}"

    auth = {"Authorization": f"Bearer {stack.admin_token}"}
    added = httpx.post(f"{stack.balancer}/v1/classes", json=body, headers=auth, timeout=60)
    assert added.status_code == 201, f"POST /v1/classes through nginx: {added.status_code} {added.text}\n{stack.logs()}"

    for replica in stack.replicas:
        _wait_for(
            f"{name} on {replica}",
            lambda r=replica: True if name in _class_names(httpx.get(f"{r}/v1/classes", timeout=5).json()) else None,
            PROPAGATION_TIMEOUT_S,
            stack.processes,
        )

    # An image classified through the balancer is scored against the table that includes it.
    answer = httpx.post(
        f"{stack.balancer}/v1/classify",
        params={"top_k": 100},
        files={"file": ("square.png", _png(), "image/png")},
        timeout=60,
    )
    assert answer.status_code == 200, f"classify through nginx: {answer.status_code} {answer.text}"
    labels = [p["label"] for p in answer.json()["predictions"]]
    assert labels, answer.text

    removed = httpx.delete(f"{stack.balancer}/v1/classes/{name}", headers=auth, timeout=30)
    assert removed.status_code in (200, 204), f"DELETE through nginx: {removed.status_code} {removed.text}"
    for replica in stack.replicas:
        _wait_for(
            f"{name} gone from {replica}",
            lambda r=replica: (
                True if name not in _class_names(httpx.get(f"{r}/v1/classes", timeout=5).json()) else None
            ),
            PROPAGATION_TIMEOUT_S,
            stack.processes,
        )


def test_balancer_spreads_requests_and_hides_metrics(stack: Stack) -> None:
    before = [_route_count(httpx.get(f"{r}/metrics", timeout=5).text, "/v1/model") for r in stack.replicas]
    for _ in range(12):
        response = httpx.get(f"{stack.balancer}/v1/model", timeout=10)
        assert response.status_code == 200, response.text
        assert response.headers.get("x-request-id"), "nginx should tag every request with X-Request-ID"
    after = [_route_count(httpx.get(f"{r}/metrics", timeout=5).text, "/v1/model") for r in stack.replicas]
    served = [b - a for a, b in zip(before, after)]
    assert sum(served) == 12, f"replicas counted {served} /v1/model requests for 12 sent"
    assert all(n > 0 for n in served), f"the balancer sent every request to one replica: {served}"
    assert httpx.get(f"{stack.balancer}/metrics", timeout=5).status_code == 404


def test_prometheus_scrapes_both_replicas(stack: Stack) -> None:
    for replica in stack.replicas:
        assert httpx.get(f"{replica}/v1/classes", timeout=5).status_code == 200
    targets = {r.removeprefix("http://") for r in stack.replicas}

    def all_up() -> bool | None:
        rows = _prom_query(stack, f'up{{job="{render.API_JOB}"}}')
        up = {row["metric"]["instance"] for row in rows if row["value"][1] == "1"}
        return True if up == targets else None

    _wait_for("both replicas up in Prometheus", all_up, SCRAPE_TIMEOUT_S, stack.processes, interval=0.5)

    def counted() -> dict[str, float] | None:
        rows = _prom_query(stack, f'sum by (instance) (vlltr_request_duration_seconds_count{{job="{render.API_JOB}"}})')
        counts = {row["metric"]["instance"]: float(row["value"][1]) for row in rows}
        return counts if set(counts) == targets and all(v > 0 for v in counts.values()) else None

    counts = _wait_for("request counts of both replicas", counted, SCRAPE_TIMEOUT_S, stack.processes, interval=0.5)
    assert set(counts) == targets

    def redis_up() -> bool | None:
        rows = _prom_query(stack, f'vlltr_redis_up{{job="{render.API_JOB}"}}')
        return True if {row["metric"]["instance"] for row in rows if row["value"][1] == "1"} == targets else None

    _wait_for("vlltr_redis_up == 1 on both replicas", redis_up, SCRAPE_TIMEOUT_S, stack.processes, interval=0.5)
    replicas = {row["metric"].get("replica") for row in _prom_query(stack, f'up{{job="{render.API_JOB}"}}')}
    assert replicas == {"api-1", "api-2"}


def test_prometheus_evaluates_every_alert_rule(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        answer = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()
        rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        done = all(not rule.get("lastEvaluation", "").startswith("0001-") for rule in rules)
        return rules if rules and done else None

    rules = _wait_for("a first evaluation of every rule", evaluated, SCRAPE_TIMEOUT_S, stack.processes, interval=0.5)
    broken = {rule["name"]: rule.get("lastError") for rule in rules if rule.get("health") != "ok"}
    assert not broken, f"rules failing in Prometheus: {broken}"
    on_file = [
        expr
        for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
        for expr in metric_names.rules_exprs(yaml.safe_load(path.read_text(encoding="utf-8")))
    ]
    assert len(rules) == len(on_file), "Prometheus loaded a different number of rules than the file holds"


def test_dashboard_and_alert_metrics_exist_in_live_service(stack: Stack) -> None:
    # Traffic of every kind first, so labelled series have samples as well as type lines.
    httpx.post(f"{stack.balancer}/v1/classify", files={"file": ("x.png", _png(), "image/png")}, timeout=60)
    exposition = httpx.get(f"{stack.replicas[0]}/metrics", timeout=5)
    assert exposition.status_code == 200
    exposed = metric_names.exposed_names(exposition.text)
    used = metric_names.used_names(
        [DEPLOY / "grafana" / "dashboards" / "vlltr-service.json"],
        sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")),
    )
    assert len(used) >= 10, f"suspiciously few vlltr_* metrics found in the dashboard and rules: {sorted(used)}"
    missing = {name: sorted(files) for name, files in used.items() if name not in exposed}
    assert not missing, f"metrics used by deploy/ but absent from a live replica's /metrics: {missing}"
