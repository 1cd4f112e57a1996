"""The JSON error envelope `{"error": {"code", "message"}}` and the handlers that write it.

Routes and the serving core raise `ApiError` (or the typed image errors of `vlltr.errors`); the handlers
registered by `install_error_handlers` turn them, FastAPI's validation errors and Starlette's HTTP errors
into the envelope with the right status. Unexpected exceptions are answered by the request middleware
(`vlltr.service.app`) with a generic 500 that carries only the request id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlltr.errors import ImageDecodeError, ImageTooLargeError, UnsupportedImageTypeError

# Error codes and the `vlltr_requests_rejected_total` reason each one counts under (None: not counted).
REJECT_REASONS: dict[str, str | None] = {
    "bad_image": "bad_image",
    "unsupported_type": "unsupported_type",
    "too_large": "too_large",
    "invalid": "invalid",
    "unauthorized": "unauthorized",
    "forbidden": "forbidden",
    "queue_full": "queue_full",
    "not_found": None,
    "conflict": None,
    "method_not_allowed": None,
    "not_ready": None,
    "store_unavailable": None,
    "inference_failed": None,
    "internal": None,
}


class ApiError(Exception):
    """An error answered to the client as the JSON envelope.

    Args:
        status: HTTP status.
        code: short machine-readable code (a key of `REJECT_REASONS`).
        message: human-readable explanation naming the problem; never internals.
        headers: extra response headers (`Retry-After`, `WWW-Authenticate`).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    """422: a field is missing or invalid."""
    return ApiError(422, "invalid", message)


def image_error(exc: Exception) -> ApiError:
    """Map a decode/preprocess failure of one image to its status (400, 413 or 415)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, "too_large", str(exc))
    if isinstance(exc, UnsupportedImageTypeError):
        return ApiError(415, "unsupported_type", str(exc))
    if isinstance(exc, ImageDecodeError):
        return ApiError(400, "bad_image", str(exc))
    # Anything else a decoder raises on crafted bytes is still "this is not an image we can read".
    return ApiError(400, "bad_image", f"cannot decode the image ({type(exc).__name__})")


def envelope(code: str, message: str) -> dict[str, Any]:
    """The error body."""
    return {"error": {"code": code, "message": message}}


def error_response(error: ApiError) -> JSONResponse:
    """The JSON response of an `ApiError`."""
    return JSONResponse(envelope(error.code, error.message), status_code=error.status, headers=error.headers)


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One line naming each invalid field: `query.top_k: Input should be greater than or equal to 1`."""
    parts = []
    for err in list(errors)[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}")
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _count_rejection(request: Request, code: str) -> None:
    reason = REJECT_REASONS.get(code)
    metrics = getattr(request.app.state, "metrics", None)
    if reason is not None and metrics is not None:
        metrics.rejected.labels(reason=reason).inc()


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    _count_rejection(request, exc.code)
    return error_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count_rejection(request, "invalid")
    return error_response(bad_request(describe_validation_errors(exc.errors())))


_HTTP_CODES = {
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
    code = _HTTP_CODES.get(exc.status_code, "invalid" if exc.status_code < 500 else "internal")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    _count_rejection(request, code)
    return JSONResponse(envelope(code, message), status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope handlers on an app."""
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
