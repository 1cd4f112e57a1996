"""Per-request classify options: explanations, a subset of the served classes, ad-hoc candidate labels.

A plain request (no option set) never comes here: the serving core scores it exactly as before, in one
matrix product for the whole batch. A request with options is scored row by row on the inference thread:

- `explain`: for each returned class, the vision- and language-branch probabilities (calibrated, as the fused
  score mixes them: `score = alpha * vision + (1 - alpha) * language` with the bundle's `alpha`) and the
  class's anchor sentences with the head's attention weights over them, best first (they sum to 1);
- `classes`: classification restricted to a subset of the served classes: each branch's softmax is taken over
  the subset only (the same as renormalising it there), then mixed with `alpha`; a subset of added classes
  alone, in a bundle whose vision branch does not score added classes, is ranked by the language branch;
- `labels`: the image ranked against free-text candidate labels instead of the class table (CLIP zero-shot:
  each label in the class-name prompt templates through the bundle's text encoder, the unit mean of those
  sentences against the unit image feature, times the head's logit scale, softmax over the labels); nothing
  is added to the class table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlltr.errors import ClassValidationError
from vlltr.model.runtime.bundle import Bundle
from vlltr.model.runtime.head import branch_probabilities, softmax, split_temperature, temper, unit_mean
from vlltr.model.runtime.prompts import name_prompts
from vlltr.model.runtime.unknown import Nearness
from vlltr.service.registry import ServedTable, TrainedClasses
from vlltr.service.schemas import AnchorWeight, Explanation, Prediction

MAX_LABELS = 64  # candidate labels per request
MAX_LABEL_CHARS = 200
MAX_SUBSET = 4096  # class names in a subset filter
MAX_SUBSET_NAME_CHARS = 200  # a subset filter's name; longer than any served class's name may be
LABEL_CACHE_SIZE = 4096  # label -> text feature, so repeated candidate lists cost no text-encoder run


@dataclass(frozen=True)
class ClassifyOptions:
    """What a classify request asks beyond its top-k (all off: the plain, batched path).

    Attributes:
        explain: add each prediction's branch probabilities and weighted anchor sentences.
        classes: restrict classification to these served classes (names, as `GET /v1/classes` lists them).
        labels: rank the image against these free-text labels instead of the class table.
    """

    explain: bool = False
    classes: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None

    @property
    def plain(self) -> bool:
        """True when nothing beyond the top-k is asked (the request takes the unchanged fast path)."""
        return not self.explain and self.classes is None and self.labels is None

    def to_wire(self) -> dict[str, Any]:
        """As JSON, for the link between a front-end and the engine (`from_wire` reads it back)."""
        return {
            "explain": self.explain,
            "classes": list(self.classes) if self.classes is not None else None,
            "labels": list(self.labels) if self.labels is not None else None,
        }

    @classmethod
    def from_wire(cls, values: Any) -> ClassifyOptions:
        """The options `to_wire` wrote (`ValueError` for anything else: a fault of the link, not the client)."""
        if not isinstance(values, dict) or not isinstance(values.get("explain", False), bool):
            raise ValueError(f"classify options of an unknown form: {values!r}")

        def names(key: str) -> tuple[str, ...] | None:
            value = values.get(key)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"classify options: {key} is not a list of strings")
            return tuple(value)

        return cls(explain=values.get("explain", False), classes=names("classes"), labels=names("labels"))


@dataclass(frozen=True)
class PreparedOptions:
    """`ClassifyOptions` made ready for the inference thread (label features computed, names checked)."""

    options: ClassifyOptions
    label_features: np.ndarray | None = None  # [L, D] unit text directions of `options.labels`


def check_option_rules(options: ClassifyOptions) -> None:
    """Raise `ClassValidationError` (422) for options that break a rule the OpenAPI document states, whatever
    the served table: both `classes` and `labels`, an empty or oversized list, a label too long or blank, a
    class name too long. Checked for the request before any image, so a batch whose images all fail to decode
    is still refused for its options."""
    if options.classes is not None and options.labels is not None:
        raise ClassValidationError("give either classes (a subset of the served classes) or labels, not both")
    if options.labels is not None:
        if not 1 <= len(options.labels) <= MAX_LABELS:
            raise ClassValidationError(f"labels: give 1 to {MAX_LABELS} candidate labels, got {len(options.labels)}")
        broken = broken_item_rule("labels", options.labels, label=True)
        if broken:
            raise ClassValidationError(broken)
    if options.classes is not None:
        if not 1 <= len(options.classes) <= MAX_SUBSET:
            raise ClassValidationError(f"classes: give 1 to {MAX_SUBSET} class names, got {len(options.classes)}")
        broken = broken_item_rule("classes", options.classes, label=False)
        if broken:
            raise ClassValidationError(broken)


def check_options(options: ClassifyOptions, served: ServedTable) -> None:
    """`check_option_rules`, and every name of a `classes` subset must be served (`ClassValidationError`)."""
    check_option_rules(options)
    if options.classes is not None:
        missing = [name for name in options.classes if served.table.index_of(name) is None]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            raise ClassValidationError(f"classes: not served: {shown} (GET /v1/classes lists the served classes)")


def broken_item_rule(where: str, values: Sequence[str], *, label: bool) -> str | None:
    """The message for the first item rule `values` breaks, None when it keeps them all: candidate labels
    (`label=True`) need 1 to `MAX_LABEL_CHARS` non-blank characters each and must be distinct; a subset
    filter's names need 1 to `MAX_SUBSET_NAME_CHARS` characters. `where` names the list in the message."""
    limit = MAX_LABEL_CHARS if label else MAX_SUBSET_NAME_CHARS
    for i, value in enumerate(values):
        if not (value.strip() if label else value) or len(value) > limit:
            what = "a label needs" if label else "a class name has"
            return f"{where}[{i}]: {what} 1 to {limit} {'non-blank ' if label else ''}characters"
    if label and len(set(values)) != len(values):
        return f"{where}: each candidate label may appear once"
    return None


