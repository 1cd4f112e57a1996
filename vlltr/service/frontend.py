"""An HTTP front-end process of the multi-process service (`vlltr.service.workers`).

It runs the service's FastAPI app on the listening socket it shares with the other front-ends: HTTP, the
connection limits and timeouts, admin auth, body limits and parsing, hashing, decoding and preprocessing
(on its own thread pool, so N front-ends decode on N processes), then the prepared pixels go to the engine
through shared memory (`vlltr.service.wire`) and the top-k comes back. Every other route (the class routes,
`/v1/model`, the API docs) is forwarded as it is to the engine's own app (`ForwardMiddleware`), so one
registry and one set of route handlers serve all front-ends.

When the engine goes away, everything it held is answered at once (503 `not_ready` with Retry-After),
`/readyz` says not ready, and the link reconnects as soon as the supervisor has restarted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlltr.errors import ImageTooLargeError, NotReadyError, QueueFullError, VlltrError
from vlltr.model.runtime.bundle import Bundle, load_bundle
from vlltr.service.cache import cache_key
from vlltr.service.core import QUEUE_FULL, ImageJob, ImagePreparer, as_image_error
from vlltr.service.explain import ClassifyOptions
from vlltr.service.metrics import Metrics
from vlltr.service.schemas import Prediction, Verdict
from vlltr.service.settings import Settings
from vlltr.service.wire import error_from, frame, read_frame

log = logging.getLogger(__name__)

ENGINE_GONE = "the engine is restarting; retry shortly"
RECONNECT_S = 0.1  # how soon a lost engine link is tried again
STATUS_EVERY_S = 0.25  # how often the engine's readiness is asked
HELLO_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 2048
LINK_WAIT_S = 10.0  # longest a starting front-end waits for a ready engine before it accepts anyway
# Headers of a forwarded answer that are the front-end's own to set.
_HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"x-request-id", b"date", b"server"}
_NOT_READY = {"checks": None, "version": None}


@dataclass(slots=True)
class RemoteScored:
    """The engine's answer for one image: the top-k and the class-table version it was scored against."""

    items: list[Prediction]
    version: int
    verdict: Verdict

    def predictions(self) -> list[Prediction]:
        return self.items


class _Link:
    """One connection to the engine and its shared-memory slots."""

    def __init__(self, writer: asyncio.StreamWriter, shm: shared_memory.SharedMemory, slots: int, size: int) -> None:
        self.writer = writer
        self.shm = shm
        self.slot_bytes = size
        self.free = list(range(slots))
        self.changed = asyncio.Condition()
        self.open = True

    async def take(self, n: int) -> list[int]:
        async with self.changed:
            await self.changed.wait_for(lambda: not self.open or len(self.free) >= n)
            if not self.open:
                raise NotReadyError(ENGINE_GONE)
            taken, self.free = self.free[:n], self.free[n:]
            return taken

    async def give(self, slots: list[int]) -> None:
        async with self.changed:
            self.free.extend(slots)
            self.changed.notify_all()

    async def close(self) -> None:
        self.open = False
        async with self.changed:
            self.changed.notify_all()
        self.writer.close()


