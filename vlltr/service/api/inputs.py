"""Classify inputs beside multipart and raw bodies: JSON with base64 images, and the per-request options
(query parameters, or the same fields of the JSON body), plus their OpenAPI documentation."""

from __future__ import annotations

import base64
import binascii
import copy
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel, ValidationError

from vlltr.service.api.errors import ApiError, describe_validation_errors
from vlltr.service.api.uploads import BodyHold, Part, read_body
from vlltr.service.explain import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_SUBSET,
    ClassifyOptions,
    broken_item_rule,
    check_option_rules,
)
from vlltr.service.schemas import ClassifyBatchJson, ClassifyJson, ClassifyOptionFields
from vlltr.service.settings import Settings

JSON = "application/json"
JSON_ROOM = 64 * 1024  # bytes of a JSON body beside its base64 images (options, labels, filenames)


@dataclass(frozen=True)
class QueryOptions:
    """The options given as query parameters."""

    top_k: int = 5
    explain: bool = False
    classes: list[str] | None = None
    labels: list[str] | None = None


async def option_queries(
    top_k: Annotated[
        int,
        Query(
            ge=1,
            description="how many classes to return, best first (at most the "
            "`max_top_k` setting; capped at the number of classes)",
        ),
    ] = 5,
    explain: Annotated[
        bool,
        Query(
            description="add, per class, the vision- and language-branch probabilities and the anchor sentences "
            "with the head's attention weights (best first)"
        ),
    ] = False,
    classes: Annotated[
        list[str] | None,
        Query(
            max_length=MAX_SUBSET,
            description="restrict classification to these served classes (repeat the parameter; names that "
            "`GET /v1/classes` lists; not together with `labels`)",
        ),
    ] = None,
    labels: Annotated[
        list[str] | None,
        Query(
            max_length=MAX_LABELS,
            description="rank the image against these free-text labels instead of the class table "
            f"(zero-shot; repeat the parameter; 1-{MAX_LABEL_CHARS} characters each, distinct; nothing is added)",
        ),
    ] = None,
) -> QueryOptions:
    """The options of a classify request given in its query.

    One `async` dependency holds every query parameter of the classify routes: FastAPI runs a plain `def`
    dependency on its thread pool (a hop per request that cost a third of the small model's throughput on two
    cores, wrk: 867 -> 557 images/s), and it resolves each dependency's parameters from every source (path,
    query, headers, cookies) anew on every request."""
    return QueryOptions(top_k, explain, classes, labels)


OptionQueries = Annotated[QueryOptions, Depends(option_queries)]


def options_from(query: QueryOptions, body: ClassifyOptionFields | None) -> ClassifyOptions:
    """The request's options: the JSON body's fields where given, else the query's, checked against the rules
    the OpenAPI document states (`ClassValidationError` 422; the served names are checked when the images are
    scored). A query list the body replaces must still be one the query could give (`ApiError` 422 otherwise):
    a request breaking the document's item rules is refused whichever list is used."""
    if body is not None:
        if body.classes is not None:
            _refuse_broken("query.classes", query.classes, label=False)
        if body.labels is not None:
            _refuse_broken("query.labels", query.labels, label=True)
    explain = body.explain if body is not None and body.explain is not None else query.explain
    classes = body.classes if body is not None and body.classes is not None else query.classes
    labels = body.labels if body is not None and body.labels is not None else query.labels
    options = ClassifyOptions(
        explain=explain,
        classes=tuple(classes) if classes is not None else None,
        labels=tuple(labels) if labels is not None else None,
    )
    check_option_rules(options)
    return options


def _refuse_broken(where: str, values: list[str] | None, *, label: bool) -> None:
    broken = broken_item_rule(where, values or (), label=label)
    if broken:
        raise ApiError(422, "invalid", broken)


def decode_base64(text: str, where: str) -> bytes:
    """The bytes of a padded standard base64 string, no whitespace (a `data:...;base64,` prefix is allowed);
    `ApiError` 422 if it is not."""
    if text.startswith("data:") and "," in text[:256]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid", f"{where}: not valid base64") from None


