"""The in-process embedding cache: keys, LRU behaviour, private copies. tests/integration/test_cache.py runs
the Redis cache against real Redis servers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vlltr.service.cache import LocalLRUCache, cache_key
from vlltr.service.metrics import Metrics


def _lookups(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("vlltr_cache_lookups_total", {"result": result})


def test_cache_key_separates_bundles():
    assert cache_key("b1", "abc") != cache_key("b2", "abc")


def test_lru_evicts_the_least_recently_used_and_counts():
    async def main():
        metrics = Metrics()
        cache = LocalLRUCache(2, dim=3, metrics=metrics)
        a, b, c = (np.full(3, v, np.float32) for v in (1, 2, 3))
        cache.put("a", a)
        cache.put("b", b)
        assert (await cache.get("a"))[0] == 1  # a is now the most recent
        cache.put("c", c)  # evicts b
        assert await cache.get("b") is None
        assert (await cache.get("c"))[0] == 3 and (await cache.get("a"))[0] == 1
        assert len(cache) == 2
        return metrics

    metrics = asyncio.run(main())
    assert _lookups(metrics, "hit") == 3 and _lookups(metrics, "miss") == 1


def test_lru_stores_a_private_read_only_copy():
    async def main():
        cache = LocalLRUCache(4, dim=2)
        batch = np.array([[1, 2], [3, 4]], np.float32)
        cache.put("k", batch[1])
        batch[1] = 0  # the batch buffer is reused by the next batch
        got = await cache.get("k")
        assert got.tolist() == [3, 4]
        with pytest.raises(ValueError):
            got[0] = 9

    asyncio.run(main())
