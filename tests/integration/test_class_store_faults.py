"""The class store under faults, with real `vlltr serve` processes and private `redis-server`s:

* a replica starting, and starting while its store is unreachable: no route ever answers 500;
* Redis restarted from an older append-only file, or flushed and refilled, then a new add: every replica
  converges to the store's content within 2 s;
* malformed records in the store: start-up completes, they are listed as quarantined, the others serve;
* Redis killed (SIGKILL) right after a 201, in the shipped persistence configuration: the class is there;
* Redis busy longer than the request path's timeout (a slow fsync): an add waits for it and succeeds;
* `vlltr serve --host 0.0.0.0` without an admin token refuses to start unless told class changes may be open.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.deploy import shipped_redis_flags
from support.paths import PYTHON, REPO
from support.processes import RedisServer, ServerProcess

TOKEN = "store-faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _metric(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def _added(url: str) -> list[str]:
    r = httpx.get(f"{url}/v1/classes", timeout=30)
    assert r.status_code == 200, r.text
    return [c["name"] for c in r.json()["classes"] if c["source"] == "added"]


def _add(url: str, name: str, descriptions: list[str] | None = None) -> httpx.Response:
    body = {"name": name, "descriptions": descriptions or [f"a class called {name}"]}
    return httpx.post(f"{url}/v1/classes", json=body, headers=AUTH, timeout=60)


def _image(bundle) -> bytes:
    data = bundle.parent / "run" / "data"
    first = next(line for line in (data / "test.txt").read_text().split("\n") if line)
    return (data / first.split()[0]).read_bytes()


def _wait(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (httpx.HTTPError, KeyError, AssertionError):
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- no 500 while starting ---------------------------------------------------------------------------------


def _every_route(image: bytes) -> list[tuple[str, str, dict]]:
    ndjson = {"content": b'{"name": "imported", "descriptions": ["x"]}\n', "headers": AUTH}
    return [
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/v1/model", {}),
        ("GET", "/v1/classes", {}),
        ("GET", "/v1/classes/export", {"headers": AUTH}),
        ("POST", "/v1/classes", {"json": {"name": "while starting", "descriptions": ["x"]}, "headers": AUTH}),
        ("POST", "/v1/classes/bulk", {"json": {"classes": [{"name": "bulk", "descriptions": ["y"]}]}, "headers": AUTH}),
        ("POST", "/v1/classes/import", ndjson),
        ("DELETE", "/v1/classes/never-added", {"headers": AUTH}),
        ("POST", "/v1/classify", {"files": {"file": ("x.png", image)}}),
        ("POST", "/v1/classify/batch", {"files": [("files", ("x.png", image)), ("files", ("y.png", image))]}),
    ]


def test_no_route_answers_500_while_a_replica_starts_with_its_store_unreachable(service_bundle, free_port, tmp_path):
    redis_port = free_port()  # nothing listens there yet: the store is unreachable at start
    env = {
        "VLLTR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "VLLTR_REDIS_RETRY_S": "0.2",
        "VLLTR_ADMIN_TOKEN": TOKEN,
        "VLLTR_REDIS_PREFIX": "starting",
    }
    server = ServerProcess(env, ["--bundle", str(service_bundle)], tmp_path)
    redis = RedisServer(redis_port, tmp_path)
    routes = _every_route(_image(service_bundle))
    seen: list[tuple[str, str, int, float]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                for method, path, kwargs in routes:
                    try:
                        r = c.request(method, path, **kwargs)
                    except httpx.TransportError:
                        continue  # not listening yet
                    seen.append((method, path, r.status_code, time.monotonic()))

    starting = threading.Thread(target=server.start, kwargs={"timeout": 120}, daemon=True)
    poller = threading.Thread(target=poll, daemon=True)
    try:
        starting.start()
        poller.start()
        # Serving HTTP, the store unreachable: watch it for a while before the store comes.
        _wait(lambda: any(p == "/v1/classes" and s == 503 for _, p, s, _ in seen), "503 from /v1/classes", 60)
        time.sleep(3.0)
        unreachable_until = time.monotonic()
        redis.start()
        starting.join(120)
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, server.log()
        time.sleep(1.0)
    finally:
        stop.set()
        poller.join(60)
        server.stop()
        redis.stop()
    errors = [(m, p, s) for m, p, s, _ in seen if s >= 500 and s != 503]
    assert errors == [], errors[:10]
    during = {(m, p): s for m, p, s, t in seen if t < unreachable_until}
    for route in ("/v1/model", "/v1/classes", "/v1/classify"):
        assert any(p == route and s == 503 for (_, p), s in during.items()), (route, during)
    assert during[("GET", "/healthz")] == 200
    after = [(m, p, s) for m, p, s, t in seen if t > unreachable_until + 1 and p == "/v1/classes" and m == "GET"]
    assert after and after[-1][2] == 200
    assert len({(m, p) for m, p, _, _ in seen}) == len(routes)


# ---- converging after the store lost or changed its history ----------------------------------------------


def _store_content(url: str, prefix: str) -> tuple[list[str], int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        records = [json.loads(v) for v in client.hgetall(f"{prefix}:added-classes:records").values()]
        version = int(client.hget(f"{prefix}:added-classes:meta", "version") or 0)
    finally:
        client.close()
    return [r["name"] for r in sorted(records, key=lambda r: r["seq"])], version


def _converged(replicas, redis_url: str, prefix: str, since: float) -> list[float]:
    """Seconds after `since` at which each replica served exactly the store's classes and version."""
    names, version = _store_content(redis_url, prefix)
    times = []
    for r in replicas:

        def agrees(r=r) -> bool:
            body = httpx.get(f"{r.url}/v1/classes", timeout=10).json()
            added = [c["name"] for c in body["classes"] if c["source"] == "added"]
            return added == names and body["class_table_version"] == version

        _wait(agrees, f"{r.url} to serve the store's content {names} at version {version}", timeout=10)
        times.append(time.monotonic() - since)
    return times