class EngineClient:
    """The front-end's side of the scoring link: connects (and reconnects) to the engine, sends requests and
    matches their answers; every request waiting when the link drops gets `NotReadyError`."""

    def __init__(self, path: Path, *, slots: int, slot_bytes: int) -> None:
        self.path = path
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.link: _Link | None = None
        self.engine_pid: int | None = None
        self.status: dict[str, Any] = dict(_NOT_READY)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._linked = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.link is not None

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._keep_linked(), name="vlltr-engine-link"))
        self._tasks.append(asyncio.create_task(self._poll_status(), name="vlltr-engine-status"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._lost()

    async def _keep_linked(self) -> None:
        last = ""
        while True:
            try:
                await self._link_and_read()
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                if self.link is not None or str(exc) != last:
                    log.info("engine link: %s", exc or type(exc).__name__)
                last = str(exc)
            finally:
                if self.link is not None:
                    log.warning("lost the engine link; answering what it held, then reconnecting")
                await self._lost()
            await asyncio.sleep(RECONNECT_S)

    async def _link_and_read(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        shm = shared_memory.SharedMemory(create=True, size=self.slots * self.slot_bytes)
        try:
            writer.write(
                frame(
                    {
                        "op": "hello",
                        "shm": shm.name,
                        "slots": self.slots,
                        "slot_bytes": self.slot_bytes,
                        "pid": os.getpid(),
                    }
                )
            )
            welcome = await asyncio.wait_for(read_frame(reader), HELLO_TIMEOUT_S)
        except BaseException:
            writer.close()
            shm.close()
            raise
        finally:
            shm.unlink()  # both sides have it mapped (or the engine never will): nothing left in /dev/shm
        self.engine_pid = int(welcome["pid"])
        self.link = _Link(writer, shm, self.slots, self.slot_bytes)
        self._linked.set()
        log.info("linked to the engine (pid %d)", self.engine_pid)
        while True:
            message = await read_frame(reader)
            future = self._pending.pop(int(message.get("id", -1)), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def _lost(self) -> None:
        link, self.link = self.link, None
        self.status = dict(_NOT_READY)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(NotReadyError(ENGINE_GONE))
        if link is not None:
            await link.close()

    async def _poll_status(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                # Asked at once when a link comes up (not a poll interval later), then every interval.
                await asyncio.wait_for(self._linked.wait(), STATUS_EVERY_S)
            self._linked.clear()
            if self.link is not None:
                try:
                    reply = await asyncio.wait_for(self.call({"op": "status"}), 5.0)
                    self.status = {"checks": reply["checks"], "version": reply["version"]}
                except (NotReadyError, TimeoutError, KeyError):
                    self.status = dict(_NOT_READY)

    async def call(self, message: dict[str, Any], link: _Link | None = None) -> dict[str, Any]:
        """Send one request and wait for its answer. `NotReadyError` without a link or when it drops."""
        link = link or self.link
        # The engine's socket can close before the reader sees its end and drops the link; writing then would
        # fail on the closed transport (uvloop raises), which is the same news as a dropped link.
        if link is None or link is not self.link or link.writer.is_closing():
            raise NotReadyError(ENGINE_GONE)
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            link.writer.write(frame({**message, "id": ident}))
            reply = await future
        finally:  # a failed write or a caller that gave up (a timeout) leaves no entry for an answer never read
            self._pending.pop(ident, None)
        if not reply.get("ok"):
            raise error_from(reply.get("error"))
        return reply

    async def score(
        self, jobs: Sequence[ImageJob | str], keys: Sequence[str | None], options: dict[str, Any]
    ) -> list[RemoteScored | VlltrError | None]:
        """Score prepared jobs (pixels, cached by the engine under `keys[i]` when given) or look cache keys up
        (a `str`): one entry per input, a result, an error, or None for a key the engine's cache does not
        hold. Raises for the whole request when the engine refuses it (queue full, not ready) or the link
        drops. The slots are given back once the engine has answered (it reads the pixels in place), or when the
        request is abandoned: the engine only reads a slot, so a slot taken again meanwhile can spoil only the
        abandoned job's answer, which nobody reads."""
        link = self.link
        if link is None:
            raise NotReadyError(ENGINE_GONE)
        pixel_jobs = [j for j in jobs if isinstance(j, ImageJob)]
        slots = await link.take(len(pixel_jobs)) if pixel_jobs else []
        try:
            items: list[dict[str, Any]] = []
            free = iter(slots)
            for i, job in enumerate(jobs):
                if isinstance(job, str):
                    items.append({"key": job})
                    continue
                assert job.pixels is not None
                slot = next(free)
                view = np.ndarray(job.pixels.shape, np.float32, buffer=link.shm.buf, offset=slot * link.slot_bytes)
                view[...] = job.pixels
                del view  # no view of the segment may outlive the request
                items.append({"slot": slot, "shape": list(job.pixels.shape), "key": keys[i] if i < len(keys) else None})
            reply = await self.call({"op": "score", "options": options, "items": items}, link)
        finally:
            if slots:
                await link.give(slots)
        return [_remote_result(r) for r in reply["results"]]


def job_options(job: ImageJob) -> dict[str, Any]:
    """Everything of a job but its pixels, features and prepared classify options: what `vlltr.service.wire`'s
    `score` forwards as `options`, so a field added to `ImageJob` (an option of a route) reaches the engine as
    it is. The prepared classify options hold arrays; their request form travels instead
    (`wire_classify_options`), and the engine prepares them."""
    return {f.name: getattr(job, f.name) for f in fields(job) if f.name not in ("pixels", "features", "options")}


def _remote_result(result: dict[str, Any]) -> RemoteScored | VlltrError | None:
    if result.get("miss"):
        return None
    if "error" in result:
        return error_from(result["error"])
    return RemoteScored(
        [Prediction(**p) for p in result["predictions"]], int(result["version"]), Verdict(**result["verdict"])
    )


class FrontCore:
    """What the classify and health routes use in a front-end, with `ServingCore`'s interface for them: the
    images are prepared here and scored by the engine."""

    def __init__(self, settings: Settings, bundle: Bundle, metrics: Metrics, run_dir: Path) -> None:
        from vlltr.service.engine import SCORE_SOCKET

        self.settings = settings
        self.bundle = bundle
        self.metrics = metrics
        self.provider = "engine"
        self.prep = ImagePreparer(settings, bundle, None, metrics)
        # The engine holds the embedding cache (one for every front-end, as in a single process); a cache that
        # cannot hit is not asked.
        self.engine_caches = bool(settings.redis_url) or settings.cache_size > 0
        size = bundle.preprocess.size
        slot_bytes = max(3 * size * size, bundle.embed_dim) * 4
        self.client = EngineClient(
            run_dir / SCORE_SOCKET, slots=max(settings.shm_slots, settings.max_batch_files), slot_bytes=slot_bytes
        )
        self.inflight = 0

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, run_dir: Path) -> FrontCore:
        """Read the bundle (its preprocessing and ids; no sessions)."""
        if settings.bundle is None:
            raise ValueError("settings.bundle is not set")
        return cls(settings, load_bundle(settings.bundle), metrics, run_dir)

    async def before_serving(self) -> None:
        """Link to the engine and learn its readiness before accepting connections (at most
        `LINK_WAIT_S`), so a front-end that starts beside a ready engine is ready from its first request."""
        await self.client.start()
        deadline = time.monotonic() + LINK_WAIT_S
        while time.monotonic() < deadline and not all(self.ready().values()):
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        """Nothing more: the link keeps itself up (`EngineClient`)."""

    async def stop(self) -> None:
        await self.client.close()
        self.prep.close()

    def ready(self) -> dict[str, bool]:
        checks = self.client.status["checks"] if self.client.connected else None
        if not checks:
            return {
                "bundle_loaded": True,
                "sessions_warmed": False,
                "class_table_loaded": False,
                "inference_loop_alive": False,
            }
        return {name: bool(value) for name, value in checks.items()}

    def readiness(self) -> tuple[dict[str, bool], int | None]:
        version = self.client.status["version"] if self.client.connected else None
        return self.ready(), version

    @property
    def table_version(self) -> int:
        return int(self.client.status["version"] or 0)

    def check_accepting(self, n: int) -> None:
        """As `ServingCore.check_accepting`, for this front-end's images (the engine bounds them all)."""
        if not self.client.connected:
            raise NotReadyError(ENGINE_GONE)
        if self.inflight + n > self.settings.queue_size:
            raise QueueFullError(QUEUE_FULL)

    async def classify(
        self, data: bytes | bytearray, top_k: int, options: ClassifyOptions | None = None
    ) -> RemoteScored:
        """As `ServingCore.classify`."""
        result = (await self.classify_many([data], top_k, options))[0]
        if isinstance(result, VlltrError):
            raise result
        return result

    async def classify_many(
        self, images: Sequence[bytes | bytearray], top_k: int, options: ClassifyOptions | None = None
    ) -> list[RemoteScored | VlltrError]:
        """As `ServingCore.classify_many`: each entry its result or its own error, in order."""
        self.check_accepting(len(images))
        self.inflight += len(images)
        try:
            return await self._classify_many(images, top_k, options)
        finally:
            self.inflight -= len(images)

    async def _classify_many(
        self, images: Sequence[bytes | bytearray], top_k: int, classify: ClassifyOptions | None
    ) -> list[RemoteScored | VlltrError]:
        # The options every job of the request shares, as the engine rebuilds its jobs from them; the classify
        # options travel as they came (the engine checks them and encodes ad-hoc labels with its text encoder).
        options = job_options(ImageJob(None, None, top_k))
        if classify is not None and not classify.plain:
            options["classify"] = classify.to_wire()
        out: list[RemoteScored | VlltrError | None] = [None] * len(images)
        keys: list[str | None] = [None] * len(images)
        todo: list[int] = []
        for i, data in enumerate(images):
            if len(data) > self.settings.max_image_bytes:
                out[i] = ImageTooLargeError(
                    f"image is {len(data)} bytes, over the limit of {self.settings.max_image_bytes}",
                    limit=self.settings.max_image_bytes,
                )
            else:
                todo.append(i)
        asked = False  # whether the engine has seen the options (it checks them on every call)
        if self.engine_caches and todo:
            asked = True
            for i in todo:
                keys[i] = cache_key(self.bundle.bundle_id, await self.prep.digest(images[i]))
            lookups: list[ImageJob | str] = [k for k in (keys[i] for i in todo) if k is not None]
            looked = await self.client.score(lookups, (), options)
            for i, result in zip(todo, looked):
                out[i] = result
            todo = [i for i in todo if out[i] is None]
        prepared = await asyncio.gather(*(self._job(images[i], top_k) for i in todo), return_exceptions=True)
        jobs: list[ImageJob | str] = []
        sent: list[int] = []
        for i, job in zip(todo, prepared):
            if isinstance(job, ImageJob):
                jobs.append(job)
                sent.append(i)
            elif isinstance(job, Exception):
                out[i] = as_image_error(job)
            else:
                raise job
        if jobs:
            for i, result in zip(sent, await self.client.score(jobs, [keys[i] for i in sent], options)):
                out[i] = result if result is not None else NotReadyError(ENGINE_GONE)
        elif "classify" in options and not asked:
            # No image reached the engine: it still judges the options against the served table, so a request
            # naming classes nobody serves is refused whatever its images, as in one process.
            await self.client.score([], [], options)
        return [r if r is not None else NotReadyError(ENGINE_GONE) for r in out]

    async def _job(self, data: bytes | bytearray, top_k: int) -> ImageJob:
        loop = asyncio.get_running_loop()
        try:
            pixels = await loop.run_in_executor(self.prep.pool, self.prep.pixels, data)
        except Exception as exc:  # every decoder failure is the client's image, never a 500
            raise as_image_error(exc) from None
        return ImageJob(pixels, None, top_k)


class EngineHttp:
    """The front-end's client of the engine's own app (over its Unix socket) and which paths go there."""

    def __init__(self, uds: Path, *, prefixes: tuple[str, ...], retry_after_s: int) -> None:
        import httpx

        self.prefixes = prefixes
        self.retry_after_s = retry_after_s
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(uds)),
            base_url="http://engine",
            timeout=httpx.Timeout(None),  # the client's pauses are timed by the body-timeout middleware
        )

    def forwarded(self, path: str) -> bool:
        """Whether the engine answers `path`."""
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)

    async def aclose(self) -> None:
        await self.client.aclose()


class ForwardMiddleware:
    """Forwards the requests of the routes the engine serves (`EngineHttp.forwarded`) to the engine's app,
    streaming the body both ways; everything else goes to the front-end's own app.

    The request id is the front-end's (`X-Request-ID`, set by `RequestMiddleware` outside this one) and travels
    with the request, so the engine logs the same id. An engine that cannot be reached is answered 503
    `not_ready` with Retry-After (it is being restarted), never a 500.
    """

    def __init__(self, app: ASGIApp, engine: EngineHttp) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.engine.forwarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        import httpx

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        client = self.engine.client
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host", b"connection")]
        # The path as the client encoded it (`%23` stays `%23`, never a fragment), and its query as it came.
        target = (scope.get("raw_path") or quote(scope["path"]).encode("ascii")).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        request = client.build_request(
            scope["method"],
            target + ("?" + query if query else ""),
            headers=headers,
            content=body() if scope["method"] not in ("GET", "HEAD") else None,
        )
        try:
            response = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            log.warning("the engine did not answer a forwarded %s %s: %s", scope["method"], scope["path"], exc)
            await _not_ready(send, self.engine.retry_after_s)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_HEADERS],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # the engine died mid-answer: the connection is cut, as a proxy does
            log.warning("the engine broke off a forwarded answer: %s", exc)
            raise ConnectionAbortedError("the engine broke off its answer") from None
        finally:
            await response.aclose()


