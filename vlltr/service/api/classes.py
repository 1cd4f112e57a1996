"""`GET /v1/classes`, `POST /v1/classes` (add a class by text) and `DELETE /v1/classes/{name}`."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header

from vlltr.service.api.deps import AdminDep, BodyHoldDep, CoreDep, SettingsDep
from vlltr.service.api.docs import binary, error_responses
from vlltr.service.api.errors import ApiError, describe_validation_errors
from vlltr.service.api.uploads import BodyHold, read_body, read_multipart
from vlltr.service.registry import TIER_NAMES, descriptions_from_text, normalize_descriptions, normalize_name
from vlltr.service.schemas import (
    ClassCreate,
    ClassCreated,
    ClassDeleted,
    ClassInfo,
    ClassListResponse,
    NearDuplicate,
)
from vlltr.service.settings import Settings

router = APIRouter(prefix="/v1/classes", tags=["classes"])


class _StrictClassCreate(ClassCreate):
    model_config = {"extra": "forbid"}


@router.get("", response_model=ClassListResponse, summary="List the class table", responses=error_responses(503))
async def list_classes(core: CoreDep) -> ClassListResponse:
    """Every class of the current table, trained then added, with source, train count and anchors."""
    served = core.registry.current
    trained = core.registry.trained
    classes = []
    source: Literal["trained", "added"]
    for i, name in enumerate(served.table.names):
        if i < served.table.num_trained:
            source, count, anchors = "trained", trained.train_counts[i], list(trained.anchors[i])
        else:
            added = served.added[i - served.table.num_trained]
            source, count, anchors = "added", 0, list(added.anchors)
        classes.append(
            ClassInfo(
                class_id=i,
                name=name,
                source=source,
                train_count=count,
                tier=TIER_NAMES[int(served.tiers[i])],
                anchors=anchors,
            )
        )
    return ClassListResponse(
        classes=classes,
        num_trained=served.table.num_trained,
        num_added=served.table.num_added,
        bundle_id=core.bundle.bundle_id,
        class_table_version=served.version,
    )


async def _parse_json(request: Request, settings: Settings, hold: BodyHold) -> tuple[str, list[str]]:
    body = await read_body(request, limit=settings.max_class_upload_bytes, hold=hold)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(422, "invalid", f"the body is not valid JSON: {reason}") from None
    try:
        parsed = _StrictClassCreate.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid", describe_validation_errors(exc.errors())) from None
    return parsed.name, normalize_descriptions(
        parsed.descriptions, max_count=settings.max_descriptions, max_chars=settings.max_description_chars
    )


async def _parse_form(request: Request, settings: Settings, hold: BodyHold) -> tuple[str, list[str]]:
    parts = await read_multipart(
        request,
        file_limit=settings.max_class_upload_bytes,
        max_files=1,
        expected="'name' and a text 'file'",
        body_limit=settings.max_class_upload_bytes + 64 * 1024,
        hold=hold,
    )
    by_name = {p.name: p for p in parts}
    unknown = sorted(set(by_name) - {"name", "file"})
    if unknown:
        raise ApiError(422, "invalid", f"unexpected form field(s) {unknown}; send 'name' and 'file'")
    if "name" not in by_name:
        raise ApiError(422, "invalid", "form field 'name' is missing")
    if "file" not in by_name:
        raise ApiError(
            422, "invalid", "form field 'file' is missing: upload a UTF-8 text file, one description per line"
        )
    descriptions = descriptions_from_text(
        bytes(by_name["file"].data), max_count=settings.max_descriptions, max_chars=settings.max_description_chars
    )
    return by_name["name"].text(), descriptions


_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "name": {"type": "string", "description": "class name (same rules as in the JSON body)"},
                        "file": binary("UTF-8 text, one description per line (blank lines are skipped)"),
                    },
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ClassCreated,
    summary="Add a class from text",
    dependencies=[AdminDep],
    openapi_extra=_CREATE_BODY,
    responses=error_responses(401, 403, 408, 409, 413, 415, 422, 503),
)
async def add_class(request: Request, core: CoreDep, settings: SettingsDep, hold: BodyHoldDep) -> ClassCreated:
    """Add a class described only by text; it is predicted from the next request on, on every replica.

    The descriptions are encoded by the bundle's text encoder and the ones closest to their common
    direction become the class's anchor sentences. Existing classes whose text is nearly the same are
    reported in `near_duplicates` (the class is still added).

    `curl -H 'Content-Type: application/json' -d '{"name": "zebra", "descriptions": ["a striped horse"]}'
    http://localhost:8000/v1/classes`
    """
    ctype = parse_options_header(request.headers.get("content-type", ""))[0]
    if ctype not in (b"application/json", b"multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_type",
            "send application/json {name, descriptions} or multipart/form-data with 'name' and a text 'file'",
        )
    parse = _parse_json if ctype == b"application/json" else _parse_form
    raw_name, descriptions = await parse(request, settings, hold)
    outcome = await core.registry.add_class(normalize_name(raw_name), descriptions)
    dups = [NearDuplicate(name=d.name, cosine=d.cosine) for d in outcome.near_duplicates]
    return ClassCreated(
        name=outcome.record.name,
        class_id=outcome.class_id,
        anchors=list(outcome.record.anchors),
        num_descriptions=len(outcome.record.descriptions),
        near_duplicates=dups,
        warnings=[
            f"{outcome.record.name!r} is very close to existing class {d.name!r} (cosine {d.cosine:.3f})" for d in dups
        ],
        bundle_id=core.bundle.bundle_id,
        class_table_version=outcome.version,
    )


@router.delete(
    "/{name}",
    response_model=ClassDeleted,
    summary="Delete a class added at run time",
    dependencies=[AdminDep],
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def delete_class(name: str, core: CoreDep) -> ClassDeleted:
    """Delete a class that was added by text (trained classes cannot be deleted: 409)."""
    stored, version = await core.registry.remove_class(normalize_name(name))
    return ClassDeleted(name=stored, bundle_id=core.bundle.bundle_id, class_table_version=version)
