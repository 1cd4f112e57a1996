"""The engine process of the multi-process service (`vlltr.service.workers`): the one `ServingCore` of a
device, serving every HTTP front-end.

It holds what must exist once: the ONNX sessions, the micro-batcher (filled from every front-end, so batches
are as full as in a single process), the class registry and its store, and the embedding cache. It listens on
two Unix-domain sockets in the service's run directory:

- `engine.sock`, the scoring link (`vlltr.service.wire`): prepared pixels in the front-ends' shared memory,
  scored against the current class table, the top-k answered;
- `engine-http.sock`, the service's own FastAPI app (`create_app` on this core), to which the front-ends
  forward every route but classification and health: the class routes, `/v1/model` and the API docs. So one
  registry serves everyone (a class added through any front-end is scored by the same table at once), and
  those routes keep one implementation, their limits and their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from vlltr.errors import BundleError, InferenceFailedError, ProviderError, VlltrError
from vlltr.service.core import ImageJob, Scored, ServingCore
from vlltr.service.explain import ClassifyOptions
from vlltr.service.metrics import Metrics
from vlltr.service.settings import Settings
from vlltr.service.wire import error_body, frame, read_frame

log = logging.getLogger(__name__)

SCORE_SOCKET = "engine.sock"
HTTP_SOCKET = "engine-http.sock"


class EngineServer:
    """The scoring link's server: one connection per front-end, requests answered concurrently."""

    def __init__(self, core: ServingCore, path: Path) -> None:
        self.core = core
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (replacing the socket file a previous engine left)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        """Stop listening and drop the connections (the front-ends answer what they still wait for)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shm: shared_memory.SharedMemory | None = None
        try:
            hello = await read_frame(reader)
            if hello.get("op") != "hello":
                raise ValueError("the first message is not hello")
            # Attached here, unlinked by the front-end once it reads the welcome: the mapping lives on in both.
            shm = shared_memory.SharedMemory(name=str(hello["shm"]))
            slot_bytes = int(hello["slot_bytes"])
            writer.write(frame({"op": "welcome", "pid": os.getpid()}))
            log.info("front-end %s connected (%d slots)", hello.get("pid"), int(hello["slots"]))
            while True:
                message = await read_frame(reader)
                task = asyncio.create_task(self._answer(message, shm, slot_bytes, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front-end went away (or restarts)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("dropping a front-end link that broke the protocol: %s", exc)
        finally:
            writer.close()
            # The shared memory is not closed here: jobs still in the batcher may read it. It is released when
            # the last view of it is gone.
            del shm

    async def _answer(
        self, message: dict[str, Any], shm: shared_memory.SharedMemory, slot_bytes: int, writer: asyncio.StreamWriter
    ) -> None:
        ident = message.get("id")
        try:
            op = message.get("op")
            if op == "status":
                checks, version = self.core.readiness()
                reply: dict[str, Any] = {"id": ident, "ok": True, "checks": checks, "version": version}
            elif op == "score":
                results = await self._score(message, shm, slot_bytes)
                reply = {"id": ident, "ok": True, "results": results}
            else:
                raise ValueError(f"unknown op {op!r}")
        except VlltrError as exc:
            reply = {"id": ident, "ok": False, "error": error_body(exc)}
        except Exception as exc:  # a malformed request or a fault here: an error answer, never silence
            log.warning("a front-end request failed: %s: %s", type(exc).__name__, exc)
            reply = {"id": ident, "ok": False, "error": error_body(InferenceFailedError("inference failed; retry"))}
        if not writer.is_closing():
            writer.write(frame(reply))

    async def _score(
        self, message: dict[str, Any], shm: shared_memory.SharedMemory, slot_bytes: int
    ) -> list[dict[str, Any]]:
        options = dict(message.get("options") or {})
        classify = options.pop("classify", None)
        if classify is not None:  # checked against the served table, ad-hoc labels encoded (errors: whole request)
            options["options"] = await self.core.prepare_options(ClassifyOptions.from_wire(classify))
        items = list(message["items"])
        out: list[dict[str, Any] | None] = [None] * len(items)
        jobs: list[ImageJob] = []
        where: list[tuple[int, str | None]] = []
        cache = self.core.cache
        for i, item in enumerate(items):
            if "slot" in item:
                shape = tuple(int(d) for d in item["shape"])
                offset = int(item["slot"]) * slot_bytes
                if int(np.prod(shape)) * 4 > slot_bytes or offset + slot_bytes > shm.size:
                    raise ValueError("an image larger than its slot")
                pixels = np.ndarray(shape, dtype=np.float32, buffer=shm.buf, offset=offset)
                jobs.append(ImageJob(pixels=pixels, features=None, **options))
                where.append((i, item.get("key")))
                continue
            features = await cache.get(str(item["key"])) if cache is not None else None
            if features is None:
                out[i] = {"miss": True}
            else:
                jobs.append(ImageJob(pixels=None, features=features, **options))
                where.append((i, None))
        if jobs:
            for (i, key), result in zip(where, await self.core.score_prepared(jobs)):
                out[i] = self._result(result, key)
        return [r if r is not None else {"miss": True} for r in out]

    def _result(self, result: Scored | VlltrError, key: str | None) -> dict[str, Any]:
        if isinstance(result, VlltrError):
            return {"error": error_body(result)}
        self.core.prep.remember(key, result.features)
        return {
            "predictions": [p.model_dump() for p in result.predictions()],
            "version": result.version,
            "verdict": result.verdict.model_dump(),
        }


async def _serve_engine(core: ServingCore, run_dir: Path) -> None:
    import uvicorn

    from vlltr.service.app import create_app

    server = EngineServer(core, run_dir / SCORE_SOCKET)
    await server.start()
    http_path = run_dir / HTTP_SOCKET
    with contextlib.suppress(FileNotFoundError):
        http_path.unlink()
    config = uvicorn.Config(
        create_app(core.settings, core=core),
        uds=str(http_path),
        lifespan="on",
        loop="none",  # the running loop (uvloop, set by the caller)
        log_level=core.settings.log_level,
        access_log=False,
        # The supervisor stops the front-ends first and the engine once they have drained: by then nothing is
        # left to wait for but what a front-end forwarded at the last moment.
        timeout_graceful_shutdown=5,
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await server.close()


def run_engine(settings: Settings, run_dir: Path, started: Connection) -> None:
    """The engine process's entry point: load the core (telling the supervisor through `started` whether that
    worked, with the one line `vlltr serve` prints when it did not), then serve until SIGTERM."""
    import uvloop

    from vlltr.service.workers import child_process_setup

    child_process_setup(settings, "engine")
    try:
        core = ServingCore.load(settings, Metrics(redis_enabled=bool(settings.redis_url)))
    except (BundleError, ProviderError) as exc:
        _tell(started, ("error", f"cannot serve {settings.bundle}: {exc}"))
        raise SystemExit(2) from None
    _tell(started, ("loaded", os.getpid()))
    uvloop.run(_serve_engine(core, run_dir))


def _tell(started: Connection, message: tuple[str, object]) -> None:
    # A restarted engine's supervisor does not wait for the message (it closed its end).
    with contextlib.suppress(OSError):
        started.send(message)
    started.close()
