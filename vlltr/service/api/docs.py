"""OpenAPI helpers: documented error responses and request bodies (multipart forms, raw images)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlltr.service.schemas import ErrorResponse

_DESCRIPTIONS = {
    400: "the upload is not a decodable image (`bad_image`), or the request is not valid HTTP (`bad_request`)",
    401: "the admin token is missing (`unauthorized`)",
    403: "the admin token is wrong (`forbidden`)",
    404: "no such class (`not_found`)",
    408: "the client paused longer than `body_read_timeout_s` while sending the body (`timeout`); the "
    "connection is closed",
    409: "the class exists already, or is a trained class that cannot be deleted (`conflict`)",
    413: "an image or the body is over a size limit, or the image has too many pixels (`too_large`)",
    415: "an image format or request content type the service does not read (`unsupported_type`)",
    422: "a field is missing or invalid (`invalid`)",
    503: "not ready yet, the inference queue is full (`queue_full`) or the class store is unreachable; "
    "retry after `Retry-After` seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route can return, all with the error envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def multipart_body(
    properties: dict[str, dict[str, Any]],
    required: list[str],
    *,
    raw_types: Sequence[str] = (),
    json_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`openapi_extra` documenting a multipart/form-data body (routes read it as a stream), for each of
    `raw_types` the same content sent as the whole body with that content type, and a JSON alternative."""
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {"type": "object", "properties": properties, "required": required}}
    }
    if json_body is not None:
        content["application/json"] = {"schema": json_body}
    for media_type in raw_types:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def binary(description: str) -> dict[str, Any]:
    """Schema of one uploaded file."""
    return {"type": "string", "format": "binary", "description": description}