class LabelEncoder:
    """Text features of ad-hoc labels: each label in the class-name prompt templates, unit mean, cached."""

    def __init__(self, encode_texts: Callable[[Sequence[str]], np.ndarray], size: int = LABEL_CACHE_SIZE) -> None:
        self._encode = encode_texts
        self._size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def features(self, labels: Sequence[str]) -> np.ndarray:
        """`[L, D]` unit text directions of `labels` (blocking: runs the text encoder for labels not cached)."""
        with self._lock:
            known = {label: self._cache[label] for label in labels if label in self._cache}
            for label in known:
                self._cache.move_to_end(label)
        todo = [label for label in dict.fromkeys(labels) if label not in known]
        if todo:
            prompts = [p for label in todo for p in name_prompts(label)]
            feats = self._encode(prompts)
            n = len(prompts) // len(todo)
            fresh = {label: unit_mean(feats[i * n : (i + 1) * n]) for i, label in enumerate(todo)}
            known.update(fresh)
            with self._lock:
                self._cache.update(fresh)
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
        return np.stack([known[label] for label in labels])


def anchor_texts(trained: TrainedClasses, served: ServedTable, class_id: int) -> tuple[str, ...]:
    """The anchor sentences of a served class, in the order of its anchor rows."""
    s = served.table.num_trained
    if class_id < s:
        return trained.anchors[class_id]
    return served.added[class_id - s].anchors


def _unit(f: np.ndarray) -> np.ndarray:
    unit: np.ndarray = f / max(float(np.linalg.norm(f)), 1e-12)
    return unit


