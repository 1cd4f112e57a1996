"""Request and response models of the HTTP API (they are also its OpenAPI documentation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# A 1x1 PNG: the example image of the JSON request bodies.
EXAMPLE_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGM4IScHAAK2AQU0pnWqAAAAAElFTkSuQmCC"


class ErrorBody(BaseModel):
    code: str = Field(
        description="machine-readable error code, e.g. `bad_image`, `too_large`, "
        "`unsupported_type`, `invalid`, `unauthorized`, `forbidden`, `not_found`, "
        "`conflict`, `queue_full`, `not_ready`, `store_unavailable`, `internal`",
        examples=["bad_image"],
    )
    message: str = Field(
        description="what went wrong, in words", examples=["cannot identify an image in the uploaded bytes"]
    )


class ErrorResponse(BaseModel):
    """Every error answer has this shape."""

    error: ErrorBody = Field(description="the error")


class AnchorWeight(BaseModel):
    text: str = Field(description="one of the class's anchor sentences")
    weight: float = Field(description="the head's attention weight on it for this image (a class's weights sum to 1)")


class Explanation(BaseModel):
    """Why a class got its score: `score` is `(alpha * vision + (1 - alpha) * language) ** (1 / temperature)`,
    renormalised over the classes ranked (all served classes, or the `classes` subset)."""

    vision: float = Field(description="probability of the class in the vision branch (the MLP head)")
    language: float = Field(description="probability in the language branch (image vs anchor sentences)")
    alpha: float = Field(description="the bundle's fusion weight of the vision branch (0 when it had no say)")
    temperature: float = Field(
        description="the bundle's calibration temperature on the fused distribution (1 for bundles of format 1, "
        "whose branch probabilities already carry theirs)"
    )
    anchors: list[AnchorWeight] = Field(description="the class's anchor sentences with their weights, best first")


class Prediction(BaseModel):
    label: str = Field(description="class name (or, with `labels`, the candidate label)")
    score: float = Field(description="calibrated probability of the class (scores of all classes sum to 1)")
    class_id: int | None = Field(
        description="index of the class in the current class table (`GET /v1/classes`); null for an ad-hoc label"
    )
    explanation: Explanation | None = Field(default=None, description="with `explain=true`: why; else null")


CONFIDENCE = (
    "calibrated probability of the top class (its `score`; with `classes`, within the subset; with `labels`, "
    "the zero-shot softmax over the labels, which is not calibrated)"
)
UNKNOWN = (
    "true when the image is far from every served class: its `unknown_score` is below the threshold training "
    "fitted on validation data (kept in the bundle; the service's `VLLTR_UNKNOWN_THRESHOLD` overrides it). "
    "null when no threshold is known (a bundle exported before this verdict existed, and no setting) and "
    "with `labels`"
)
UNKNOWN_SCORE = (
    "the score the `unknown` verdict compares with its threshold, larger = nearer a class (the bundle's rule "
    "names it: `vision_energy`, logsumexp of the vision branch's logits; `language_cosine`, the largest cosine "
    "between the image and a class's anchor text; `probability`, the top calibrated probability; "
    "`mahalanobis`, minus the squared Mahalanobis distance to the nearest trained class's training images; or "
    "`typicality`, the smallest of the image's places (0 to 1) among in-set validation images on the scores "
    "the rule combines, `GET /v1/model` names them); null when there is no verdict"
)


class Verdict(BaseModel):
    """How sure an answer is, as it travels from the engine to a front-end (the responses carry its fields)."""

    confidence: float = Field(description=CONFIDENCE)
    unknown: bool | None = Field(default=None, description=UNKNOWN)
    unknown_score: float | None = Field(default=None, description=UNKNOWN_SCORE)


class ClassifyResponse(BaseModel):
    predictions: list[Prediction] = Field(description="the `top_k` most probable classes, best first")
    confidence: float = Field(description=CONFIDENCE)
    unknown: bool | None = Field(description=UNKNOWN)
    unknown_score: float | None = Field(description=UNKNOWN_SCORE)
    bundle_id: str = Field(description="id of the model bundle that answered")
    class_table_version: int = Field(description="version of the class table the image was scored against")


class ClassifyOptionFields(BaseModel):
    """The options of a classify request in its JSON body (each overrides the query parameter of that name)."""

    # A misspelt option is an error, not silently ignored; strict, so the body holds the types the OpenAPI
    # document states (`"top_k": true` or `"explain": 0.0` are refused, not read as 1 and false).
    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(default=None, ge=1, description="how many classes to return (as the query's `top_k`)")
    explain: bool | None = Field(default=None, description="add branch probabilities and weighted anchor sentences")
    classes: list[str] | None = Field(
        default=None, min_length=1, max_length=4096, description="restrict classification to these served classes"
    )
    labels: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="rank the image against these free-text labels instead (1-200 characters each)",
    )


class ClassifyJson(ClassifyOptionFields):
    """JSON body of `POST /v1/classify`: the image as base64."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": EXAMPLE_PNG_BASE64, "top_k": 3}]}
    )

    image: str = Field(
        min_length=1, description="the image file's bytes in base64 (a `data:image/...;base64,` prefix is allowed)"
    )


