"""The FastAPI application: `create_app(settings)` with a lifespan that starts, warms and tears down.

Start-up order (readiness reports each step):
1. load and verify the bundle and create the ONNX Runtime sessions (`ServingCore.load`). `vlltr serve` does
   this before the server starts, so a bad bundle or `provider=cuda` without CUDA really active ends the
   command with one clear line; `create_app(settings)` without a core does it in the lifespan;
2. in the background: warm every batch bucket, load the class table (retrying while the store is
   unreachable), start the inference thread. `/healthz` answers meanwhile; `/readyz` says 503 until done.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlltr.service.api import api_router
from vlltr.service.api.errors import envelope, install_error_handlers
from vlltr.service.api.openapi import install_openapi
from vlltr.service.api.uploads import BodyBudget
from vlltr.service.body_timeout import BodyTimeoutMiddleware
from vlltr.service.core import Classifier, ServingCore
from vlltr.service.metrics import Metrics
from vlltr.service.settings import Settings

log = logging.getLogger(__name__)

# Longest the lifespan waits for the core to release its resources at shutdown (after uvicorn's own
# graceful wait for requests), so a stop always ends within `vlltr serve`'s grace period plus this.
STOP_TIMEOUT_S = 4.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}


class RequestMiddleware:
    """Request id, the latency histogram (labelled by route template), requests in progress and the last-resort
    500.

    A client-supplied `X-Request-ID` of safe characters is kept, otherwise one is made; it is echoed in the
    response (and, for a request a front-end forwards to the engine, sent on with it). In a front-end of the
    multi-process service every answer names the process that gave it (`X-Vlltr-Worker`, its pid), and the
    requests the engine answers are timed by the engine alone, which knows their route. An exception no handler
    claimed is logged with the id and answered with a generic 500 envelope naming only the id (never internals).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        worker_id: str | None = None,
        forwarded: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.worker = worker_id.encode("latin-1") if worker_id else None
        self.forwarded = forwarded
        # A random per-process prefix and a counter: unique ids without a random draw per request.
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        request_id = given if given and _REQUEST_ID.match(given) else f"{self._id_prefix}-{next(self._ids)}"
        state = {"status": 500, "started": False}
        forwarded = self.forwarded is not None and self.forwarded(scope["path"])
        if forwarded and not given:
            scope["headers"] = [*scope["headers"], (b"x-request-id", request_id.encode("latin-1"))]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-ID", request_id)
                if self.worker is not None:
                    message["headers"].append((b"x-vlltr-worker", self.worker))
            await send(message)

        if forwarded:
            await self._forward(scope, receive, send_with_id, state, request_id)
            return

        in_progress = self.metrics.requests_in_progress
        in_progress.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error in %s %s (request id %s)", scope.get("method"), scope.get("path"), request_id
            )
            if not state["started"]:
                response = JSONResponse(
                    envelope("internal", f"internal error (request id {request_id})"), status_code=500
                )
                await response(scope, receive, send_with_id)
        finally:
            in_progress.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET") if scope.get("method") in _METHODS else "OTHER"
            self.metrics.request_duration.labels(route=label, method=method, status=str(state["status"])).observe(
                time.perf_counter() - started
            )

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, state: dict[str, int], request_id: str
    ) -> None:
        # The engine times and counts the request; here only a failure to relay it is this process's.
        try:
            await self.app(scope, receive, send)
        except Exception:
            log.warning(
                "a forwarded %s %s broke off (request id %s)",
                scope.get("method"),
                scope["path"],
                request_id,
                exc_info=True,
            )
            if not state["started"]:
                response = JSONResponse(
                    envelope("not_ready", "the engine is restarting; retry shortly"),
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
                await response(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    core: Classifier | None = None,
    engine_http: Path | None = None,
    worker_id: str | None = None,
) -> FastAPI:
    """Build the app. `core` (tests) skips loading; otherwise the lifespan loads `settings.bundle`.

    In a front-end of the multi-process service (`vlltr.service.frontend`), `core` is its `FrontCore` and
    `engine_http` the engine app's socket, to which every route but classification and health is forwarded;
    `worker_id` is sent as `X-Vlltr-Worker` with every answer."""
    metrics = core.metrics if core is not None else Metrics(redis_enabled=bool(settings.redis_url))
    forwarder = None
    if engine_http is not None:
        from vlltr.service.frontend import EngineHttp

        forwarder = EngineHttp(engine_http, prefixes=ENGINE_ROUTES, retry_after_s=settings.retry_after_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt: Classifier = core if core is not None else await asyncio.to_thread(ServingCore.load, settings, metrics)
        app.state.core = rt
        # What must hold before the server accepts a connection (a front-end's link to a ready engine).
        await rt.before_serving()
        starting = asyncio.create_task(_start(rt), name="vlltr-start")
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            await _stop_within(rt, STOP_TIMEOUT_S)
            if forwarder is not None:
                await forwarder.aclose()

    # FastAPIOffline serves Swagger UI's scripts and styles from the package (under /static-offline-docs), so
    # /docs renders on a machine without internet, where FastAPI's default page loads them from a CDN. A
    # front-end has no docs of its own: it forwards them, with their assets, to the engine.
    app_class = FastAPI if forwarder is not None else FastAPIOffline
    app = app_class(
        title="vlltr",
        summary="Long-tailed image classification with classes added by text (VL-LTR on ONNX Runtime)",
        version="1",
        lifespan=lifespan,
        redoc_url=None,
        # A front-end forwards the API docs to the engine, whose app has every route.
        docs_url=None if forwarder is not None else "/docs",
        openapi_url=None if forwarder is not None else "/openapi.json",
        redirect_slashes=False,  # an unknown path gets a JSON 404, never an empty-bodied redirect
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.core = None
    app.state.body_budget = BodyBudget(settings.max_buffered_bytes, settings.retry_after_s)
    install_error_handlers(app)
    app.include_router(api_router)
    install_openapi(app, settings)
    if forwarder is not None:
        from vlltr.service.frontend import ForwardMiddleware

        app.add_middleware(ForwardMiddleware, engine=forwarder)  # innermost: bodies forwarded are timed too
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_read_timeout_s, metrics=metrics)
    # Outermost: the request id and latency cover all.
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        worker_id=worker_id,
        forwarded=forwarder.forwarded if forwarder is not None else None,
    )
    return app


# The routes a front-end forwards to the engine (the class registry's, the served model's, the API docs).
ENGINE_ROUTES = ("/v1/classes", "/v1/model", "/docs", "/openapi.json", "/static-offline-docs")


async def _stop_within(core: Classifier, timeout: float) -> None:
    # Requests have drained by now (uvicorn waited for them); what is left is releasing threads and
    # connections. A release that hangs (a dead peer, a stuck thread) must not keep the process from exiting
    # within its grace period: give up on it, and log where everything stood so the cause can be found.
    stopping = asyncio.ensure_future(core.stop())
    done, _ = await asyncio.wait({stopping}, timeout=timeout)
    if not done:
        log.error(
            "releasing resources took over %.0f s; exiting without waiting further. Still running:\n%s",
            timeout,
            _where_everything_is(),
        )
        stopping.cancel()
        await asyncio.wait({stopping}, timeout=1.0)
        return
    if not stopping.cancelled() and stopping.exception() is not None:
        log.error("error while releasing resources at shutdown", exc_info=stopping.exception())


def _where_everything_is() -> str:
    """Stacks of the asyncio tasks and threads still alive (for a shutdown that hangs)."""
    import io
    import sys
    import threading
    import traceback

    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        out = io.StringIO()
        task.print_stack(limit=12, file=out)
        lines.append(out.getvalue())
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        lines.append(f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame, limit=8)))
    return "\n".join(lines)


async def _start(core: Classifier) -> None:
    try:
        await core.start()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.critical("the service failed to start; it stays not ready", exc_info=True)
