"""`GET /v1/classes`, `POST /v1/classes` (add a class by text), `POST /v1/classes/bulk`, `DELETE
/v1/classes/{name}`, and the admin's backup and restore: `GET /v1/classes/export`, `POST /v1/classes/import`
(JSON lines, `vlltr.service.classfile`)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header

from vlltr.errors import ClassValidationError
from vlltr.service import classfile
from vlltr.service.api.deps import AdminDep, BodyHoldDep, CoreDep, SettingsDep
from vlltr.service.api.docs import binary, error_responses
from vlltr.service.api.errors import ApiError, describe_validation_errors
from vlltr.service.api.uploads import BodyHold, read_body, read_multipart
from vlltr.service.core import ServingCore
from vlltr.service.registry import (
    TIER_NAMES,
    AddOutcome,
    NewClassText,
    descriptions_from_text,
    new_class_from_json,
    normalize_name,
    token_id,
)
from vlltr.service.schemas import (
    BulkCreate,
    BulkItem,
    BulkResponse,
    ClassCreate,
    ClassCreated,
    ClassDeleted,
    ClassInfo,
    ClassListResponse,
    ErrorBody,
    NearDuplicate,
    PromotedClass,
    QuarantinedEntry,
)
from vlltr.service.settings import Settings

router = APIRouter(prefix="/v1/classes", tags=["classes"])


class _StrictClassCreate(ClassCreate):
    model_config = {"extra": "forbid"}


@router.get("", response_model=ClassListResponse, summary="List the class table", responses=error_responses(503))
async def list_classes(core: CoreDep) -> ClassListResponse:
    """Every class of the current table, trained then added, with source, train count and anchors; then the
    stored added classes that are not served: `promoted` (the bundle trains a class of that name, which wins)
    and `quarantined` (entries that cannot be read or served, kept in the store)."""
    served = core.registry.current
    trained = core.registry.trained
    classes = []
    s = served.table.num_trained
    for i, name in enumerate(served.table.names):
        tier = TIER_NAMES[int(served.tiers[i])]
        if i < s:
            classes.append(
                ClassInfo(
                    class_id=i,
                    name=name,
                    source="trained",
                    train_count=trained.train_counts[i],
                    tier=tier,
                    anchors=list(trained.anchors[i]),
                )
            )
            continue
        added = served.added[i - s]
        classes.append(
            ClassInfo(
                class_id=i,
                name=name,
                source="added",
                train_count=0,
                tier=tier,
                anchors=list(added.anchors),
                added_at=added.record.added_at or None,
                added_by=added.record.added_by,
                metadata=dict(added.record.metadata),
            )
        )
    return ClassListResponse(
        classes=classes,
        num_trained=served.table.num_trained,
        num_added=served.table.num_added,
        bundle_id=core.bundle.bundle_id,
        class_table_version=served.version,
        store_epoch=served.state.epoch,
        promoted=[
            PromotedClass(name=p.record.name, trained_class_id=p.trained_id, added_at=p.record.added_at or None)
            for p in served.promoted
        ],
        quarantined=[QuarantinedEntry(key=q.key, reason=q.reason) for q in served.quarantined],
    )


def _caller(settings: Settings) -> str:
    token = settings.admin_token
    return token_id(token.get_secret_value() if token is not None else None)


def _json_body(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(422, "invalid", f"the body is not valid JSON: {reason}") from None


def _new_class(data: object, settings: Settings) -> NewClassText:
    try:
        parsed = _StrictClassCreate.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid", describe_validation_errors(exc.errors())) from None
    return new_class_from_json(
        parsed.model_dump(exclude_none=True),
        max_count=settings.max_descriptions,
        max_chars=settings.max_description_chars,
    )


async def _parse_json(request: Request, settings: Settings, hold: BodyHold) -> NewClassText:
    body = await read_body(request, limit=settings.max_class_upload_bytes, hold=hold)
    return _new_class(_json_body(body), settings)


async def _parse_form(request: Request, settings: Settings, hold: BodyHold) -> NewClassText:
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
    return NewClassText(normalize_name(by_name["name"].text()), tuple(descriptions))


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
    responses={
        200: {"model": ClassCreated, "description": "the class existed already with exactly these descriptions"},
        **error_responses(401, 403, 408, 409, 413, 415, 422, 503),
    },
)
async def add_class(request: Request, core: CoreDep, settings: SettingsDep, hold: BodyHoldDep) -> Response:
    """Add a class described only by text; it is predicted from the next request on, on every replica.

    The descriptions are encoded by the bundle's text encoder and the ones closest to their common
    direction become the class's anchor sentences. Existing classes whose text is nearly the same are
    reported in `near_duplicates` (the class is still added). Adding a class that exists with exactly the same
    descriptions answers 200 with it (so retrying an add is safe); other descriptions for an existing name
    answer 409. The class is kept per deployment: it survives model upgrades (each bundle derives its anchors).

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
    item = await parse(request, settings, hold)
    outcome = await core.registry.add_class(
        item.name, item.descriptions, metadata=item.metadata, added_by=_caller(settings)
    )
    assert outcome.record is not None  # created or exists; a conflict raised
    dups = [NearDuplicate(name=d.name, cosine=d.cosine) for d in outcome.near_duplicates]
    body = ClassCreated(
        name=outcome.record.name,
        created=outcome.status == "created",
        class_id=outcome.class_id,
        anchors=list(outcome.anchors) if outcome.anchors is not None else None,
        num_descriptions=len(outcome.record.descriptions),
        near_duplicates=dups,
        warnings=[
            f"{outcome.record.name!r} is very close to existing class {d.name!r} (cosine {d.cosine:.3f})" for d in dups
        ],
        bundle_id=core.bundle.bundle_id,
        class_table_version=outcome.version,
    )
    return JSONResponse(body.model_dump(), status_code=201 if outcome.status == "created" else 200)


