"""The OpenAPI document with the limits this service really enforces.

The routes describe their bodies once, at import time; the limits that come from the settings (`max_top_k`,
`max_batch_files`, `max_descriptions`, `max_description_chars`) and the text rules of `vlltr.service.registry`
(class names and descriptions: NFC, stripped, no control or invisible characters) are written into the
document when it is first built, so a client generated from it sends requests the service accepts, and a
schema fuzzer finds the same boundaries the service checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from vlltr.service.api.classify import RAW_IMAGE_TYPES
from vlltr.service.explain import MAX_LABEL_CHARS, MAX_LABELS, MAX_SUBSET, MAX_SUBSET_NAME_CHARS
from vlltr.service.registry import MAX_NAME_CHARS
from vlltr.service.settings import Settings

IMAGE_TYPES = ", ".join(RAW_IMAGE_TYPES)
# What `vlltr.service.api.inputs.decode_base64` reads: padded standard base64, optionally as a data URL.
BASE64_PATTERN = "^(?:data:[^,]{0,250},)?(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


# C0 and C1 control characters (a pattern can list them cheaply; the service refuses them in names, and in
# descriptions all but tab).
_CONTROLS = "\\u0000-\\u001f\\u007f-\\u009f"
_CONTROLS_BUT_TAB = "\\u0000-\\u0008\\u000a-\\u001f\\u007f-\\u009f"


def name_pattern() -> str:
    """The class-name rule a pattern can state: not blank, no path separator, no control character. The rest
    (at most 100 characters after stripping, no invisible characters, not dots only) is in the field's
    description: a pattern naming every refused Unicode category would be tens of kilobytes, too slow for
    request generators."""
    allowed = f"[^/\\\\{_CONTROLS}]"
    return f"^{allowed}*[^\\s/\\\\{_CONTROLS}]{allowed}*$"


def description_pattern() -> str:
    """A description is not blank (it is stripped) and holds no control character but tab."""
    allowed = f"[^{_CONTROLS_BUT_TAB}]"
    return f"^{allowed}*[^\\s{_CONTROLS_BUT_TAB}]{allowed}*$"


def _walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _param(operation: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = next(p for p in operation.get("parameters", []) if p["name"] == name)["schema"]
    return schema


def _array_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The array branch of an optional (`anyOf` with null) array schema."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            return branch  # type: ignore[no-any-return]
    return schema


def _classify_limits(operation: dict[str, Any], settings: Settings, *, batch: bool) -> None:
    _param(operation, "top_k")["maximum"] = settings.max_top_k
    subset_name = {"type": "string", "minLength": 1, "maxLength": MAX_SUBSET_NAME_CHARS}
    _array_schema(_param(operation, "classes"))["items"] = subset_name
    labels = _array_schema(_param(operation, "labels"))
    labels["items"] = _label_schema()
    labels["minItems"] = 1
    labels["uniqueItems"] = True
    _array_schema(_param(operation, "classes"))["minItems"] = 1
    content = operation["requestBody"]["content"]
    body = content["application/json"]["schema"]
    body["not"] = {"required": ["classes", "labels"]}  # a subset filter or ad-hoc labels, not both
    props = body["properties"]
    for branch in props["top_k"].get("anyOf", []):
        if branch.get("type") == "integer":
            branch["maximum"] = settings.max_top_k
    for branch in props["labels"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["items"] = _label_schema()
            branch["uniqueItems"] = True
    image = {"contentEncoding": "base64", "contentMediaType": "image/png", "pattern": BASE64_PATTERN}
    if batch:
        props["images"]["maxItems"] = settings.max_batch_files
        # No `pattern` on an image here: data that is not base64 is that image's own error in a 200 answer.
        props["images"]["items"]["properties"]["data"].update({k: v for k, v in image.items() if k != "pattern"})
        files = content["multipart/form-data"]["schema"]["properties"]["files"]
        files.update({"minItems": 1, "maxItems": settings.max_batch_files})
        # No `minLength` on a file here: an empty image is that image's own error in a 200 answer.
        content["multipart/form-data"]["schema"]["additionalProperties"] = False
        content["multipart/form-data"]["encoding"] = {"files": {"contentType": IMAGE_TYPES}}
    else:
        props["image"].update(image)
        content["multipart/form-data"]["schema"]["properties"]["file"]["minLength"] = 1
        content["multipart/form-data"]["schema"]["additionalProperties"] = False
        content["multipart/form-data"]["encoding"] = {"file": {"contentType": IMAGE_TYPES}}
        for media_type in RAW_IMAGE_TYPES:
            content[media_type]["schema"]["minLength"] = 1


def _label_schema() -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS, "pattern": "\\S"}


def _class_text_limits(schema: dict[str, Any], settings: Settings) -> None:
    props = schema["properties"]
    props["name"].update({"maxLength": MAX_NAME_CHARS, "pattern": name_pattern()})
    props["descriptions"].update({"minItems": 1, "maxItems": settings.max_descriptions})
    props["descriptions"]["items"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_description_chars,
        "pattern": description_pattern(),
    }


def truthful_openapi(app: FastAPI, settings: Settings, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`build()`'s document (FastAPI's `openapi`) with this service's real limits written in, built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = build()
    paths = doc["paths"]
    _classify_limits(paths["/v1/classify"]["post"], settings, batch=False)
    _classify_limits(paths["/v1/classify/batch"]["post"], settings, batch=True)
    create = paths["/v1/classes"]["post"]["requestBody"]["content"]
    _class_text_limits(create["application/json"]["schema"], settings)
    create["application/json"]["schema"]["additionalProperties"] = False
    # The multipart form keeps its plain schema: every part is text on the wire, so a generator's "wrong type"
    # (a number for the name) is a valid name there.
    delete = paths["/v1/classes/{name}"]["delete"]
    _param(delete, "name").update({"minLength": 1, "maxLength": MAX_NAME_CHARS, "pattern": name_pattern()})
    next(p for p in delete["parameters"] if p["name"] == "name")["example"] = "red striped circle"
    app.openapi_schema = doc
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` return the document with the real limits."""
    build = app.openapi
    app.openapi = functools.partial(truthful_openapi, app, settings, build)  # type: ignore[method-assign]


__all__ = ["MAX_LABELS", "MAX_SUBSET", "install_openapi", "name_pattern", "description_pattern"]
