"""The HTTP edge of the error model: the one table from error codes to statuses, and the handlers.

The serving core and everything under it raise the domain errors of `vlltr.errors`, each with a stable
`code`; `HTTP_ERRORS` says, per code, which status answers it, whether a `Retry-After` goes with it and
under which reason `vlltr_requests_rejected_total` counts it. The routes raise `ApiError` only for what
exists at the HTTP layer alone (a malformed multipart body, a body over its limit, a missing admin token),
with a status and a code of the same table. The handlers registered by `install_error_handlers` write every
one of them, FastAPI's validation errors and Starlette's HTTP errors as the envelope
`{"error": {"code", "message"}}`. A domain error whose code the table lacks is not the client's doing: it
goes on to the request middleware (`vlltr.service.app`), which logs it and answers a generic 500 that
carries only the request id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlltr.errors import VlltrError


@dataclass(frozen=True)
class HttpMapping:
    """How one error code is answered.

    Attributes:
        status: the HTTP status.
        reject_reason: the `vlltr_requests_rejected_total` reason it counts under (None: not counted).
        retry_after: send `Retry-After` (the `retry_after_s` setting): the request may succeed later.
    """

    status: int
    reject_reason: str | None = None
    retry_after: bool = False


HTTP_ERRORS: dict[str, HttpMapping] = {
    "bad_image": HttpMapping(400, "bad_image"),
    "unsupported_type": HttpMapping(415, "unsupported_type"),
    "too_large": HttpMapping(413, "too_large"),
    "invalid": HttpMapping(422, "invalid"),
    "unauthorized": HttpMapping(401, "unauthorized"),
    "forbidden": HttpMapping(403, "forbidden"),
    "queue_full": HttpMapping(503, "queue_full", retry_after=True),
    # Written by the HTTP server itself, before any request is read (vlltr.service.connections); counted in
    # vlltr_http_connections_refused_total.
    "too_many_connections": HttpMapping(503, retry_after=True),
    # Also written by the HTTP server itself: a request its parser cannot read as HTTP (a control character in
    # the target or a header, a malformed head), answered and closed before any route sees it.
    "bad_request": HttpMapping(400),
    "timeout": HttpMapping(408, "timeout"),
    "not_found": HttpMapping(404),
    "conflict": HttpMapping(409),
    "method_not_allowed": HttpMapping(405),
    "not_ready": HttpMapping(503, retry_after=True),
    "store_unavailable": HttpMapping(503, retry_after=True),
    "inference_failed": HttpMapping(503, retry_after=True),
    "internal": HttpMapping(500),
}


class ApiError(Exception):
    """An error that exists at the HTTP layer only, answered as the JSON envelope.

    Args:
        status: HTTP status.
        code: short machine-readable code (a key of `HTTP_ERRORS`).
        message: human-readable explanation naming the problem; never internals.
        headers: extra response headers (`Retry-After`, `WWW-Authenticate`).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class ErrorAnswer:
    """The answer to one error: status, code, message and headers."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def answer_for(error: BaseException, retry_after_s: int) -> ErrorAnswer | None:
    """The answer to an `ApiError` or a domain error of the table; None for anything else (a server fault)."""
    if isinstance(error, ApiError):
        return ErrorAnswer(error.status, error.code, error.message, dict(error.headers))
    if isinstance(error, VlltrError):
        mapping = HTTP_ERRORS.get(error.code)
        if mapping is None:
            return None
        headers = {"Retry-After": str(retry_after_s)} if mapping.retry_after else {}
        return ErrorAnswer(mapping.status, error.code, str(error), headers)
    return None


def envelope(code: str, message: str) -> dict[str, Any]:
    """The error body."""
    return {"error": {"code": code, "message": message}}


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One line naming each invalid field: `query.top_k: Input should be greater than or equal to 1`."""
    parts = []
    for err in list(errors)[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}")
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def count_rejection(request: Request, code: str) -> None:
    """Count an answered error under its reason in `vlltr_requests_rejected_total` (if it has one)."""
    mapping = HTTP_ERRORS.get(code)
    metrics = getattr(request.app.state, "metrics", None)
    if mapping is not None and mapping.reject_reason is not None and metrics is not None:
        metrics.rejected.labels(reason=mapping.reject_reason).inc()


def retry_after_s(request: Request) -> int:
    """The app's `retry_after_s` setting."""
    return int(request.app.state.settings.retry_after_s)


def _respond(request: Request, answer: ErrorAnswer) -> JSONResponse:
    count_rejection(request, answer.code)
    return JSONResponse(envelope(answer.code, answer.message), status_code=answer.status, headers=answer.headers)


async def _error_handler(request: Request, exc: Exception) -> JSONResponse:
    answer = answer_for(exc, retry_after_s(request))
    if answer is None:
        raise exc  # not a client error: the request middleware logs it and answers 500
    return _respond(request, answer)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, ErrorAnswer(422, "invalid", describe_validation_errors(exc.errors())))


# Starlette's own HTTP errors (unknown route, wrong method, ...) by status.
_STARLETTE_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_type",
    422: "invalid",
    503: "not_ready",
}


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STARLETTE_CODES.get(exc.status_code, "invalid" if exc.status_code < 500 else "internal")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return _respond(request, ErrorAnswer(exc.status_code, code, message, dict(exc.headers or {})))


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope handlers on an app."""
    app.add_exception_handler(ApiError, _error_handler)
    app.add_exception_handler(VlltrError, _error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