class JsonImage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(min_length=1, description="the image file's bytes in base64")
    filename: str | None = Field(default=None, max_length=255, description="a name echoed in the image's result")


class ClassifyBatchJson(ClassifyOptionFields):
    """JSON body of `POST /v1/classify/batch`: the images as base64."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [{"data": EXAMPLE_PNG_BASE64, "filename": "red.png"}]}]},
    )

    images: list[JsonImage] = Field(
        min_length=1, description="the images, each classified on its own; at most `max_batch_files`"
    )


class BatchItem(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(default=None, description="the part's filename, when one was sent")
    predictions: list[Prediction] | None = Field(default=None, description="as in `/v1/classify`; null on error")
    confidence: float | None = Field(default=None, description=f"as in `/v1/classify`; null on error. {CONFIDENCE}")
    unknown: bool | None = Field(default=None, description=f"as in `/v1/classify`; null on error. {UNKNOWN}")
    unknown_score: float | None = Field(
        default=None, description=f"as in `/v1/classify`; null on error. {UNKNOWN_SCORE}"
    )
    error: ErrorBody | None = Field(
        default=None, description="why this image failed (others are unaffected); null on success"
    )
    status: int = Field(description="the HTTP status this image alone would have received")
    class_table_version: int | None = Field(default=None, description="table version this image was scored against")


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="one entry per uploaded image, in request order")
    bundle_id: str = Field(description="id of the model bundle that answered")
    class_table_version: int = Field(description="newest class-table version used for this request")


class ClassInfo(BaseModel):
    class_id: int = Field(description="index in the class table (scores and predictions use it)")
    name: str = Field(description="class name")
    source: Literal["trained", "added"] = Field(description="trained with the model, or added by text")
    train_count: int = Field(description="training images of the class (0 for added classes)")
    tier: Literal["head", "medium", "tail", "added"] = Field(
        description="long-tail group from the train count and the bundle's shot thresholds"
    )
    anchors: list[str] = Field(description="the anchor sentences the language branch attends over")
    added_at: str | None = Field(default=None, description="when an added class was added (ISO-8601 UTC)")
    added_by: str | None = Field(
        default=None, description="who added it: `token:<id>` (a hash of the admin token, never the token) or `open`"
    )
    metadata: dict[str, Any] | None = Field(default=None, description="the user's metadata of an added class")


class PromotedClass(BaseModel):
    name: str = Field(description="the stored added class")
    trained_class_id: int = Field(description="the trained class of the same name that is served instead")
    added_at: str | None = Field(default=None, description="when the added class was added")


class QuarantinedEntry(BaseModel):
    key: str = Field(description="the stored record's key (or the line of a class-store file)")
    reason: str = Field(description="why it cannot be served; it is kept in the store as it is")


class ClassListResponse(BaseModel):
    classes: list[ClassInfo] = Field(description="every class, trained first, then added in the order added")
    num_trained: int = Field(description="classes the model was trained on")
    num_added: int = Field(description="classes added by text at run time")
    bundle_id: str = Field(description="id of the served model bundle")
    class_table_version: int = Field(description="version of this class table (bumped by every change)")
    store_epoch: str = Field(description="the class store's epoch (a random id set when the store was created)")
    promoted: list[PromotedClass] = Field(
        default_factory=list,
        description="stored added classes that this bundle trains: the trained class is served, the added one kept",
    )
    quarantined: list[QuarantinedEntry] = Field(
        default_factory=list, description="stored entries that cannot be read or served (kept in the store)"
    )


class ClassCreate(BaseModel):
    """JSON body of `POST /v1/classes` (the multipart form takes `name` plus a text `file` instead)."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "red striped circle",
                    "descriptions": ["a red circle with stripes", "a round red shape covered in stripes"],
                }
            ]
        },
    )

    name: str = Field(
        min_length=1,
        max_length=100,
        description="class name: 1-100 characters, no control characters or path separators, not only "
        "dots; "
        "unique case-insensitively (NFC-normalised)",
    )
    descriptions: list[str] = Field(
        min_length=1, description="sentences describing the class, each non-empty after stripping; limits in settings"
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="optional JSON object kept with the class (at most 4 KiB as JSON)"
    )


class NearDuplicate(BaseModel):
    name: str = Field(description="an existing class")
    cosine: float = Field(description="cosine between its text embedding and the new class's")


class ClassCreated(BaseModel):
    name: str = Field(description="the stored (NFC-normalised) name")
    created: bool = Field(
        default=True,
        description="true (201) when this request added it; false (200) when it existed already with exactly "
        "these descriptions (a retry of an add that succeeded)",
    )
    class_id: int | None = Field(description="index in the new class table")
    source: Literal["added"] = Field(default="added", description="always `added`")
    anchors: list[str] | None = Field(
        description="the descriptions chosen as anchor sentences, in anchor order (null until this replica serves it)"
    )
    num_descriptions: int = Field(description="descriptions received (after de-duplication)")
    near_duplicates: list[NearDuplicate] = Field(
        description="existing classes whose text is very close to this one (reported, not refused)"
    )
    warnings: list[str] = Field(description="human-readable notes, one per near-duplicate")
    bundle_id: str = Field(description="id of the served model bundle")
    class_table_version: int = Field(description="the class-table version that includes the new class")