@pytest.fixture
def pair(service_bundle, server_factory, persistent_redis_factory, tmp_path_factory):
    redis = persistent_redis_factory()
    prefix = f"converge-{uuid.uuid4().hex[:6]}"
    env = {"VLLTR_REDIS_URL": redis.url, "VLLTR_REDIS_PREFIX": prefix, "VLLTR_ADMIN_TOKEN": TOKEN}
    replicas = [
        server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp(f"conv-{i}"))
        for i in range(2)
    ]
    yield redis, prefix, replicas
    for r in replicas:
        r.stop()


def test_replicas_converge_after_redis_comes_back_from_an_older_aof_and_after_a_flush(pair):
    """With the product's sync settings (poll every 0.5 s, pub/sub, reconnect check every second)."""
    redis, prefix, (a, b) = pair
    for name in ("first", "second"):
        assert _add(a.url, name).status_code == 201
    _converged([a, b], redis.url, prefix, time.monotonic())
    aof = redis.workdir / "appendonlydir"
    backup = redis.workdir.parent / f"{redis.workdir.name}-aof-backup"
    shutil.copytree(aof, backup)  # the append-only file as it was with two classes
    for name in ("third", "fourth"):
        assert _add(b.url, name).status_code == 201
    assert _converged([a, b], redis.url, prefix, time.monotonic()) and _added(a.url)[-1] == "fourth"
    redis.stop()
    shutil.rmtree(aof)
    shutil.copytree(backup, aof)
    redis.start()  # Redis back with an older state: "third" and "fourth" are lost
    for r in (a, b):
        _wait(lambda r=r: _metric(r.url, "vlltr_redis_up") == 1, "the replicas to reconnect")
    r = _add(a.url, "fifth")
    added_at = time.monotonic()
    assert r.status_code == 201, r.text
    times = _converged([a, b], redis.url, prefix, added_at)
    assert _store_content(redis.url, prefix)[0] == ["first", "second", "fifth"]
    print(f"replicas converged {[round(t, 2) for t in times]} s after the add that followed an older AOF")
    assert max(times) <= 2.0, times

    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    client.flushall()  # everything gone; then the store is refilled
    client.close()
    r = _add(b.url, "after the flush")
    added_at = time.monotonic()
    assert r.status_code == 201, r.text
    times = _converged([a, b], redis.url, prefix, added_at)
    print(f"replicas converged {[round(t, 2) for t in times]} s after the add that followed a flush")
    assert _added(a.url) == ["after the flush"] and max(times) <= 2.0, times
    assert "no longer in the store" in a.log(tail=None) and "'fifth'" in a.log(tail=None)


