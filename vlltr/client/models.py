"""Typed results of the HTTP API, read from its JSON answers (the fields the OpenAPI document describes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AnchorWeight:
    """One anchor sentence of a class and the head's attention weight on it for the image."""

    text: str
    weight: float


@dataclass(frozen=True)
class Explanation:
    """Why a class got its score: `score` is `(alpha * vision + (1 - alpha) * language) ** (1 / temperature)`,
    renormalised over the ranked classes; anchors best first."""

    vision: float
    language: float
    alpha: float
    anchors: tuple[AnchorWeight, ...]
    temperature: float = 1.0  # services before bundle format 2 send none: their branches carried it

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Explanation:
        return cls(
            vision=float(values["vision"]),
            language=float(values["language"]),
            alpha=float(values["alpha"]),
            anchors=tuple(AnchorWeight(str(a["text"]), float(a["weight"])) for a in values["anchors"]),
            temperature=float(values.get("temperature", 1.0)),
        )


@dataclass(frozen=True)
class Prediction:
    """One ranked class (or ad-hoc label: `class_id` None) of one image."""

    label: str
    score: float
    class_id: int | None
    explanation: Explanation | None = None

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Prediction:
        explanation = values.get("explanation")
        return cls(
            label=str(values["label"]),
            score=float(values["score"]),
            class_id=None if values.get("class_id") is None else int(values["class_id"]),
            explanation=Explanation.from_json(explanation) if explanation else None,
        )


def _verdict(values: dict[str, Any]) -> dict[str, Any]:
    """`confidence`, `unknown` and `unknown_score` of an answer (None where absent)."""
    confidence, unknown, score = values.get("confidence"), values.get("unknown"), values.get("unknown_score")
    return {
        "confidence": None if confidence is None else float(confidence),
        "unknown": None if unknown is None else bool(unknown),
        "unknown_score": None if score is None else float(score),
    }


@dataclass(frozen=True)
class Classification:
    """The answer for one image: predictions best first, the bundle and class-table version that answered, the
    top class's calibrated `confidence` and the `unknown` verdict (None: no verdict, e.g. a bundle without a
    fitted threshold, or a server that predates it)."""

    predictions: tuple[Prediction, ...]
    bundle_id: str
    class_table_version: int
    confidence: float | None = None
    unknown: bool | None = None
    unknown_score: float | None = None

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Classification:
        return cls(
            predictions=tuple(Prediction.from_json(p) for p in values["predictions"]),
            bundle_id=str(values["bundle_id"]),
            class_table_version=int(values["class_table_version"]),
            **_verdict(values),
        )

    @property
    def best(self) -> Prediction:
        """The top prediction."""
        return self.predictions[0]


@dataclass(frozen=True)
class ErrorInfo:
    """An error answer's `{code, message}` and its HTTP status."""

    status: int
    code: str
    message: str


@dataclass(frozen=True)
class BatchResult:
    """One image of a batch: its predictions (`error` None) or its own error."""

    index: int
    filename: str | None
    status: int
    predictions: tuple[Prediction, ...] | None
    error: ErrorInfo | None
    class_table_version: int | None
    confidence: float | None = None
    unknown: bool | None = None  # as in `Classification`
    unknown_score: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_json(cls, values: dict[str, Any], index: int | None = None) -> BatchResult:
        error = values.get("error")
        predictions = values.get("predictions")
        status = int(values["status"])
        return cls(
            index=int(values["index"]) if index is None else index,
            filename=values.get("filename"),
            status=status,
            predictions=tuple(Prediction.from_json(p) for p in predictions) if predictions is not None else None,
            error=ErrorInfo(status, str(error["code"]), str(error["message"])) if error else None,
            class_table_version=values.get("class_table_version"),
            **_verdict(values),
        )


@dataclass(frozen=True)
class ClassInfo:
    """A served class (`GET /v1/classes`)."""

    class_id: int
    name: str
    source: str
    train_count: int
    tier: str
    anchors: tuple[str, ...]
    added_at: str | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ClassInfo:
        return cls(
            class_id=int(values["class_id"]),
            name=str(values["name"]),
            source=str(values["source"]),
            train_count=int(values["train_count"]),
            tier=str(values["tier"]),
            anchors=tuple(values.get("anchors") or ()),
            added_at=values.get("added_at"),
            metadata=values.get("metadata"),
        )


@dataclass(frozen=True)
class ClassList:
    """The class table."""

    classes: tuple[ClassInfo, ...]
    bundle_id: str
    class_table_version: int

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ClassList:
        return cls(
            classes=tuple(ClassInfo.from_json(c) for c in values["classes"]),
            bundle_id=str(values["bundle_id"]),
            class_table_version=int(values["class_table_version"]),
        )


@dataclass(frozen=True)
class AddedClass:
    """The answer to adding a class: `created` False when it existed with the same descriptions."""

    name: str
    created: bool
    class_id: int | None
    anchors: tuple[str, ...] | None
    warnings: tuple[str, ...]
    class_table_version: int
    near_duplicates: tuple[tuple[str, float], ...] = field(default=())

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> AddedClass:
        anchors = values.get("anchors")
        return cls(
            name=str(values["name"]),
            created=bool(values.get("created", True)),
            class_id=values.get("class_id"),
            anchors=tuple(anchors) if anchors is not None else None,
            warnings=tuple(values.get("warnings") or ()),
            class_table_version=int(values["class_table_version"]),
            near_duplicates=tuple((str(d["name"]), float(d["cosine"])) for d in values.get("near_duplicates") or ()),
        )
