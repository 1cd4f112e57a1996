"""Replicas sharing Redis (class changes propagate, the cache is never stale) and a Redis outage during a
stream of requests (nothing fails; the cache comes back by itself). Real server processes throughout.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

TOP_ALL = 50


def _images(bundle, n):
    data = bundle.parent / "run" / "data"
    lines = [line for line in (data / "test.txt").read_text().split("\n") if line][:n]
    return [(data / line.split()[0]).read_bytes() for line in lines]


def _metric(client: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name}{labels} not exported")


def _classify(client, data, top_k=TOP_ALL):
    r = client.post("/v1/classify", params={"top_k": top_k}, files={"file": ("img.png", data)})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def replicas(service_bundle, server_factory, shared_redis_url, tmp_path_factory):
    prefix = f"vlltr-test-{uuid.uuid4().hex[:12]}"  # private keys on the shared Redis; never flushed
    env = {"VLLTR_REDIS_URL": shared_redis_url, "VLLTR_REDIS_PREFIX": prefix}
    a = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("replica-a"))
    b = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("replica-b"))
    try:
        yield a, b, prefix
    finally:
        a.stop()
        b.stop()
        import redis

        client = redis.Redis.from_url(shared_redis_url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def test_a_class_added_on_one_replica_is_served_by_the_other_within_a_second(replicas, service_bundle):
    a, b, _ = replicas
    image = _images(service_bundle, 1)[0]
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        assert ca.get("/v1/model").json()["class_table_version"] == cb.get("/v1/model").json()["class_table_version"]
        r = ca.post("/v1/classes", json={"name": "replicated", "descriptions": ["a class for every replica"]})
        assert r.status_code == 201, r.text
        added_at = time.monotonic()
        version = r.json()["class_table_version"]
        seen = None
        while time.monotonic() - added_at < 1.0:
            body = _classify(cb, image)
            if body["class_table_version"] >= version:
                seen = body
                break
            time.sleep(0.02)
        assert seen is not None, "replica b did not serve the new class table within one second"
        assert "replicated" in [p["label"] for p in seen["predictions"]]
        names_b = [c["name"] for c in cb.get("/v1/classes").json()["classes"]]
        assert "replicated" in names_b
        # Both replicas give the same scores for the same image against the same table.
        scores_a = {p["label"]: p["score"] for p in _classify(ca, image)["predictions"]}
        scores_b = {p["label"]: p["score"] for p in seen["predictions"]}
        assert scores_a.keys() == scores_b.keys()
        for label in scores_a:
            assert scores_a[label] == pytest.approx(scores_b[label], abs=1e-5)


def _race(urls: list[str], bodies: list[dict]) -> list[int]:
    barrier = threading.Barrier(len(urls))
    statuses: list[int] = []
    lock = threading.Lock()

    def add(url: str, body: dict) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait()
            r = c.post("/v1/classes", json=body)
            with lock:
                statuses.append(r.status_code)

    threads = [threading.Thread(target=add, args=(url, body)) for url, body in zip(urls, bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(statuses)


def test_identical_adds_racing_on_two_replicas_give_one_class_and_all_succeed(replicas):
    """A client retrying an add (or two clients adding the same class) through different replicas: one class,
    every add a success (201 for the one that stored it, 200 for the others); other descriptions: 409."""
    a, b, _ = replicas
    for round_ in range(3):
        body = {"name": f"Contested {round_}", "descriptions": ["added by whoever comes first"]}
        assert _race([a.url, b.url] * 4, [body] * 8) == [200] * 7 + [201]
        for url in (a.url, b.url):
            r = httpx.post(f"{url}/v1/classes", json=body, timeout=30)  # a retry: the same answer, 200
            assert r.status_code == 200 and r.json()["created"] is False, r.text
            r = httpx.post(f"{url}/v1/classes", json={**body, "descriptions": ["something else"]}, timeout=30)
            assert r.status_code == 409, r.text
        for url in (a.url, b.url):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                names = [c["name"] for c in httpx.get(f"{url}/v1/classes", timeout=30).json()["classes"]]
                if names.count(body["name"]) == 1:
                    break
                time.sleep(0.05)
            assert names.count(body["name"]) == 1


def test_cached_results_are_never_stale_after_a_class_change(replicas, service_bundle):
    a, b, _ = replicas
    image = _images(service_bundle, 3)[2]
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        first = _classify(ca, image)  # a computes the embedding and caches it in the shared Redis
        hits_before = _metric(cb, "vlltr_cache_lookups_total", result="hit")
        again = _classify(cb, image)  # b finds it in Redis
        assert _metric(cb, "vlltr_cache_lookups_total", result="hit") == hits_before + 1
        assert again["class_table_version"] == first["class_table_version"]

        r = cb.post("/v1/classes", json={"name": "late arrival", "descriptions": ["added after caching"]})
        assert r.status_code == 201
        version = r.json()["class_table_version"]
        hits = _metric(ca, "vlltr_cache_lookups_total", result="hit")
        deadline = time.monotonic() + 5
        while True:
            after = _classify(ca, image)  # a cache hit, re-scored against the current table
            if after["class_table_version"] >= version or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert after["class_table_version"] >= version
        assert _metric(ca, "vlltr_cache_lookups_total", result="hit") > hits
        labels = [p["label"] for p in after["predictions"]]
        assert "late arrival" in labels and len(labels) == len(first["predictions"]) + 1
        # Old classes keep their relative order; their probabilities shrink to make room for the new one.
        old = {p["label"]: p["score"] for p in first["predictions"]}
        new = {p["label"]: p["score"] for p in after["predictions"]}
        assert all(new[label] <= old[label] + 1e-6 for label in old)


def test_redis_down_during_a_stream_fails_nothing_and_the_cache_recovers(
    service_bundle, server_factory, redis_server_factory, tmp_path_factory
):
    redis_server = redis_server_factory()
    env = {"VLLTR_REDIS_URL": redis_server.url, "VLLTR_REDIS_RETRY_S": "0.2"}
    server = server_factory(
        env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("redis-outage")
    )
    images = _images(service_bundle, 4)
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def stream() -> None:
        nonlocal done
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                try:
                    r = c.post("/v1/classify", files={"file": ("x.png", images[i % len(images)])})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                done += 1
                i += 1

    workers = [threading.Thread(target=stream) for _ in range(3)]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        try:
            for w in workers:
                w.start()
            _wait_for(lambda: _metric(c, "vlltr_cache_lookups_total", result="hit") > 10, "cache hits before")
            assert _metric(c, "vlltr_redis_up") == 1
            redis_server.stop()
            _wait_for(lambda: _metric(c, "vlltr_redis_up") == 0, "redis_up to drop")
            errors = _metric(c, "vlltr_cache_lookups_total", result="error")
            served = done
            _wait_for(lambda: done > served + 20, "requests served while Redis is down")
            assert _metric(c, "vlltr_cache_lookups_total", result="error") > errors
            redis_server.start()
            _wait_for(lambda: _metric(c, "vlltr_redis_up") == 1, "redis_up to recover")
            hits = _metric(c, "vlltr_cache_lookups_total", result="hit")
            _wait_for(lambda: _metric(c, "vlltr_cache_lookups_total", result="hit") > hits + 5, "cache hits after")
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        assert c.get("/readyz").status_code == 200
    assert failures == []
    assert done > 50
    server.stop()


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