class BulkCreate(BaseModel):
    """JSON body of `POST /v1/classes/bulk`."""

    classes: list[dict[str, Any]] = Field(
        description="the classes to add, each `{name, descriptions, metadata?}` as in `POST /v1/classes`",
        json_schema_extra={"items": ClassCreate.model_json_schema()},
    )


class BulkItem(BaseModel):
    index: int = Field(description="position of the class in the request (for an import: its line number)")
    name: str | None = Field(default=None, description="the class name, when it could be read")
    status: int = Field(
        description="what a single add would have answered: 201 added, 200 already there with the same "
        "descriptions, 409 the name is taken, 422 invalid"
    )
    class_id: int | None = Field(default=None, description="its index in the class table, once served")
    anchors: list[str] | None = Field(default=None, description="the chosen anchor sentences (201 and 200)")
    near_duplicates: list[NearDuplicate] = Field(default_factory=list, description="as for a single add")
    error: ErrorBody | None = Field(default=None, description="why it was not added (409, 422)")


class BulkResponse(BaseModel):
    results: list[BulkItem] = Field(description="one result per class, in request order")
    created: int = Field(description="classes added by this request")
    existing: int = Field(description="classes that were there already with the same descriptions")
    failed: int = Field(description="classes not added (conflicts and invalid ones)")
    bundle_id: str = Field(description="id of the served model bundle")
    class_table_version: int = Field(description="the class-table version after the request")


class ClassDeleted(BaseModel):
    name: str = Field(description="the deleted class")
    deleted: bool = Field(default=True, description="always true")
    bundle_id: str = Field(description="id of the served model bundle")
    class_table_version: int = Field(description="the class-table version without the class")


class ClassCounts(BaseModel):
    trained: int = Field(description="classes the model was trained on")
    added: int = Field(description="classes added by text at run time")
    total: int = Field(description="trained + added")


class UnknownRuleInfo(BaseModel):
    score: Literal["vision_energy", "language_cosine", "probability", "mahalanobis", "typicality"] = Field(
        description="the score an answer's `unknown_score` holds"
    )
    components: list[str] | None = Field(
        default=None, description="for `typicality`: the scores it combines (the least typical of them counts)"
    )
    threshold: float = Field(description="an image scoring below it is answered `unknown`")
    source: Literal["bundle", "setting"] = Field(
        description="fitted by training and stored in the bundle, or set by `VLLTR_UNKNOWN_THRESHOLD`"
    )
    fitted_on: str | None = Field(default=None, description="the split training fitted the bundle's threshold on")
    keep: float | None = Field(default=None, description="the share of that split's images the fitted threshold keeps")


class ModelInfo(BaseModel):
    bundle_id: str = Field(description="id of the served model bundle")
    arch: str = Field(description="open_clip architecture of the encoders")
    embed_dim: int = Field(description="dimension D of image and text features")
    image_size: int = Field(description="side of the square network input, in pixels")
    num_anchors: int = Field(description="anchor sentences per class (M)")
    precision: str = Field(description="encoder precision: fp32 or fp16")
    provider: str = Field(description="ONNX Runtime execution provider actually in use")
    classes: ClassCounts = Field(description="how many classes are served")
    class_table_version: int = Field(description="version of the served class table")
    created: str | None = Field(default=None, description="when the bundle was exported")
    dataset: str | None = Field(default=None, description="training dataset recorded in the bundle")
    max_batch_size: int = Field(description="most images per encoder run")
    batch_buckets: list[int] = Field(description="batch shapes the encoder runs (all warmed at start)")
    inference_lanes: int = Field(default=1, description="batches the image encoder runs at once")
    encoder_threads: int | None = Field(
        default=None,
        description="intra-op threads of each image-encoder run on CPU; null: onnxruntime's default (or a device)",
    )
    unknown_rule: UnknownRuleInfo | None = Field(
        default=None, description="how the `unknown` verdict is decided; null: no verdict (no threshold known)"
    )


class Health(BaseModel):
    status: Literal["ok"] = Field(default="ok", description="always `ok` while the process serves HTTP")


class ReadyChecks(BaseModel):
    bundle_loaded: bool = Field(description="the bundle is verified and its ONNX sessions exist")
    sessions_warmed: bool = Field(description="every batch bucket has run once")
    class_table_loaded: bool = Field(description="the class table (with added classes) is loaded")
    inference_loop_alive: bool = Field(
        description="every inference thread (one per lane) runs and its heartbeat is fresh"
    )


class Readiness(BaseModel):
    ready: bool = Field(description="true when every check passes")
    checks: ReadyChecks = Field(description="the individual checks")
    bundle_id: str | None = Field(default=None, description="id of the bundle, once loaded")
    class_table_version: int | None = Field(default=None, description="served class-table version, once loaded")