# ---- quarantine ----------------------------------------------------------------------------------------------


def test_malformed_records_are_quarantined_and_the_others_serve(
    service_bundle, server_factory, redis_server_factory, tmp_path
):
    redis = redis_server_factory()
    prefix = "quarantine"
    env = {"VLLTR_REDIS_URL": redis.url, "VLLTR_REDIS_PREFIX": prefix, "VLLTR_ADMIN_TOKEN": TOKEN}
    first = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path)
    for name in ("good one", "good two"):
        assert _add(first.url, name).status_code == 201
    first.stop()
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    client.hset(f"{prefix}:added-classes:records", "broken", "{this is not json")
    client.hset(f"{prefix}:added-classes:records", "a/b", json.dumps({"seq": 9, "name": "a/b", "descriptions": ["x"]}))
    client.close()
    replica = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path)
    body = httpx.get(f"{replica.url}/v1/classes", timeout=10).json()
    assert [c["name"] for c in body["classes"] if c["source"] == "added"] == ["good one", "good two"]
    assert {q["key"] for q in body["quarantined"]} == {"broken", "a/b"}
    assert _metric(replica.url, "vlltr_class_records", state="quarantined") == 2
    assert "quarantined" in replica.log(tail=None)
    exported = httpx.get(f"{replica.url}/v1/classes/export", headers=AUTH, timeout=10).text
    assert "{this is not json" in exported  # a backup keeps them
    r = _add(replica.url, "broken")  # the name is held by the unreadable record
    assert r.status_code == 409 and "quarantined" in r.json()["error"]["message"]
    assert httpx.delete(f"{replica.url}/v1/classes/broken", headers=AUTH, timeout=10).status_code == 200
    assert _add(replica.url, "broken").status_code == 201
    replica.stop()


# ---- durability in the shipped configuration -------------------------------------------------------------------


def test_a_class_acknowledged_just_before_redis_is_killed_is_there_after_the_restart(
    service_bundle, server_factory, persistent_redis_factory, tmp_path
):
    redis = persistent_redis_factory()  # exactly the flags docker-compose.yml and the k8s StatefulSet ship
    assert shipped_redis_flags() == ["--appendonly", "yes", "--appendfsync", "always"]
    import redis as redis_py

    prefix = "durable"
    env = {
        "VLLTR_REDIS_URL": redis.url,
        "VLLTR_REDIS_PREFIX": prefix,
        "VLLTR_ADMIN_TOKEN": TOKEN,
        "VLLTR_REDIS_RETRY_S": "0.2",
    }
    server = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path)
    assert "an add survives kill -9 of Redis and a power loss" in server.log(tail=None)
    acknowledged = []
    for i in range(5):
        r = _add(server.url, f"acknowledged {i}")
        assert r.status_code == 201, (i, r.text, server.log()[-4000:])
        redis.stop()  # SIGKILL, right after the 201
        acknowledged.append(f"acknowledged {i}")
        redis.start()
        client = redis_py.Redis.from_url(redis.url)
        names = [json.loads(v)["name"] for v in client.hgetall(f"{prefix}:added-classes:records").values()]
        client.close()
        assert sorted(names) == sorted(acknowledged)
        _wait(lambda: _metric(server.url, "vlltr_redis_up") == 1, "the replica to reconnect")
    _wait(lambda: _added(server.url) == acknowledged, "the replica to serve every acknowledged class")
    server.stop()