_STATUS = {"created": 201, "exists": 200, "conflict": 409, "invalid": 422}
_CODES = {409: "conflict", 422: "invalid"}


def _bulk_item(index: int, name: str | None, outcome: AddOutcome | None, error: str | None = None) -> BulkItem:
    if outcome is None:
        return BulkItem(index=index, name=name, status=422, error=ErrorBody(code="invalid", message=error or "invalid"))
    status = _STATUS[outcome.status]
    return BulkItem(
        index=index,
        name=outcome.record.name if outcome.record is not None else name,
        status=status,
        class_id=outcome.class_id if status < 300 else None,
        anchors=list(outcome.anchors) if outcome.anchors is not None and status < 300 else None,
        near_duplicates=[NearDuplicate(name=d.name, cosine=d.cosine) for d in outcome.near_duplicates],
        error=ErrorBody(code=_CODES[status], message=outcome.message) if status >= 300 else None,
    )


async def _add_many(
    core: ServingCore, settings: Settings, parsed: list[tuple[int, str | None, NewClassText | str]]
) -> BulkResponse:
    """Add the valid entries of `parsed` (index, name, class or why it is invalid) in one go; one result each."""
    valid = [(i, c) for i, _, c in parsed if isinstance(c, NewClassText)]
    outcomes = await core.registry.add_classes([c for _, c in valid], added_by=_caller(settings)) if valid else []
    by_index = {i: o for (i, _), o in zip(valid, outcomes)}
    results = [_bulk_item(i, name, by_index.get(i), c if isinstance(c, str) else None) for i, name, c in parsed]
    version = max((o.version for o in outcomes), default=core.registry.current.version)
    return BulkResponse(
        results=results,
        created=sum(r.status == 201 for r in results),
        existing=sum(r.status == 200 for r in results),
        failed=sum(r.status >= 300 for r in results),
        bundle_id=core.bundle.bundle_id,
        class_table_version=version,
    )


def _too_many(n: int, settings: Settings) -> None:
    if n > settings.max_bulk_classes:
        raise ApiError(
            413, "too_large", f"{n} classes in one request; the limit is {settings.max_bulk_classes} (send several)"
        )