async def _not_ready(send: Send, retry_after_s: int) -> None:
    import json

    from vlltr.service.api.errors import envelope

    body = json.dumps(envelope("not_ready", ENGINE_GONE)).encode("utf-8")
    start: Message = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def run_frontend(settings: Settings, address: tuple[str, int], run_dir: Path, index: int) -> None:
    """A front-end process's entry point: listen on `address` beside the other front-ends (`SO_REUSEPORT`) and
    serve until SIGTERM (then finish the requests in flight: the supervisor stops the engine only after every
    front-end has)."""
    import uvicorn

    from vlltr.service.app import create_app
    from vlltr.service.connections import uvicorn_options
    from vlltr.service.engine import HTTP_SOCKET
    from vlltr.service.workers import child_process_setup, reuse_port_socket

    child_process_setup(settings, f"front-end {index}")
    # Listening from the start: connections that arrive while this front-end loads wait in its backlog.
    listener = reuse_port_socket(*address)
    listener.listen(LISTEN_BACKLOG)
    started = time.monotonic()
    metrics = Metrics(redis_enabled=False)
    core = FrontCore.load(settings, metrics, run_dir)
    app = create_app(settings, core=core, engine_http=run_dir / HTTP_SOCKET, worker_id=str(os.getpid()))
    options = uvicorn_options(settings, metrics)
    for name in ("host", "port"):
        options.pop(name)
    config = uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=10, **options)
    log.info("front-end %d loaded in %.1f s", index, time.monotonic() - started)
    uvicorn.Server(config).run(sockets=[listener])
