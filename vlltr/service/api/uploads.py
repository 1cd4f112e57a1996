"""Streaming request-body readers with size limits (multipart forms and plain bodies).

Parts are parsed while the body streams in and kept in memory (no temporary files: images are capped at
`max_image_bytes`). A part over its limit stops being stored at once; the rest of the body is read and
discarded up to a bounded amount so that ordinary clients, which send their whole body before reading the
answer, receive the 413 instead of a reset connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from vlltr.service.api.errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # defined for type checkers only

MAX_FIELD_BYTES = 64 * 1024  # a non-file form field (e.g. `name`)
MAX_PARTS = 1024  # fields + files, whatever the limits on files say
DRAIN_LIMIT = 64 * 1024 * 1024  # most bytes read and discarded after a limit was hit


class BodyBudget:
    """Request-body bytes held in memory across all requests (touched on the event loop only: no lock).

    Each request takes bytes from it as its body streams in and gives them all back once it is answered
    (`BodyHold`). Without it, memory would grow with the number of concurrent uploads times their size
    limit: 64 images of 10 MB per batch request, times every client.
    """

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.used = 0

    def try_take(self, n: int) -> bool:
        """Take `n` bytes if they fit under the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Give back `n` bytes."""
        self.used = max(0, self.used - n)


@dataclass
class BodyHold:
    """One request's share of the `BodyBudget` (no budget: nothing is counted)."""

    budget: BodyBudget | None
    held: int = 0

    @property
    def limit(self) -> int | None:
        return self.budget.limit if self.budget is not None else None

    def ensure(self, total: int) -> None:
        """Hold at least `total` bytes for this request; 503 (via `_LimitHit`) when the budget is spent.

        Called first with the declared Content-Length, so a request gets its whole share or none: streams
        that each took part of the budget could otherwise all starve one another.
        """
        if self.budget is None or total <= self.held:
            return
        n = total - self.held
        if not self.budget.try_take(n):
            raise _LimitHit(
                ApiError(
                    503,
                    "queue_full",
                    "the service is holding as many uploads in memory as it may; retry later",
                    {"Retry-After": str(self.budget.retry_after_s)},
                )
            )
        self.held += n

    def release(self) -> None:
        """Give everything back (the request is answered)."""
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.held = 0


@dataclass
class Part:
    """One multipart part: its form name, filename (None for plain fields), content type and bytes."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)
    oversize: bool = False  # a file over the limit, dropped (only when the reader keeps going past it)

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    def text(self) -> str:
        """The part as UTF-8 text (422 when it is not)."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(422, "invalid", f"form field {self.name!r} is not UTF-8 text") from exc