@router.post(
    "/bulk",
    response_model=BulkResponse,
    summary="Add many classes from text",
    dependencies=[AdminDep],
    responses=error_responses(401, 403, 413, 415, 422, 503),
)
async def add_classes(request: Request, core: CoreDep, settings: SettingsDep, hold: BodyHoldDep) -> BulkResponse:
    """Add many classes in one request, `{"classes": [{name, descriptions, metadata?}, ...]}` (at most
    `max_bulk_classes`), each with its own result in `results` (the status a single add would have answered:
    201, 200, 409 or 422); one bad class does not stop the others. The texts are encoded in batches and the
    store is written in one go, so this is much faster than one request per class."""
    if parse_options_header(request.headers.get("content-type", ""))[0] != b"application/json":
        raise ApiError(415, "unsupported_type", 'send application/json {"classes": [{name, descriptions}, ...]}')
    data = _json_body(await read_body(request, limit=settings.max_bulk_upload_bytes, hold=hold))
    try:
        body = BulkCreate.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid", describe_validation_errors(exc.errors())) from None
    _too_many(len(body.classes), settings)
    parsed: list[tuple[int, str | None, NewClassText | str]] = []
    for i, item in enumerate(body.classes):
        name = item.get("name") if isinstance(item.get("name"), str) else None
        try:
            parsed.append((i, name, _new_class(item, settings)))
        except ApiError as exc:
            parsed.append((i, name, f"classes[{i}]: {exc.message}"))
        except ClassValidationError as exc:
            parsed.append((i, name, f"classes[{i}]: {exc}"))
    return await _add_many(core, settings, parsed)


@router.get(
    "/export",
    summary="Export the added classes (JSON lines)",
    dependencies=[AdminDep],
    response_class=Response,
    responses={
        200: {"content": {classfile.MEDIA_TYPE: {}}, "description": "a header line, then one class per line"},
        **error_responses(401, 403, 503),
    },
)
async def export_classes(core: CoreDep) -> Response:
    """Every added class of the deployment's store as this replica serves it (including the promoted ones and,
    verbatim, the quarantined entries), one JSON object per line: the input of `POST /v1/classes/import` and
    of `vlltr classes import`. Bundle-independent: it holds the descriptions, not the features."""
    served = core.registry.current
    records = [c.record for c in served.added] + [p.record for p in served.promoted]
    source = f"{core.registry.store.describe()}, epoch {served.state.epoch}, version {served.version}"
    text = "".join(line + "\n" for line in classfile.export_lines(source, records, served.quarantined))
    return Response(text.encode("utf-8"), media_type=classfile.MEDIA_TYPE)


@router.post(
    "/import",
    response_model=BulkResponse,
    summary="Import classes (JSON lines)",
    dependencies=[AdminDep],
    openapi_extra={
        "requestBody": {"required": True, "content": {classfile.MEDIA_TYPE: {"schema": {"type": "string"}}}}
    },
    responses=error_responses(401, 403, 413, 503),
)
async def import_classes(request: Request, core: CoreDep, settings: SettingsDep, hold: BodyHoldDep) -> BulkResponse:
    """Add the classes of an export (`GET /v1/classes/export`, `vlltr classes export`), keeping when and by whom
    each was added; each line gets its own result (`index` is the line number). A class that exists with the
    same descriptions is left as it is (200), one with other descriptions is not replaced (409); header lines
    and quarantined entries are skipped. At most `max_bulk_classes` classes per request."""
    body = await read_body(request, limit=settings.max_bulk_upload_bytes, hold=hold)
    lines = list(classfile.read_lines(body.split(b"\n")))
    _too_many(sum(line.data is not None for line in lines), settings)
    parsed: list[tuple[int, str | None, NewClassText | str]] = []
    for line in lines:
        if line.skipped:
            continue
        if line.data is None:
            parsed.append((line.line, None, line.error or f"line {line.line} cannot be read"))
            continue
        name = line.data.get("name") if isinstance(line.data.get("name"), str) else None
        try:
            item = new_class_from_json(
                line.data,
                max_count=settings.max_descriptions,
                max_chars=settings.max_description_chars,
                provenance=True,
            )
            parsed.append((line.line, name, item))
        except ClassValidationError as exc:
            parsed.append((line.line, name, f"line {line.line}: {exc}"))
    return await _add_many(core, settings, parsed)


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
