"""The image-embedding cache: Redis when configured, an in-process LRU otherwise.

What is cached is the image's raw encoder features, keyed by the image bytes' sha256 and the bundle id.
Features do not depend on the class table, so an entry stays valid when classes are added or removed, and
every request is re-scored against the current table: a cached answer can never be stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Protocol

import numpy as np

from vlltr.service.metrics import Metrics
from vlltr.service.redis_link import RedisLink

log = logging.getLogger(__name__)


class EmbeddingCache(Protocol):
    """What the serving path needs from a cache."""

    async def get(self, key: str) -> np.ndarray | None:
        """The cached features `[D]` float32, or None (miss, or the cache is unavailable)."""

    def put(self, key: str, features: np.ndarray) -> None:
        """Remember features; never blocks and never raises."""

    async def close(self) -> None:
        """Release resources (pending writes are awaited briefly)."""


def cache_key(bundle_id: str, digest: str) -> str:
    """The cache key of an image: bundle id + sha256 hex of its bytes."""
    return f"{bundle_id}:{digest}"


class LocalLRUCache:
    """A bounded in-process LRU; used from the event loop only, so it needs no lock."""

    def __init__(self, capacity: int, dim: int, metrics: Metrics | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.dim = dim
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> np.ndarray | None:
        value = self._data.get(key)
        if value is None:
            self._count("miss")
            return None
        self._data.move_to_end(key)
        self._count("hit")
        return value

    def put(self, key: str, features: np.ndarray) -> None:
        # A private read-only copy: the caller's array is a row of a whole batch output.
        value = np.array(features, dtype=np.float32, copy=True).reshape(-1)
        value.flags.writeable = False
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_lookups.labels(result=result).inc()


class RedisEmbeddingCache:
    """Features stored as raw float32 bytes under `{prefix}:emb:{key}` with a TTL.

    Redis errors never reach the caller: a failed or skipped look-up is a miss counted as `error`, and the
    link's breaker makes later requests skip Redis until it answers again.
    """

    def __init__(self, link: RedisLink, *, prefix: str, dim: int, ttl_s: int, metrics: Metrics | None = None) -> None:
        self.link = link
        self.prefix = prefix
        self.dim = dim
        self.ttl_s = ttl_s
        self._metrics = metrics
        self._pending: set[asyncio.Task[None]] = set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}:emb:{key}"

    async def get(self, key: str) -> np.ndarray | None:
        if not self.link.available():
            self._count("error")
            return None
        try:
            raw = await self.link.client.get(self._key(key))
        except Exception as exc:  # connection refused, timeout, protocol error: degrade to uncached
            self.link.failed(exc)
            self._count("error")
            return None
        if raw is None:
            self._count("miss")
            return None
        assert isinstance(raw, bytes)  # the client is made with decode_responses=False: never str
        if len(raw) != 4 * self.dim:  # written by another bundle layout or corrupted: ignore it
            self._count("miss")
            return None
        self._count("hit")
        return np.frombuffer(raw, dtype=np.float32)

    def put(self, key: str, features: np.ndarray) -> None:
        if not self.link.available():
            return
        data = np.ascontiguousarray(features, dtype=np.float32).reshape(-1).tobytes()
        task = asyncio.get_running_loop().create_task(self._write(self._key(key), data))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, key: str, data: bytes) -> None:
        try:
            await self.link.client.set(key, data, ex=self.ttl_s)
        except Exception as exc:
            self.link.failed(exc)

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=1.0)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_lookups.labels(result=result).inc()