class _LimitHit(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class _Collector:
    """python-multipart callbacks that build `Part`s and enforce per-part limits."""

    def __init__(self, file_limit: int, file_limit_label: str, max_files: int, per_file_errors: bool) -> None:
        self.per_file_errors = per_file_errors
        self.file_limit = file_limit
        self.file_limit_label = file_limit_label
        self.max_files = max_files
        self.parts: list[Part] = []
        self.files = 0
        self.done = False
        self._current: Part | None = None
        self._headers: dict[str, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).decode("latin-1").lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise _LimitHit(ApiError(422, "invalid", "a multipart part lacks a form-data name"))
        name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        ctype = self._headers.get("content-type")
        part = Part(name, filename, ctype.decode("latin-1") if ctype is not None else None)
        if len(self.parts) >= MAX_PARTS:
            raise _LimitHit(ApiError(413, "too_large", f"more than {MAX_PARTS} form parts"))
        if part.is_file:
            self.files += 1
            if self.files > self.max_files:
                raise _LimitHit(ApiError(413, "too_large", f"too many files: at most {self.max_files} per request"))
        self.parts.append(part)
        self._current = part

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None or part.oversize:
            return
        part.data.extend(data[start:end])
        limit = self.file_limit if part.is_file else MAX_FIELD_BYTES
        if len(part.data) > limit:
            if part.is_file and self.per_file_errors:
                part.oversize = True
                part.data = bytearray()
                return
            what = f"file {part.filename!r}" if part.is_file else f"form field {part.name!r}"
            label = self.file_limit_label if part.is_file else f"{MAX_FIELD_BYTES} bytes"
            raise _LimitHit(ApiError(413, "too_large", f"{what} is larger than the limit of {label}"))

    def _part_end(self) -> None:
        self._current = None

    def _end(self) -> None:
        self.done = True


def _boundary(request: Request, expected: str) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        shown = ctype.decode("latin-1") or "none"
        raise ApiError(
            415, "unsupported_type", f"expected a multipart/form-data body ({expected}); got content type {shown}"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(422, "invalid", "the multipart content type has no boundary")
    return boundary


async def _drain(request: Request, already: int) -> None:
    # Read (and drop) what the client is still sending, so it gets to read our answer.
    seen = already
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_LIMIT:
                return
    except Exception:  # the client hung up; nothing to drain
        return


def _declared_length(request: Request) -> int:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def _check_declared_length(request: Request, limit: int, label: str) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {int(declared)} bytes is over the limit of {label}")


async def read_multipart(
    request: Request,
    *,
    file_limit: int,
    max_files: int,
    expected: str,
    body_limit: int | None = None,
    per_file_errors: bool = False,
    hold: BodyHold | None = None,
) -> list[Part]:
    """Parse a multipart/form-data body with limits.

    Args:
        request: the request.
        file_limit: most bytes per file part (413 past it).
        max_files: most file parts (413 past it).
        expected: wording for the 415 error (which fields the endpoint wants).
        body_limit: most bytes in the whole body; default `max_files * file_limit` plus room for headers.
        per_file_errors: a file over `file_limit` is marked `oversize` (and its bytes dropped) instead of
            failing the whole request.
        hold: this request's share of the service-wide body budget; the body may not exceed the budget (413)
            and is refused with 503 while other requests hold it.

    Raises:
        ApiError: 415 not multipart, 413 over a limit, 422 malformed body, 503 body budget spent.
    """
    boundary = _boundary(request, expected)
    total_limit = body_limit if body_limit is not None else max_files * (file_limit + 16 * 1024) + 64 * 1024
    if hold is not None and hold.limit is not None:
        total_limit = min(total_limit, hold.limit)
    _check_declared_length(request, total_limit + DRAIN_LIMIT, f"{total_limit} bytes")
    collector = _Collector(file_limit, f"{file_limit} bytes", max_files, per_file_errors)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        if hold is not None:
            hold.ensure(min(_declared_length(request), total_limit))
        async for chunk in request.stream():
            received += len(chunk)
            if received > total_limit:
                raise _LimitHit(ApiError(413, "too_large", f"request body is over the limit of {total_limit} bytes"))
            if hold is not None:
                hold.ensure(received)
            parser.write(chunk)
        parser.finalize()
    except _LimitHit as hit:
        await _drain(request, received)
        raise hit.error from None
    except MultipartParseError as exc:
        raise ApiError(422, "invalid", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise _disconnected() from None
    if not collector.done:
        raise ApiError(422, "invalid", "malformed multipart body: it ends before the closing boundary")
    return collector.parts


async def read_body(request: Request, *, limit: int, hold: BodyHold | None = None) -> bytes:
    """The whole body, refusing more than `limit` bytes (413) and, with `hold`, more than the body budget
    allows right now (503); a body larger than the whole budget gets 413, as in `read_multipart`."""
    if hold is not None and hold.limit is not None:
        limit = min(limit, hold.limit)
    _check_declared_length(request, limit + DRAIN_LIMIT, f"{limit} bytes")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            received = len(buf) + len(chunk)
            if received > limit:  # over the limit is 413 whatever the budget holds (checked first)
                await _drain(request, received)
                raise ApiError(413, "too_large", f"request body is over the limit of {limit} bytes")
            if hold is not None:
                try:
                    hold.ensure(max(received, min(_declared_length(request), limit)))
                except _LimitHit as hit:
                    await _drain(request, received)
                    raise hit.error from None
            buf.extend(chunk)
    except ClientDisconnect:
        raise _disconnected() from None
    return bytes(buf)


def _disconnected() -> ApiError:
    # Nobody reads this answer; it keeps a vanished client out of the 5xx counts.
    return ApiError(400, "invalid", "the client disconnected before the request body was complete")
