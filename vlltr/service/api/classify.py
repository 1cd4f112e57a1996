"""`POST /v1/classify` (one image: a multipart field, the raw body or base64 in JSON) and `POST /v1/classify/batch`
(multipart or JSON), with the per-request options of `vlltr.service.explain` (explanations, a class subset,
ad-hoc labels) from the query or the JSON body."""

from __future__ import annotations

from fastapi import APIRouter, Request
from python_multipart.multipart import parse_options_header

from vlltr.errors import ImageTooLargeError
from vlltr.service.api.deps import classifier_of, held_body
from vlltr.service.api.docs import binary, error_responses, multipart_body
from vlltr.service.api.errors import ApiError, answer_for, count_rejection, retry_after_s
from vlltr.service.api.inputs import (
    JSON,
    OptionQueries,
    QueryOptions,
    batch_examples,
    classify_examples,
    json_batch_images,
    json_image,
    json_schema,
    options_from,
)
from vlltr.service.api.uploads import BodyHold, Part, read_body, read_multipart
from vlltr.service.core import Answer, Classifier
from vlltr.service.schemas import BatchItem, BatchResponse, ClassifyBatchJson, ClassifyJson, ClassifyResponse, ErrorBody
from vlltr.service.settings import Settings

router = APIRouter(prefix="/v1/classify", tags=["classify"])

# Content types `POST /v1/classify` reads as a raw image body, with the decoder format each names (every format
# the service decodes, `vlltr.model.runtime.preprocess.SUPPORTED_FORMATS`). The image's format is read from its
# bytes, as for a multipart upload, whose part content type is not trusted either: the header chooses how
# the body is read, not how it is decoded.
RAW_IMAGE_TYPES: dict[str, str] = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
MULTIPART = "multipart/form-data"


def _check_top_k(top_k: int, settings: Settings) -> None:
    if top_k > settings.max_top_k:
        raise ApiError(422, "invalid", f"query.top_k: {top_k} is over the limit of {settings.max_top_k}")


def _files(parts: list[Part], field: str) -> list[Part]:
    unknown = sorted({p.name for p in parts if p.name != field})
    if unknown:
        raise ApiError(422, "invalid", f"unexpected form field(s) {unknown}; send the image(s) as {field!r}")
    files = [p for p in parts if p.name == field]
    if not files:
        raise ApiError(422, "invalid", f"form field {field!r} is missing: send the image(s) as {field!r}")
    not_files = [p.name for p in files if not p.is_file]
    if not_files:
        raise ApiError(422, "invalid", f"form field {field!r} must be a file upload (with a filename)")
    return files


def _media_type(request: Request) -> str:
    media_type, _ = parse_options_header(request.headers.get("content-type", ""))
    return media_type.decode("latin-1").lower()


async def _one_image(
    request: Request, settings: Settings, hold: BodyHold
) -> tuple[bytes | bytearray, ClassifyJson | None]:
    """The image of a `POST /v1/classify`: multipart field `file`, the whole body for a raw image type, or
    base64 in a JSON body (returned too: it may carry options)."""
    media_type = _media_type(request)
    if media_type in RAW_IMAGE_TYPES:
        return await read_body(request, limit=settings.max_image_bytes, hold=hold), None
    if media_type == JSON:
        return await json_image(request, settings, hold)
    if media_type != MULTIPART:
        raise ApiError(
            415,
            "unsupported_type",
            f'send the image as multipart/form-data (field \'file\'), as JSON {{"image": "<base64>"}} or as '
            f"the whole body with content type {', '.join(RAW_IMAGE_TYPES)}; got content type {media_type or 'none'}",
        )
    parts = await read_multipart(
        request, file_limit=settings.max_image_bytes, max_files=1, expected="one image in field 'file'", hold=hold
    )
    return _files(parts, "file")[0].data, None


