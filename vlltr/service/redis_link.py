"""One Redis connection pool shared by the cache and the class store, behind a circuit breaker.

Request-path calls use short socket timeouts and no retries. After a failure the breaker opens: callers
skip Redis (`available()` is False) instead of waiting on it, and a background task pings every
`retry_s` until Redis answers again, then closes the breaker. `vlltr_redis_up` follows the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError

from vlltr.service.metrics import Metrics

log = logging.getLogger(__name__)


def make_client(
    url: str, timeout: float | None, connect_timeout: float, *, reconnect_once: bool = False
) -> aioredis.Redis:
    """An asyncio Redis client without retries (a slow or dead Redis must never stall a request).

    With `reconnect_once`, a command that fails on a broken connection is sent once more on a new one (never
    after a timeout): after Redis restarts, every pooled connection is dead although Redis answers again, and
    without this each of them fails one command of the class store and reopens the breaker. The store's
    commands may be repeated (adds and removals are idempotent, the rest are reads).
    """
    if reconnect_once:
        return aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
            retry_on_error=[ConnectionError],
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=False,
        )
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        decode_responses=False,
    )


class RedisLink:
    """Redis clients plus the breaker state; `failed()`/`succeeded()` are reported by their users.

    `client` serves the request path (the embedding cache) with a short timeout, so a slow Redis never stalls a
    classify request; `store_client` serves the class store with a longer one, because each class write is
    fsynced by the shipped Redis (`appendfsync always`) and one fsync on a busy disk can outlast the short
    timeout, which would fail an add that Redis then completes (`store_timeout_s`, default `timeout_s`), and it
    reconnects once on a broken connection. Both share one breaker.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        retry_s: float,
        store_timeout_s: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.url = url
        self.client = make_client(url, timeout_s, timeout_s)
        self.store_client = make_client(
            url, store_timeout_s if store_timeout_s is not None else timeout_s, max(timeout_s, 1.0), reconnect_once=True
        )
        self.retry_s = retry_s
        self._metrics = metrics
        self._up = True
        self._down_since = 0.0
        # Times Redis came back after failing: a reader of the class store reloads everything when it changes
        # (a Redis that restarted may have come back with other data).
        self.generation = 0
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False

    def available(self) -> bool:
        """True when callers should try Redis."""
        return self._up

    def failed(self, exc: BaseException) -> None:
        """Open the breaker after an error; the monitor task closes it when Redis answers again."""
        if self._up:
            self._up = False
            self._down_since = time.monotonic()
            log.warning(
                "Redis at %s failed (%s: %s); serving without it until it answers again",
                safe_url(self.url),
                type(exc).__name__,
                exc,
            )
        if self._metrics is not None:
            self._metrics.set_redis_up(False)

    def succeeded(self) -> None:
        """Close the breaker."""
        if not self._up:
            log.warning(
                "Redis at %s answers again after %.1f s", safe_url(self.url), time.monotonic() - self._down_since
            )
            self.generation += 1
        self._up = True
        if self._metrics is not None:
            self._metrics.set_redis_up(True)

    async def ping(self) -> bool:
        """Ping once, updating the breaker."""
        try:
            await self.client.ping()
        except Exception as exc:  # any failure means "not usable now"
            self.failed(exc)
            return False
        self.succeeded()
        return True

    def start(self) -> None:
        """Start the background task that re-checks Redis while the breaker is open."""
        self._monitor = asyncio.create_task(self._watch(), name="vlltr-redis-monitor")

    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.retry_s)
            if not self._up:
                # Pooled connections to a Redis that went away are dead even once a new one answers on the same
                # address; without this, each of them fails once after the restart and reopens the breaker.
                await self._drop_idle_connections()
                await self.ping()

    async def _drop_idle_connections(self) -> None:
        for client in self._clients():
            try:
                await client.connection_pool.disconnect(inuse_connections=False)
            except Exception as exc:  # closing sockets to a dead server may fail; they are dropped either way
                log.debug("dropping idle Redis connections: %s", exc)

    def _clients(self) -> list[aioredis.Redis]:
        return [self.client, self.store_client]

    async def close(self) -> None:
        """Stop the monitor and close the pool."""
        self._closing = True
        monitor = self._monitor
        # Cancel until it has ended: a cancellation landing inside the client's ping can be absorbed there.
        while monitor is not None and not monitor.done():
            monitor.cancel()
            await asyncio.wait({monitor}, timeout=0.2)
        if monitor is not None and not monitor.cancelled():
            monitor.exception()
        for client in self._clients():
            try:
                await client.aclose()
            except Exception:  # closing a pool to a dead server may raise; nothing to do about it
                pass


def safe_url(url: str) -> str:
    """The URL without a password that may be part of it (for logs)."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
