"""The link between the multi-process service's HTTP front-ends and its engine (`vlltr.service.workers`).

One Unix-domain stream socket per front-end. Every message is a frame: a 4-byte big-endian length, then that
many bytes of JSON (an object). The images themselves never go through the socket: each front-end creates one
shared-memory segment per connection, cut into equal slots, names it in its first message (`hello`), and
unlinks it as soon as the engine has attached it (`welcome`), so nothing is left in /dev/shm whichever process
dies later. A request names the slots that hold its images; the engine reads the pixels from there, in place.

Messages, front-end to engine (each but `hello` carries an `id` the answer repeats):

- `{"op": "hello", "shm": NAME, "slot_bytes": N, "slots": K, "pid": PID}`, answered `{"op": "welcome", "pid": PID}`;
- `{"op": "status", "id": I}`, answered `{"id": I, "ok": true, "checks": {...}, "version": V | null}`;
- `{"op": "score", "id": I, "options": {...}, "items": [ITEM, ...]}`: the `options` are the keyword arguments of
  `vlltr.service.core.ImageJob` besides its pixels and features (`top_k`, and whatever a route adds to a job
  later: they are forwarded as they are). An ITEM is `{"key": K}` (look the image up in the engine's embedding
  cache), or `{"slot": S, "shape": [...], "key": K | null}` (float32 pixels in slot S, cached under K once
  encoded). Answered `{"id": I, "ok": true, "results": [RESULT, ...]}`, one per item in order, each
  `{"predictions": [...], "version": V}`, `{"miss": true}` (a look-up the cache could not answer), or
  `{"error": {"code": C, "message": M}}`; or, for the whole request, `{"id": I, "ok": false, "error": {...}}`.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from vlltr.errors import InferenceFailedError, VlltrError, all_error_classes

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a frame carries JSON only (predictions, class names), never images


def frame(message: dict[str, Any]) -> bytes:
    """One message as a frame."""
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message. Raises `asyncio.IncompleteReadError` at the end of the stream, `ValueError` for a frame
    that is not one of this protocol."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise ValueError("a frame that is not a JSON object")
    return message


def error_body(error: VlltrError) -> dict[str, str]:
    """A domain error as it travels."""
    return {"code": error.code, "message": str(error)}


def _classes_by_code() -> dict[str, type[VlltrError]]:
    out: dict[str, type[VlltrError]] = {}
    for cls in all_error_classes():
        out.setdefault(cls.code, cls)  # the first (most general) class of each code
    return out


_BY_CODE = _classes_by_code()


def error_from(body: Any) -> VlltrError:
    """The domain error a travelled error body stands for (an unknown or malformed one: a failed inference,
    which the service answers 503 with Retry-After, never a 500)."""
    code = body.get("code") if isinstance(body, dict) else None
    message = str(body.get("message", "")) if isinstance(body, dict) else ""
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is not None and code != VlltrError.code:
        try:
            return cls(message)
        except TypeError:  # an error class that needs more than its message
            pass
    return InferenceFailedError(message or "inference failed for this image; retry later")