@router.post(
    "",
    response_model=ClassifyResponse,
    summary="Classify one image",
    responses={**error_responses(400, 408, 413, 415, 422, 503), 200: classify_examples()},
    openapi_extra=multipart_body(
        {"file": binary("the image (JPEG, PNG, WebP, GIF, BMP or TIFF)")},
        ["file"],
        raw_types=list(RAW_IMAGE_TYPES),
        json_body=json_schema(ClassifyJson),
    ),
)
async def classify_image(request: Request, query: OptionQueries) -> ClassifyResponse:
    """Classify one image: multipart field `file`, the image itself as the body with its content type
    (`image/jpeg`, `image/png`, `image/webp`, `image/gif`, `image/bmp`, `image/tiff`), or JSON
    `{"image": "<base64>"}`. All give the same answer under the same limits; the image's format is read from
    its bytes either way.

    Options (query, or fields of the JSON body): `explain=true` adds, per class, the vision- and
    language-branch probabilities (`score = alpha * vision + (1 - alpha) * language`) and its anchor sentences
    with the head's attention weights, best first; `classes` (repeatable) restricts the answer to those served
    classes; `labels` (repeatable) ranks the image against those free-text labels instead (zero-shot, nothing
    is added).

    `curl -F file=@cat.jpg 'http://localhost:8000/v1/classify?top_k=3&explain=true'`
    `curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'http://localhost:8000/v1/classify?top_k=3'`
    """
    core = classifier_of(request)
    settings = core.settings
    _check_top_k(query.top_k, settings)
    core.check_accepting(1)  # refuse before reading a body we could not serve
    with held_body(request) as hold:
        data, body = await _one_image(request, settings, hold)
        top_k = body.top_k if body is not None and body.top_k is not None else query.top_k
        _check_top_k(top_k, settings)
        scored = await core.classify(data, top_k, options_from(query, body))
    return ClassifyResponse(
        predictions=scored.predictions(),
        **scored.verdict.model_dump(),
        bundle_id=core.bundle.bundle_id,
        class_table_version=scored.version,
    )


def _item(index: int, part: Part, result: Answer | Exception, request: Request) -> BatchItem:
    if isinstance(result, Exception):
        # The status this image would have had alone, from the same table as every other error answer.
        answer = answer_for(result, retry_after_s(request))
        if answer is None:
            raise result
        count_rejection(request, answer.code)
        return BatchItem(
            index=index,
            filename=part.filename,
            status=answer.status,
            error=ErrorBody(code=answer.code, message=answer.message),
        )
    return BatchItem(
        index=index,
        filename=part.filename,
        status=200,
        predictions=result.predictions(),
        **result.verdict.model_dump(),
        class_table_version=result.version,
    )


@router.post(
    "/batch",
    response_model=BatchResponse,
    summary="Classify several images",
    responses={**error_responses(400, 408, 413, 415, 422, 503), 200: batch_examples()},
    openapi_extra=multipart_body(
        {
            "files": {
                "type": "array",
                "items": binary("an image"),
                "description": "the images (repeat the field); at most `max_batch_files`",
            }
        },
        ["files"],
        json_body=json_schema(ClassifyBatchJson),
    ),
)
async def classify_batch(request: Request, query: OptionQueries) -> BatchResponse:
    """Classify several images sent as repeated multipart field `files`, or as JSON
    `{"images": [{"data": "<base64>", "filename": "a.jpg"}, ...]}`.

    Each image gets its own result or its own error (with the status it would have had alone), in
    request order; one bad image (undecodable, over the size limit, not base64) never fails the others.
    The options of `POST /v1/classify` apply to every image.

    `curl -F files=@a.jpg -F files=@b.png http://localhost:8000/v1/classify/batch`
    """
    core = classifier_of(request)
    _check_top_k(query.top_k, core.settings)
    core.check_accepting(1)
    with held_body(request) as hold:
        return await _classify_batch(request, core, query, hold)


async def _classify_batch(request: Request, core: Classifier, query: QueryOptions, hold: BodyHold) -> BatchResponse:
    settings = core.settings
    body: ClassifyBatchJson | None = None
    if _media_type(request) == JSON:
        body, files, results = await json_batch_images(request, settings, hold)
    else:
        parts = await read_multipart(
            request,
            file_limit=settings.max_image_bytes,
            max_files=settings.max_batch_files,
            expected="images in repeated field 'files'",
            per_file_errors=True,
            hold=hold,
        )
        files = _files(parts, "files")
        results = [
            None
            if not part.oversize
            else ImageTooLargeError(
                f"file {part.filename!r} is larger than the limit of {settings.max_image_bytes} bytes",
                limit=settings.max_image_bytes,
            )
            for part in files
        ]
    top_k = body.top_k if body is not None and body.top_k is not None else query.top_k
    _check_top_k(top_k, settings)
    readable = [i for i, r in enumerate(results) if r is None]
    scored = iter(await core.classify_many([files[i].data for i in readable], top_k, options_from(query, body)))
    done: list[Answer | Exception] = [next(scored) if r is None else r for r in results]
    items = [_item(i, p, r, request) for i, (p, r) in enumerate(zip(files, done))]
    versions = [it.class_table_version for it in items if it.class_table_version is not None]
    version = max(versions) if versions else core.table_version
    return BatchResponse(results=items, bundle_id=core.bundle.bundle_id, class_table_version=version)
