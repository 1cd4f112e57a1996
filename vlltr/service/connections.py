"""The HTTP server's side of slow clients: a bound on open connections and a deadline for each request head.

Neither can live in the ASGI app, which sees a request only once its head has been parsed, so both sit in the
uvicorn protocol (`GuardedHttpToolsProtocol`, the httptools protocol `vlltr serve` runs, with two additions):

- **Connection bound.** A connection accepted while `max_connections` are already open is answered at once with
  a 503 (`too_many_connections`, `Retry-After`, `Connection: close`), its write side is shut, and it is closed as
  soon as the client closes its side or after `REFUSED_LINGER_S`, whichever comes first, reading and dropping
  whatever the client sends meanwhile, so it gets to read the answer instead of a reset. uvicorn's own
  `limit_concurrency` does not bound connections: it answers 503 only once a request's head is complete, counts
  connections that never send one without ever refusing them, and keeps the refused connection alive.
- **Head deadline.** A request's line and headers must arrive within `header_read_timeout_s`, counted from the
  connection's opening, or, for a later request on a kept-alive connection, from the first byte after the last
  answer (the idle time before that is uvicorn's `timeout_keep_alive`). Past it the connection is closed, after
  a 408 when part of a request had arrived (a connection that never sent a byte is closed without one, as
  uvicorn closes idle kept-alive connections). uvicorn has no such deadline (its issue #157 lists it, never
  added; every byte received cancels its keep-alive timer): without it a client trickling a header a second,
  or the rest of a body that was answered early, holds a connection, and with the bound a slot, forever.

The stalled body, which reaches the app, is timed out there (`vlltr.service.body_timeout`). `uvicorn_options`
puts it all together for `uvicorn.run` or `uvicorn.Config`, after raising the process's open-file limit
(`fit_open_file_limit`) so that the bound can be reached without running out of descriptors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vlltr.service.api.errors import HTTP_ERRORS, envelope
from vlltr.service.metrics import Metrics
from vlltr.service.settings import Settings

log = logging.getLogger(__name__)

# Descriptors kept free for everything but client connections: the listening socket, the event loop's own,
# Redis connections, files and pipes the process opens (an idle server holds a few dozen).
RESERVED_FDS = 128
REFUSED_LINGER_S = 1.0  # longest a refused connection stays open for the client to read its 503


def _raw_response(code: str, message: str, extra: list[tuple[str, str]]) -> bytes:
    # An answer written straight to the socket (no request reached the app): the error envelope, with the
    # status the error table gives `code`, and the connection closed after it.
    status = HTTP_ERRORS[code].status
    body = json.dumps(envelope(code, message)).encode("utf-8")
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    lines = [*head, f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in extra]
    lines += ["connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection bound and the head deadline (module docstring).

    The class attributes are set on a subclass per server by `protocol_class`.
    """

    max_connections: ClassVar[int] = 4096
    header_timeout_s: ClassVar[float] = 10.0
    retry_after_s: ClassVar[int] = 1
    metrics: ClassVar[Metrics | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._counted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False  # a request whose head is awaited has begun (not just stray bytes)
        self._linger: asyncio.TimerHandle | None = None

    # ---- the connection bound -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._counted = True
        if self.metrics is not None:
            self.metrics.connections.inc()
        self._arm_head_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        if self.metrics is not None:
            self.metrics.connections_refused.inc()
        transport.write(
            _raw_response(
                "too_many_connections",
                f"the server holds as many connections as it may ({self.max_connections}); retry later",
                [("retry-after", str(self.retry_after_s))],
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = self.loop.call_later(REFUSED_LINGER_S, transport.close)
        else:
            transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a request its parser rejects in plain text; every error of this service is the JSON
        # envelope, so clients (and the OpenAPI document) see one error shape whatever refused the request.
        self.transport.write(_raw_response("bad_request", f"the request is not valid HTTP: {msg}", []))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped: the answer is already on its way
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            # The first bytes since the last answer: the next request's head (or what is left of a body the
            # answer did not wait for) is due within the deadline, however slowly it trickles in.
            self._arm_head_timer()
        super().data_received(data)

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._refused:
            return
        self._disarm_head_timer()
        super().connection_lost(exc)
        if self._counted:
            self._counted = False
            if self.metrics is not None:
                self.metrics.connections.dec()

    # ---- the head deadline ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a request pipelined behind one still being answered: its own deadline
            self._arm_head_timer()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_begun = False
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.metrics is not None:
            self.metrics.read_timeouts.labels(stage="head").inc()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's head stalled behind one still being answered: that answer ends the
            # connection instead of a 408 written into the middle of it.
            self.cycle.keep_alive = False
            return
        if self._head_begun:
            self.transport.write(
                _raw_response(
                    "timeout",
                    f"the request head did not arrive within {self.header_timeout_s:g} s (the header read timeout)",
                    [],
                )
            )
        self.transport.close()


def protocol_class(settings: Settings, metrics: Metrics | None, max_connections: int) -> type[HttpToolsProtocol]:
    """A `GuardedHttpToolsProtocol` subclass for one server's settings (pass it as uvicorn's `http`)."""
    attrs = {
        "max_connections": max_connections,
        "header_timeout_s": settings.header_read_timeout_s,
        "retry_after_s": settings.retry_after_s,
        "metrics": metrics,
    }
    return type("VlltrHttpProtocol", (GuardedHttpToolsProtocol,), attrs)


def fit_open_file_limit(max_connections: int) -> int:
    """Raise this process's soft open-file limit to hold `max_connections` plus `RESERVED_FDS` (up to the hard
    limit); return how many connections fit under the limit in force (at most `max_connections`, at least 1)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a sandbox may refuse; keep what we have
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - RESERVED_FDS))


def uvicorn_options(settings: Settings, metrics: Metrics | None) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that serve with these limits (one server process).

    Raises the open-file limit first; the connection bound in force is logged and exported as
    `vlltr_http_connections_limit`.
    """
    limit = fit_open_file_limit(settings.max_connections)
    if limit < settings.max_connections:
        log.warning(
            "max_connections lowered from %d to %d: the open-file limit is %d (hard limit %d) and %d descriptors "
            "are kept for the service itself; raise the limit (ulimit -n) to allow more",
            settings.max_connections,
            limit,
            *resource.getrlimit(resource.RLIMIT_NOFILE),
            RESERVED_FDS,
        )
    log.info(
        "at most %d client connections; request heads within %g s, no pause in a body over %g s",
        limit,
        settings.header_read_timeout_s,
        settings.body_read_timeout_s,
    )
    if metrics is not None:
        metrics.connections_limit.set(limit)
    return {
        "http": protocol_class(settings, metrics, limit),
        "loop": "uvloop",
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
    }
