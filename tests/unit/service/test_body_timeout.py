"""The body read timeout (vlltr.service.body_timeout) on an app with the service's error handlers and body reader,
driven through ASGI with scripted clients: a stalled body gets the 408 envelope and `Connection: close`, a slow
but steady body is read whole, and nothing times out once the body is complete."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from vlltr.service.api.errors import install_error_handlers
from vlltr.service.api.uploads import read_body
from vlltr.service.body_timeout import BodyTimeoutMiddleware
from vlltr.service.metrics import Metrics
from vlltr.service.settings import Settings

TIMEOUT_S = 0.3


def _app(metrics: Metrics) -> FastAPI:
    app = FastAPI()
    app.state.metrics = metrics
    app.state.settings = Settings()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await read_body(request, limit=1_000_000)
        return JSONResponse({"bytes": len(body)})

    @app.post("/wait-for-disconnect")
    async def wait_for_disconnect(request: Request) -> JSONResponse:
        body = await read_body(request, limit=1_000_000)
        # After the body, a receive() waits for the client to go away: the timeout must not fire here.
        waited = await asyncio.wait_for(request.receive(), timeout=3 * TIMEOUT_S)
        return JSONResponse({"bytes": len(body), "then": waited["type"]})

    app.add_middleware(BodyTimeoutMiddleware, timeout_s=TIMEOUT_S, metrics=metrics)
    return app


async def _call(app: FastAPI, path: str, pieces: Sequence[tuple[float, bytes]], disconnect_after_s: float = 10.0):
    """Send the body as `pieces` ((pause before it, bytes); the last one ends the body), record the answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/octet-stream"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    queue = list(pieces)
    sent: list[dict] = []

    async def receive() -> dict:
        if queue:
            pause, data = queue.pop(0)
            await asyncio.sleep(pause)
            return {"type": "http.request", "body": data, "more_body": bool(queue)}
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, json.loads(body)


def test_a_stalled_body_gets_408_and_the_connection_is_closed():
    metrics = Metrics()
    started = time.monotonic()
    status, headers, body = asyncio.run(_call(_app(metrics), "/echo", [(0.0, b"a line\n"), (60.0, b"never")]))
    took = time.monotonic() - started
    assert status == 408 and body["error"]["code"] == "timeout", body
    assert "body read timeout" in body["error"]["message"]
    assert headers["connection"] == "close"
    assert TIMEOUT_S <= took < TIMEOUT_S + 2.0
    assert metrics.registry.get_sample_value("vlltr_http_read_timeouts_total", {"stage": "body"}) == 1
    assert metrics.registry.get_sample_value("vlltr_requests_rejected_total", {"reason": "timeout"}) == 1


def test_a_slow_but_steady_body_is_read_whole():
    # Six pieces, each after a pause of half the timeout: the whole body takes longer than the timeout, but no
    # single pause does, so it is read (the clock restarts with every piece).
    pieces = [(TIMEOUT_S / 2, b"x" * 100)] * 6
    started = time.monotonic()
    status, headers, body = asyncio.run(_call(_app(Metrics()), "/echo", pieces))
    assert time.monotonic() - started > TIMEOUT_S
    assert status == 200 and body == {"bytes": 600}
    assert headers.get("connection") != "close"


def test_nothing_times_out_once_the_body_is_complete():
    status, _, body = asyncio.run(
        _call(_app(Metrics()), "/wait-for-disconnect", [(0.0, b"whole body")], disconnect_after_s=2 * TIMEOUT_S)
    )
    assert status == 200 and body == {"bytes": 10, "then": "http.disconnect"}