def test_an_add_waits_for_a_redis_busy_longer_than_the_request_path_timeout(
    service_bundle, server_factory, persistent_redis_factory, tmp_path
):
    # With `appendfsync always` each add waits for an fsync, which a busy disk can stretch past the request
    # path's Redis timeout (0.25 s). Redis kept busy for 0.8 s by a script stands in for that slow fsync: the
    # add must wait for it and succeed, not fail with 503 for a write Redis then completes.
    redis = persistent_redis_factory()
    import redis as redis_py

    env = {"VLLTR_REDIS_URL": redis.url, "VLLTR_REDIS_PREFIX": "busy", "VLLTR_ADMIN_TOKEN": TOKEN}
    server = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path)
    assert _add(server.url, "before the busy spell").status_code == 201

    def busy() -> None:
        client = redis_py.Redis.from_url(redis.url)
        spin = (
            "local t0 = redis.call('TIME') "
            "repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1e6 + (t[2] - t0[2]) > 800000"
        )
        client.eval(spin, 0)
        client.close()

    spinner = threading.Thread(target=busy)
    spinner.start()
    time.sleep(0.1)  # the script has started: Redis answers nothing else until it ends
    started = time.monotonic()
    r = _add(server.url, "during the busy spell")
    waited = time.monotonic() - started
    spinner.join()
    assert r.status_code == 201, r.text
    assert waited > 0.25  # it did wait past the request path's timeout
    assert _metric(server.url, "vlltr_redis_up") == 1
    assert sorted(_added(server.url)) == ["before the busy spell", "during the busy spell"]
    server.stop()


# ---- safe by default -------------------------------------------------------------------------------------------


def _serve(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLTR_")}
    full.update(env)
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run(
        [PYTHON, "-m", "vlltr.cli", "serve", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout
    )


def test_listening_on_all_interfaces_without_a_token_needs_the_explicit_opt_out(
    service_bundle, server_factory, free_port, tmp_path
):
    cache = {"VLLTR_CACHE_DIR": str(tmp_path / "cache")}
    refused = _serve(["--bundle", str(service_bundle), "--host", "0.0.0.0", "--port", str(free_port())], cache)
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr.strip()
    assert message.startswith("vlltr serve: refusing to listen on 0.0.0.0 without an admin token")
    assert "VLLTR_ADMIN_TOKEN" in message and "--allow-open-class-changes" in message
    assert len(message.splitlines()) == 1
    refused = _serve(["--bundle", str(service_bundle), "--host", "10.1.2.3", "--port", str(free_port())], cache)
    assert refused.returncode == 2 and "refusing to listen on 10.1.2.3" in refused.stderr

    opened = server_factory(
        args=["--bundle", str(service_bundle), "--host", "0.0.0.0", "--allow-open-class-changes"], workdir=tmp_path
    )
    assert "class changes are open: listening on 0.0.0.0 without an admin token" in opened.log(tail=None)
    assert _add(opened.url, "open to all").status_code == 201
    opened.stop()
    by_env = server_factory(
        env={"VLLTR_ALLOW_OPEN_CLASS_CHANGES": "1"},
        args=["--bundle", str(service_bundle), "--host", "0.0.0.0"],
        workdir=tmp_path,
    )
    assert "class changes are open" in by_env.log(tail=None)
    by_env.stop()
    tokened = server_factory(
        env={"VLLTR_ADMIN_TOKEN": TOKEN}, args=["--bundle", str(service_bundle), "--host", "0.0.0.0"], workdir=tmp_path
    )
    assert "class changes are open" not in tokened.log(tail=None)
    tokened.stop()
