"""The Redis embedding cache against real Redis: round trips, and the Redis-down path with recovery."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np

from vlltr.service.cache import RedisEmbeddingCache
from vlltr.service.metrics import Metrics
from vlltr.service.redis_link import RedisLink


def _lookups(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("vlltr_cache_lookups_total", {"result": result})


def test_redis_cache_round_trip(shared_redis_url):
    prefix = f"vlltr-test-{uuid.uuid4().hex[:12]}"

    async def main():
        metrics = Metrics(redis_enabled=True)
        link = RedisLink(shared_redis_url, timeout_s=1.0, retry_s=0.2, metrics=metrics)
        cache = RedisEmbeddingCache(link, prefix=prefix, dim=4, ttl_s=60, metrics=metrics)
        try:
            assert await cache.get("k") is None
            cache.put("k", np.arange(4, dtype=np.float32))
            await cache.close()  # waits for the background write
            got = await cache.get("k")
            assert got.tolist() == [0, 1, 2, 3]
            ttl = await link.client.ttl(f"{prefix}:emb:k")
            assert 0 < ttl <= 60
            await link.client.set(f"{prefix}:emb:bad", b"short")
            assert await cache.get("bad") is None  # wrong length: ignored, not trusted
        finally:
            await link.client.delete(f"{prefix}:emb:k", f"{prefix}:emb:bad")
            await link.close()
        return metrics

    metrics = asyncio.run(main())
    assert _lookups(metrics, "hit") == 1 and _lookups(metrics, "miss") == 2 and _lookups(metrics, "error") == 0


def test_redis_down_degrades_to_misses_and_recovers_by_itself(redis_server_factory):
    server = redis_server_factory()

    async def main():
        metrics = Metrics(redis_enabled=True)
        link = RedisLink(server.url, timeout_s=0.3, retry_s=0.1, metrics=metrics)
        link.start()
        cache = RedisEmbeddingCache(link, prefix="p", dim=2, ttl_s=60, metrics=metrics)
        value = np.ones(2, np.float32)
        cache.put("k", value)
        await cache.close()
        assert await cache.get("k") is not None
        server.stop()
        started = time.monotonic()
        assert await cache.get("k") is None  # the failing call: an error, not an exception
        assert not link.available()
        assert await cache.get("k") is None  # breaker open: skipped without network
        cache.put("k2", value)  # dropped silently while down
        assert time.monotonic() - started < 5
        up_while_down = metrics.registry.get_sample_value("vlltr_redis_up")
        server.start()
        for _ in range(100):  # the monitor pings every retry_s and closes the breaker
            if link.available():
                break
            await asyncio.sleep(0.05)
        assert link.available()
        cache.put("k", value)
        await cache.close()
        assert await cache.get("k") is not None
        up_after = metrics.registry.get_sample_value("vlltr_redis_up")
        await link.close()
        return metrics, up_while_down, up_after

    metrics, up_while_down, up_after = asyncio.run(main())
    assert up_while_down == 0 and up_after == 1
    assert _lookups(metrics, "error") == 2 and _lookups(metrics, "hit") == 2