def score_labels(
    feature: np.ndarray, label_features: np.ndarray, labels: Sequence[str], logit_scale: float, k: int
) -> tuple[np.ndarray, np.ndarray, list[Prediction]]:
    """Zero-shot ranking of one image against the candidate labels: `(ids, scores, predictions)`."""
    logits = np.float32(logit_scale) * (label_features @ _unit(feature))
    probs = softmax(logits[None, :], axis=-1)[0]
    order = np.argsort(-probs, kind="stable")[: min(k, len(labels))]
    predictions = [Prediction(label=labels[int(i)], score=float(probs[i]), class_id=None) for i in order]
    return order, probs[order], predictions


class OptionScorer:
    """Scores single images with options against a served table (the inference thread calls it)."""

    def __init__(self, bundle: Bundle, trained: TrainedClasses) -> None:
        self.bundle = bundle
        self.trained = trained

    def score(
        self, feature: np.ndarray, served: ServedTable, prepared: PreparedOptions, k: int
    ) -> tuple[np.ndarray, np.ndarray, list[Prediction], Nearness | None]:
        """`(class ids, scores, predictions, nearness)` of one image's raw feature `[D]`, best first; `nearness`
        holds the `unknown` verdict's logit scores over all served classes, whatever the subset (the verdict
        asks whether the image is far from every class), None for ad-hoc labels.

        For ad-hoc labels the ids index `options.labels` and the predictions carry no class id."""
        b = self.bundle
        options = prepared.options
        if prepared.label_features is not None and options.labels is not None:
            return (*score_labels(feature, prepared.label_features, options.labels, b.head.logit_scale, k), None)
        table = served.table
        f = np.asarray(feature, dtype=np.float32)[None, :]
        queries = b.head.queries(f)
        cal = b.calibration
        z_vis, z_lin = b.head.vision_logits(f), table.language_logits(queries, f)
        near = Nearness.of(z_vis, z_lin, b.head.logit_scale, f, b.prototypes)
        vis, lin = branch_probabilities(z_vis, z_lin, b.log_prior, **cal.scoring_options())
        vision = np.zeros(table.num_classes, dtype=np.float32)
        vision[: vis.shape[1]] = vis[0]
        language = lin[0]
        alpha = float(b.alpha)
        if options.classes is not None:
            ids = np.array(sorted({i for n in options.classes if (i := table.index_of(n)) is not None}), dtype=np.intp)
            vision, language = _restrict(vision, ids), _restrict(language, ids)
            if not vision.any():
                alpha = 0.0  # no class of the subset has a vision term: the language branch ranks them alone
        else:
            ids = np.arange(table.num_classes)
        mixture = np.float32(alpha) * vision[ids] + np.float32(1.0 - alpha) * language[ids]
        # A format-1 ("branches") bundle's temperature is already inside each branch.
        temperature = split_temperature(cal.temperature, cal.temperature_on)[1]
        fused = temper(mixture[None, :], temperature)[0]
        order = np.lexsort((ids, -fused))[: min(k, ids.size)]
        chosen, scores = ids[order], fused[order]
        weights = table.attention(queries, chosen)[0] if options.explain else None
        predictions = []
        for j, (i, score) in enumerate(zip(chosen.tolist(), scores.tolist())):
            explanation = None
            if weights is not None:
                texts = anchor_texts(self.trained, served, i)
                pairs = sorted(
                    ((texts[m], float(w)) for m, w in enumerate(weights[j][: len(texts)])), key=lambda p: -p[1]
                )
                explanation = Explanation(
                    vision=float(vision[i]),
                    language=float(language[i]),
                    alpha=alpha,
                    temperature=temperature,
                    anchors=[AnchorWeight(text=t, weight=w) for t, w in pairs],
                )
            predictions.append(
                Prediction(label=table.names[i], score=float(score), class_id=i, explanation=explanation)
            )
        return chosen, scores, predictions, near


def _restrict(p: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`p` renormalised over `ids` (0 elsewhere); all zeros when it has no mass there."""
    out = np.zeros_like(p)
    total = float(p[ids].sum())
    if total > 0:
        out[ids] = p[ids] / np.float32(total)
    return out
