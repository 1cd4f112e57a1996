"""A read timeout for request bodies: an ASGI middleware around `receive`.

uvicorn has no timeout while a request body arrives (`timeout_keep_alive` runs only between requests, and
the request-start and request-complete timeouts of uvicorn issue #157 were never added), so a client that
sends its headers and a little of its body, then nothing, would hold its connection, its request task and
its share of the body budget for as long as it likes. Here each `receive()` that waits for more of the body
may wait at most `timeout_s`: a pause longer than that raises `BodyReadTimeout`, which the error handlers
answer 408 (code `timeout`), and the answer carries `Connection: close`, so the server closes the connection
once it is sent instead of keeping it alive for the next request. Only pauses count (the clock restarts with
every piece of body that arrives), so a large upload over a slow but steady link is not cut off.

Once the body is complete, `receive()` is passed through untouched: what waits on it then is a response
watching for the client going away, which must not time out.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlltr.service.api.errors import ApiError
from vlltr.service.metrics import Metrics


class BodyReadTimeout(ApiError):
    """The client paused longer than the body read timeout while sending the request body (408)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            "timeout",
            f"the request body stalled: nothing arrived for {timeout_s:g} s (the body read timeout); "
            "send the whole body without pausing",
        )


class BodyTimeoutMiddleware:
    """Times out stalled request bodies (see the module docstring).

    Args:
        app: the ASGI app.
        timeout_s: longest wait for the next piece of a request body.
        metrics: optional; each timeout counts in `vlltr_http_read_timeouts_total{stage="body"}`.
    """

    def __init__(self, app: ASGIApp, timeout_s: float, metrics: Metrics | None = None) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout_s = self.timeout_s
        state = {"complete": False, "timed_out": False}

        async def timed_receive() -> Message:
            if state["complete"]:
                return await receive()
            if state["timed_out"]:  # the app asks again after the timeout: the body will not come
                return {"type": "http.disconnect"}
            try:
                async with asyncio.timeout(timeout_s):
                    message = await receive()
            except TimeoutError:
                state["timed_out"] = True
                if self.metrics is not None:
                    self.metrics.read_timeouts.labels(stage="body").inc()
                raise BodyReadTimeout(timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["complete"] = True
            return message

        async def closing_send(message: Message) -> None:
            if state["timed_out"] and message["type"] == "http.response.start":
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        await self.app(scope, timed_receive, closing_send)
