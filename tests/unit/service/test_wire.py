"""The front-end/engine link's pieces in-process: frames, errors as they travel, the options a job forwards."""

from __future__ import annotations

import asyncio
import struct
from multiprocessing import shared_memory

import numpy as np
import pytest

from vlltr.errors import ImageDecodeError, InferenceFailedError, NotReadyError, QueueFullError
from vlltr.service.core import ImageJob
from vlltr.service.frontend import job_options
from vlltr.service.settings import Settings, usable_cpus
from vlltr.service.wire import MAX_FRAME_BYTES, error_body, error_from, frame, read_frame


def _read(data: bytes) -> dict:
    async def run() -> dict:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader)

    return asyncio.run(run())


def test_a_frame_reads_back_as_sent():
    message = {"op": "score", "id": 7, "items": [{"slot": 3, "shape": [3, 32, 32], "key": None}], "s": 0.1 + 0.2}
    assert _read(frame(message)) == message


def test_frames_that_are_not_of_the_protocol_are_refused():
    with pytest.raises(ValueError):
        _read(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(ValueError):
        _read(struct.pack(">I", 2) + b"[]")
    with pytest.raises(asyncio.IncompleteReadError):
        _read(frame({"op": "status"})[:-1])


def test_errors_travel_as_their_domain_error():
    for error in (QueueFullError("full"), NotReadyError("restarting"), ImageDecodeError("bad")):
        back = error_from(error_body(error))
        assert type(back) is type(error) and str(back) == str(error)
    # Anything unknown or malformed is a failed inference (503 with Retry-After), never a 500.
    for body in ({"code": "no_such_code", "message": "x"}, None, "text", {"code": "error"}):
        assert isinstance(error_from(body), InferenceFailedError)


def test_a_job_forwards_every_field_but_its_pixels_and_features():
    job = ImageJob(np.zeros((3, 2, 2), np.float32), None, 5)
    assert job_options(job) == {"top_k": 5}
    rebuilt = ImageJob(pixels=None, features=np.zeros(4, np.float32), **job_options(job))
    assert rebuilt.top_k == 5


def test_workers_default_to_one_per_four_usable_cores():
    assert Settings(workers=3).worker_count == 3
    assert Settings().worker_count == max(1, usable_cpus() // 4)
    assert 1 <= usable_cpus()


def test_a_request_on_a_link_the_engine_just_closed_is_not_ready_not_a_crash(tmp_path):
    """The engine dying closes the socket before the front-end's reader drops the link; a request in that window
    writes to a closed transport. It must get the not-ready answer (a 503 to retry), and leave nothing pending
    for the link's loss to fail again later."""
    import uvloop  # the loop `vlltr serve` runs its front-ends on

    from vlltr.service.frontend import EngineClient, _Link

    async def run() -> None:
        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.abort()  # as a SIGKILLed engine's socket: reset, no goodbye

        path = tmp_path / "engine.sock"
        server = await asyncio.start_unix_server(engine, str(path))
        _, writer = await asyncio.open_unix_connection(str(path))
        shm = shared_memory.SharedMemory(create=True, size=64)
        try:
            client = EngineClient(path, slots=1, slot_bytes=64)
            client.link = _Link(writer, shm, 1, 64)
            deadline = asyncio.get_running_loop().time() + 5
            while not writer.is_closing() and asyncio.get_running_loop().time() < deadline:
                writer.write(b"\0")  # the reset shows on a write or a read; nobody reads this link
                await asyncio.sleep(0.01)
            assert writer.is_closing()
            with pytest.raises(NotReadyError):
                await client.call({"op": "status"})
            assert client._pending == {}
        finally:
            shm.close()
            shm.unlink()
            server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