def _encoded_size(n: int) -> int:
    return 4 * ((n + 2) // 3)


async def _json_body(request: Request, model: type[BaseModel], limit: int, hold: BodyHold) -> Any:
    raw = await read_body(request, limit=limit, hold=hold)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid", f"JSON body: {describe_validation_errors(exc.errors())}") from None


async def json_image(request: Request, settings: Settings, hold: BodyHold) -> tuple[bytes, ClassifyJson]:
    """The image of a JSON `POST /v1/classify` and the body (for its options)."""
    limit = _encoded_size(settings.max_image_bytes) + JSON_ROOM
    body: ClassifyJson = await _json_body(request, ClassifyJson, limit, hold)
    return decode_base64(body.image, "image"), body


async def json_batch_images(
    request: Request, settings: Settings, hold: BodyHold
) -> tuple[ClassifyBatchJson, list[Part], list[Exception | None]]:
    """The images of a JSON `POST /v1/classify/batch`: the body, one part per image, and per image the error
    that keeps it from being classified (None: classify it)."""
    limit = settings.max_batch_files * (_encoded_size(settings.max_image_bytes) + 1024) + JSON_ROOM
    body: ClassifyBatchJson = await _json_body(request, ClassifyBatchJson, limit, hold)
    if len(body.images) > settings.max_batch_files:
        raise ApiError(413, "too_large", f"too many files: at most {settings.max_batch_files} per request")
    parts: list[Part] = []
    errors: list[Exception | None] = []
    for i, image in enumerate(body.images):
        part = Part("images", image.filename, None)
        try:
            part.data = bytearray(decode_base64(image.data, f"images[{i}].data"))
            errors.append(None)
        except ApiError as exc:
            errors.append(exc)
        parts.append(part)
    return body, parts, errors


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` inlined (an OpenAPI request body cannot point into them)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_PLAIN = {
    "predictions": [
        {"label": "digit three", "score": 0.91, "class_id": 3, "explanation": None},
        {"label": "digit eight", "score": 0.04, "class_id": 8, "explanation": None},
    ],
    "confidence": 0.91,
    "unknown": False,
    "unknown_score": 0.42,
    "bundle_id": "3f2a9c1e0b7d",
    "class_table_version": 1,
}
_EXPLAINED = {
    "predictions": [
        {
            "label": "digit three",
            "score": 0.91,
            "class_id": 3,
            "explanation": {
                "vision": 0.95,
                "language": 0.87,
                "alpha": 0.5,
                "temperature": 1.0,
                "anchors": [
                    {"text": "a handwritten three: two bumps open to the left", "weight": 0.62},
                    {"text": "the digit 3, like a backwards E with round arms", "weight": 0.38},
                ],
            },
        }
    ],
    "confidence": 0.91,
    "unknown": False,
    "unknown_score": 0.42,
    "bundle_id": "3f2a9c1e0b7d",
    "class_table_version": 1,
}
_LABELS = {
    "predictions": [
        {"label": "a handwritten three", "score": 0.83, "class_id": None, "explanation": None},
        {"label": "a handwritten eight", "score": 0.17, "class_id": None, "explanation": None},
    ],
    "confidence": 0.83,
    "unknown": None,
    "unknown_score": None,
    "bundle_id": "3f2a9c1e0b7d",
    "class_table_version": 1,
}


def classify_examples() -> dict[str, Any]:
    """The 200 answer's examples of `POST /v1/classify` (plain, `explain=true`, ad-hoc labels)."""
    return {
        "description": "the predictions, best first",
        "content": {
            JSON: {
                "examples": {
                    "plain": {"summary": "top_k=2", "value": _PLAIN},
                    "explain": {"summary": "top_k=1&explain=true", "value": _EXPLAINED},
                    "labels": {"summary": "labels=a handwritten three&labels=a handwritten eight", "value": _LABELS},
                }
            }
        },
    }


def batch_examples() -> dict[str, Any]:
    """The 200 answer's example of `POST /v1/classify/batch`: one image classified, one refused."""
    value = {
        "results": [
            {
                "index": 0,
                "filename": "three.png",
                "status": 200,
                "predictions": _PLAIN["predictions"],
                "confidence": 0.91,
                "unknown": False,
                "unknown_score": 0.42,
                "error": None,
                "class_table_version": 1,
            },
            {
                "index": 1,
                "filename": "notes.txt",
                "status": 400,
                "predictions": None,
                "confidence": None,
                "unknown": None,
                "unknown_score": None,
                "error": {"code": "bad_image", "message": "cannot identify an image in the uploaded bytes"},
                "class_table_version": None,
            },
        ],
        "bundle_id": "3f2a9c1e0b7d",
        "class_table_version": 1,
    }
    return {
        "description": "one result or error per image, in order",
        "content": {JSON: {"examples": {"mixed": {"summary": "one good image, one bad", "value": value}}}},
    }
