"""The bundle manifest (`manifest.json`, docs/bundle.md): one typed definition, written by `vlltr export` and
read by `vlltr.model.runtime.bundle.load_bundle`.

`Manifest.to_json` is what the exporter writes; `Manifest.from_json` checks a parsed manifest section by
section and refuses it with a `BundleError` whose message starts with `manifest.json:` and names the key
(`manifest.json: head.alpha must lie in [0, 1], got 1.5`). Manifests written by earlier exporters of the same
`FORMAT_VERSION` lack some keys added since (`calibration.added_class_vision`, `preprocess.jpeg_draft`,
`training.shot_thresholds`, ...): each optional key has the default those bundles were made for. Keys this
version does not know are ignored, so a newer exporter's additions do not stop an older service. The version
goes up when a key's meaning changes, so that an older service refuses a bundle it would score wrongly:
format 2 applies `calibration.temperature` to the fused distribution (`calibration.temperature_on`), which a
format-1 reader would divide each branch's logits by. This version reads `READABLE_FORMAT_VERSIONS`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeGuard

from vlltr.errors import BundleError
from vlltr.model.runtime.head import ADDED_CLASS_VISION_MODES, TEMPERATURE_MODES
from vlltr.model.runtime.preprocess import PreprocessSpec
from vlltr.model.runtime.tokenizer import TextSpec

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
TOKENIZER = "tokenizer.json"
HEAD = "head.npz"
ANCHORS = "anchors.npy"
ANCHOR_MASK = "anchor_mask.npy"
CLASSES = "classes.json"
PROTOTYPES = "prototypes.npz"  # optional: the `mahalanobis` unknown score's class statistics
REQUIRED_FILES = (IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER, HEAD, ANCHORS, ANCHOR_MASK, CLASSES)
LOG_PRIOR_RULE = "log(train_count / sum of train_count) from classes.json"
DEFAULT_LN_EPS = 1e-5  # torch.nn.LayerNorm's; manifests written before head.ln_eps existed used it
_SECTIONS = ("model", "text", "preprocess", "head", "calibration", "files")
_HASH_CHUNK = 1 << 20
Precision = Literal["fp32", "fp16"]


def _fail(message: str) -> BundleError:
    return BundleError(f"{MANIFEST}: {message}")


def _object(values: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(values, Mapping):
        raise _fail(f"section {where!r} must be an object")
    return values


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(values: Mapping[str, Any], key: str, where: str) -> int:
    value = values.get(key)
    if not _is_int(value) or value < 1:
        raise _fail(f"{where}.{key} must be a positive integer, got {value!r}")
    return int(value)


def _number(values: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    if default is not None and key not in values:
        return default
    value = values.get(key)
    if not _is_number(value):
        raise _fail(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _optional(values: Mapping[str, Any], key: str, where: str, kind: str) -> Any:
    """`values[key]` if it is of `kind` (`str`, `int`, `number`, `bool`, `object`), None when absent or null.
    `where` is the section (empty at the top level)."""
    value = values.get(key)
    if value is None:
        return None
    ok = {
        "str": isinstance(value, str),
        "int": _is_int(value),
        "number": _is_number(value),
        "bool": isinstance(value, bool),
        "object": isinstance(value, Mapping),
    }[kind]
    if not ok:
        what = {"str": "a string", "int": "an integer", "number": "a finite number", "bool": "true or false"}
        name = f"{where}.{key}" if where else key
        raise _fail(f"{name} must be {what.get(kind, 'an object')} or null, got {value!r}")
    return float(value) if kind == "number" else (dict(value) if kind == "object" else value)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class ModelInfo:
    """`model`: the open_clip architecture and the shapes its encoders were exported with."""

    embed_dim: int
    arch: str = ""
    image_size: int | None = None
    context_length: int | None = None
    quick_gelu: bool = False

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ModelInfo:
        image_size = _optional(values, "image_size", "model", "int")
        if image_size is not None and image_size < 1:
            raise _fail(f"model.image_size must be a positive integer, got {image_size!r}")
        return cls(
            embed_dim=_positive_int(values, "embed_dim", "model"),
            arch=_optional(values, "arch", "model", "str") or "",
            image_size=image_size,
            context_length=_optional(values, "context_length", "model", "int"),
            quick_gelu=bool(_optional(values, "quick_gelu", "model", "bool")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "context_length": self.context_length,
            "quick_gelu": self.quick_gelu,
        }


@dataclass(frozen=True)
class HeadInfo:
    """`head`: the LGR head's shape and scalars (its arrays are `head.npz`)."""

    num_classes: int
    num_anchors: int
    alpha: float
    logit_scale: float
    ln_eps: float = DEFAULT_LN_EPS
    v_detach: bool = False

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> HeadInfo:
        num_classes = _positive_int(values, "num_classes", "head")
        num_anchors = _positive_int(values, "num_anchors", "head")
        alpha = _number(values, "alpha", "head")
        if not 0.0 <= alpha <= 1.0:
            raise _fail(f"head.alpha must lie in [0, 1], got {alpha}")
        return cls(
            num_classes=num_classes,
            num_anchors=num_anchors,
            alpha=alpha,
            logit_scale=_number(values, "logit_scale", "head"),
            ln_eps=_number(values, "ln_eps", "head", default=DEFAULT_LN_EPS),
            v_detach=bool(_optional(values, "v_detach", "head", "bool")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "num_anchors": self.num_anchors,
            "alpha": self.alpha,
            "logit_scale": self.logit_scale,
            "num_classes": self.num_classes,
            "ln_eps": self.ln_eps,
            "v_detach": self.v_detach,
        }


# The scores an image gets (`vlltr.model.runtime.unknown`), and `typicality`, which combines some of them.
COMPONENT_SCORES = ("vision_energy", "language_cosine", "probability", "mahalanobis")
UNKNOWN_SCORES = (*COMPONENT_SCORES, "typicality")


@dataclass(frozen=True)
class UnknownRule:
    """`calibration.unknown`: when an image is far from every class. An image whose `score` falls below
    `threshold` is answered `unknown`. Scores (larger = nearer a class; `vlltr.model.runtime.unknown`):
    `vision_energy`, `logsumexp` of the raw vision logits; `language_cosine`, the largest cosine between the
    image feature and a class's attended anchor text; `probability`, the top calibrated fused probability;
    `mahalanobis`, minus the squared Mahalanobis distance to the nearest trained class's training images (the
    bundle's `prototypes.npz`); `typicality`, the smallest of the image's places among the in-set images on
    several of those (`components`: each score's quantiles over the in-set images, at evenly spaced levels from
    0 to 1). Fitted by training on the in-set images of `fitted_on`: the threshold keeps the fraction `keep` of
    them."""

    score: str
    threshold: float
    keep: float | None = None
    fitted_on: str | None = None
    components: Mapping[str, tuple[float, ...]] | None = None

    @property
    def uses(self) -> tuple[str, ...]:
        """The image scores the rule reads (its components for `typicality`)."""
        return tuple(self.components) if self.components else (self.score,)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UnknownRule:
        """Read the section; ValueError if unusable."""
        if not isinstance(values, Mapping):
            raise ValueError(f"unknown must be an object, got {type(values).__name__}")
        score = str(values.get("score", ""))
        if score not in UNKNOWN_SCORES:
            raise ValueError(f"unknown.score must be one of {UNKNOWN_SCORES}, got {score!r}")
        threshold = values.get("threshold")
        if not _is_number(threshold) or not math.isfinite(threshold):
            raise ValueError(f"unknown.threshold must be a finite number, got {threshold!r}")
        keep = values.get("keep")
        if keep is not None and not (_is_number(keep) and 0 < keep <= 1):
            raise ValueError(f"unknown.keep must lie in (0, 1], got {keep!r}")
        fitted_on = values.get("fitted_on")
        components = _components(values.get("components")) if score == "typicality" else None
        return cls(
            score,
            float(threshold),
            None if keep is None else float(keep),
            fitted_on and str(fitted_on),
            components,
        )

    def to_dict(self) -> dict[str, Any]:
        components = None if self.components is None else {k: list(v) for k, v in self.components.items()}
        return _drop_none(
            {
                "score": self.score,
                "threshold": self.threshold,
                "keep": self.keep,
                "fitted_on": self.fitted_on,
                "components": components,
            }
        )


def _components(values: Any) -> dict[str, tuple[float, ...]]:
    """`unknown.components` of a `typicality` rule: per component score, its in-set quantiles (at least two
    finite, non-decreasing numbers); ValueError if unusable."""
    if not isinstance(values, Mapping) or not values:
        raise ValueError("unknown.components must be a non-empty object for the typicality score")
    out: dict[str, tuple[float, ...]] = {}
    for name, quantiles in values.items():
        if name not in COMPONENT_SCORES:
            raise ValueError(f"unknown.components: {name!r} is not one of {COMPONENT_SCORES}")
        if (
            not isinstance(quantiles, list)
            or len(quantiles) < 2
            or not all(_is_number(q) and math.isfinite(q) for q in quantiles)
            or any(b < a for a, b in zip(quantiles, quantiles[1:]))
        ):
            raise ValueError(f"unknown.components.{name} must be at least two finite, non-decreasing numbers")
        out[name] = tuple(float(q) for q in quantiles)
    return out


@dataclass(frozen=True)
class Calibration:
    """`calibration`: logit adjustment `tau`, `temperature` and where it applies (`temperature_on`), the added
    classes' bias, how added classes enter the vision branch (`added_class_vision`, see
    `vlltr.model.runtime.head.calibrated_probabilities`) and the split it was fitted on.

    Fields a manifest (or a run's `calibration.json`) lacks read as the scoring it was calibrated for: no
    `added_class_vision` as `"none"`, no `temperature_on` as `"branches"` (T was fitted on each branch's
    logits then); one without `unknown` has no out-of-set threshold (the service then gives no `unknown` verdict
    unless its setting supplies a threshold). The prior itself is not stored: it is `LOG_PRIOR_RULE`."""

    tau: float = 0.0
    temperature: float = 1.0
    added_class_bias: float = 0.0
    added_class_vision: str = "none"
    fitted_on: str | None = None
    unknown: UnknownRule | None = None
    temperature_on: str = "branches"  # as an absent key reads; exporters of format 2 write "fused"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Calibration:
        """Read a calibration (the manifest's section, or a run's `calibration.json`); ValueError if unusable."""
        fitted_on = values.get("fitted_on")
        unknown = values.get("unknown")
        cal = cls(
            tau=float(values.get("tau", 0.0)),
            temperature=float(values.get("temperature", 1.0)),
            added_class_bias=float(values.get("added_class_bias", 0.0)),
            added_class_vision=str(values.get("added_class_vision", "none")),
            fitted_on=None if fitted_on is None else str(fitted_on),
            unknown=None if unknown is None else UnknownRule.from_dict(unknown),
            temperature_on=str(values.get("temperature_on", "branches")),
        )
        if not all(math.isfinite(v) for v in (cal.tau, cal.temperature, cal.added_class_bias)):
            raise ValueError(f"calibration values must be finite, got {cal}")
        if cal.temperature <= 0:
            raise ValueError(f"calibration temperature must be positive, got {cal.temperature}")
        if cal.added_class_vision not in ADDED_CLASS_VISION_MODES:
            raise ValueError(
                f"calibration added_class_vision must be one of {ADDED_CLASS_VISION_MODES}, "
                f"got {cal.added_class_vision!r}"
            )
        if cal.temperature_on not in TEMPERATURE_MODES:
            raise ValueError(
                f"calibration temperature_on must be one of {TEMPERATURE_MODES}, got {cal.temperature_on!r}"
            )
        return cal

    def scoring_options(self) -> dict[str, Any]:
        """The keyword arguments of `calibrated_probabilities` (numpy or torch twin) beside `alpha`."""
        return {
            "tau": self.tau,
            "temperature": self.temperature,
            "temperature_on": self.temperature_on,
            "added_class_bias": self.added_class_bias,
            "added_class_vision": self.added_class_vision,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.scoring_options(),
            "log_prior": LOG_PRIOR_RULE,
            "fitted_on": self.fitted_on,
            **({} if self.unknown is None else {"unknown": self.unknown.to_dict()}),
        }


@dataclass(frozen=True)
class FileEntry:
    """One `files` entry: the file's sha256 (hex) and size in bytes (optional in older manifests)."""

    sha256: str
    bytes: int | None = None

    @classmethod
    def of(cls, path: str | Path) -> FileEntry:
        """The entry of an existing file."""
        return cls(sha256_file(path), Path(path).stat().st_size)

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"sha256": self.sha256, "bytes": self.bytes})


@dataclass(frozen=True)
class ExportCheck:
    """`export_check`: each ONNX encoder against PyTorch (max relative difference) and the tolerance."""

    image_max_rel_diff: float | None = None
    text_max_rel_diff: float | None = None
    tolerance: float | None = None

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ExportCheck:
        return cls(*(_optional(values, k, "export_check", "number") for k in _keys(cls)))

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _keys(type(self))}


@dataclass(frozen=True)
class Fp16Check:
    """`fp16_check`: how fp16 encoders compared with fp32 on evaluation images (`--fp16` only)."""

    min_cosine: float | None = None
    min_cosine_image: float | None = None
    min_cosine_text: float | None = None
    top1_agreement: float | None = None
    max_abs_prob_diff: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    op_block_list: tuple[str, ...] = ()
    images: str | None = None

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Fp16Check:
        numbers = ("min_cosine", "min_cosine_image", "min_cosine_text", "top1_agreement", "max_abs_prob_diff")
        thresholds = _optional(values, "thresholds", "fp16_check", "object") or {}
        if not all(isinstance(k, str) and _is_number(v) for k, v in thresholds.items()):
            raise _fail(f"fp16_check.thresholds must map names to numbers, got {thresholds!r}")
        ops = values.get("op_block_list") or []
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
            raise _fail(f"fp16_check.op_block_list must be a list of operator names, got {ops!r}")
        measured = {k: _optional(values, k, "fp16_check", "number") for k in numbers}
        return cls(
            **measured,
            thresholds={k: float(v) for k, v in thresholds.items()},
            op_block_list=tuple(ops),
            images=_optional(values, "images", "fp16_check", "str"),
        )

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _keys(type(self))}
        out["thresholds"] = dict(self.thresholds)
        out["op_block_list"] = list(self.op_block_list)
        return out


@dataclass(frozen=True)
class Verification:
    """`verification`: the written bundle against PyTorch on a few images (added once that check ran)."""

    inputs: str | None = None
    max_abs_prob_diff: float | None = None
    top1_agreement: float | None = None

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Verification:
        return cls(
            _optional(values, "inputs", "verification", "str"),
            _optional(values, "max_abs_prob_diff", "verification", "number"),
            _optional(values, "top1_agreement", "verification", "number"),
        )

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _keys(type(self))}


@dataclass(frozen=True)
class ShotThresholds:
    """Train-count thresholds of the shot groups: `many` classes have more images, `few` fewer."""

    many: int
    few: int

    def to_json(self) -> dict[str, Any]:
        return {"many": self.many, "few": self.few}


def _thresholds(values: Any) -> ShotThresholds | None:
    """`{"many", "few"}` or a data config's `{"many_threshold", "few_threshold"}`; None if neither is whole."""
    if not isinstance(values, Mapping):
        return None
    many = values.get("many_threshold", values.get("many"))
    few = values.get("few_threshold", values.get("few"))
    return ShotThresholds(many, few) if _is_int(many) and _is_int(few) else None


@dataclass(frozen=True)
class TrainingInfo:
    """`training`: where the model came from. Provenance only, except the shot thresholds, which the service
    uses to name the tier (head, medium, tail) of a prediction."""

    dataset: str | None = None
    run_dir: str | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    shot_thresholds: ShotThresholds | None = None

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> TrainingInfo:
        raw = values.get("shot_thresholds")
        thresholds = _thresholds(raw)
        if raw is not None and thresholds is None:
            raise _fail(f"training.shot_thresholds must be an object with integers many and few, got {raw!r}")
        return cls(
            dataset=_optional(values, "dataset", "training", "str"),
            run_dir=_optional(values, "run_dir", "training", "str"),
            config=_optional(values, "config", "training", "object"),
            metrics=_optional(values, "metrics", "training", "object"),
            calibration=_optional(values, "calibration", "training", "object"),
            shot_thresholds=thresholds,
        )

    def shot_groups(self) -> ShotThresholds | None:
        """The recorded thresholds, else the ones of the run's data config (bundles written before
        `shot_thresholds` was recorded), else None."""
        if self.shot_thresholds is not None:
            return self.shot_thresholds
        return _thresholds((self.config or {}).get("data"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "run_dir": self.run_dir,
            "config": self.config,
            "metrics": self.metrics,
            "calibration": self.calibration,
        }
        if self.shot_thresholds is not None:
            out["shot_thresholds"] = self.shot_thresholds.to_json()
        return out


def _keys(cls: Any) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Manifest:
    """A bundle's `manifest.json`, typed. Build one with the constructor (the exporter) or `from_json`."""

    bundle_id: str
    model: ModelInfo
    text: TextSpec
    preprocess: PreprocessSpec
    head: HeadInfo
    calibration: Calibration
    files: dict[str, FileEntry]
    created: str | None = None
    precision: Precision = "fp32"
    fp16_check: Fp16Check | None = None
    export_check: ExportCheck | None = None
    training: TrainingInfo | None = None
    verification: Verification | None = None
    software: dict[str, str] | None = None  # distribution -> version of the exporting environment (`software`)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, values: Any) -> Manifest:
        """Check a parsed `manifest.json` and type it.

        Raises:
            BundleError: `manifest.json: <what is wrong>`, naming the section or key.
        """
        if not isinstance(values, Mapping):
            raise _fail(f"expected a JSON object, got {type(values).__name__}")
        version = values.get("format_version")
        readable = " and ".join(map(str, READABLE_FORMAT_VERSIONS))
        if version is None:
            raise _fail(f"format_version missing (this service reads {readable})")
        if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
            raise _fail(f"format_version {version!r} not supported (this service reads {readable})")
        for section in ("bundle_id", *_SECTIONS):
            if section not in values:
                raise _fail(f"missing section {section!r}")
        sections = {name: _object(values[name], name) for name in _SECTIONS}
        bundle_id = values["bundle_id"]
        if not isinstance(bundle_id, str) or not bundle_id:
            raise _fail("bundle_id must be a non-empty string")
        files = _files(sections["files"])
        try:
            preprocess = PreprocessSpec.from_dict(sections["preprocess"])
        except (ValueError, TypeError) as exc:
            raise _fail(f"preprocess: {exc}") from exc
        try:
            text = TextSpec.from_dict(sections["text"])
        except (ValueError, TypeError) as exc:
            raise _fail(f"text: {exc}") from exc
        try:
            calibration = Calibration.from_dict(sections["calibration"])
        except (ValueError, TypeError) as exc:
            raise _fail(f"calibration: {exc}") from exc
        if calibration.unknown is not None and "mahalanobis" in calibration.unknown.uses and PROTOTYPES not in files:
            raise _fail(f"calibration.unknown uses the mahalanobis score, but files does not list {PROTOTYPES}")
        head = HeadInfo.from_json(sections["head"])
        model = ModelInfo.from_json(sections["model"])
        if model.image_size is not None and model.image_size != preprocess.size:
            raise _fail(f"preprocess.size {preprocess.size} differs from model.image_size {model.image_size}")
        precision = values.get("precision", "fp32")
        if precision not in ("fp32", "fp16"):
            raise _fail(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        return cls(
            bundle_id=bundle_id,
            model=model,
            text=text,
            preprocess=preprocess,
            head=head,
            calibration=calibration,
            files=files,
            created=_optional(values, "created", "", "str"),
            precision=precision,
            fp16_check=_section(values, "fp16_check", Fp16Check),
            export_check=_section(values, "export_check", ExportCheck),
            training=_section(values, "training", TrainingInfo),
            verification=_section(values, "verification", Verification),
            software=_software(values),
            format_version=int(version),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as `manifest.json` (keys in the documented order)."""
        return {
            "format_version": self.format_version,
            "bundle_id": self.bundle_id,
            "created": self.created,
            "model": self.model.to_json(),
            "text": self.text.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "head": self.head.to_json(),
            "calibration": self.calibration.to_dict(),
            "precision": self.precision,
            "fp16_check": self.fp16_check.to_json() if self.fp16_check is not None else None,
            "export_check": self.export_check.to_json() if self.export_check is not None else None,
            "training": self.training.to_json() if self.training is not None else None,
            "verification": self.verification.to_json() if self.verification is not None else None,
            "software": self.software,
            "files": {name: entry.to_json() for name, entry in self.files.items()},
        }


def _software(values: Mapping[str, Any]) -> dict[str, str] | None:
    software = _optional(values, "software", "", "object")
    if software is None:
        return None
    for name, version in software.items():
        if not isinstance(version, str):
            raise _fail(f"software.{name} must be a version string, got {version!r}")
    return {str(k): v for k, v in software.items()}


def pillow_mismatch(manifest: Manifest, running: str) -> str | None:
    """A warning when the Pillow that decodes and resizes here (`running`) has another major version than the
    exporting environment's: Pillow's majors have changed resampling (Pillow 13 changed the order of the two
    resize passes for images much taller than wide), so the pixels may differ from the ones training evaluated
    on. None when they agree or the bundle does not record it."""
    recorded = (manifest.software or {}).get("pillow")
    if recorded is None or recorded.split(".")[0] == running.split(".")[0]:
        return None
    return (
        f"bundle {manifest.bundle_id} was exported with Pillow {recorded} and this service decodes with Pillow "
        f"{running}: resizing may give other pixels than the ones the model was evaluated on (install Pillow "
        f"{recorded.split('.')[0]}.x to serve exactly what training saw)"
    )


def _section(values: Mapping[str, Any], key: str, kind: Any) -> Any:
    raw = values.get(key)
    if raw is None:
        return None
    return kind.from_json(_object(raw, key))


def _files(values: Mapping[str, Any]) -> dict[str, FileEntry]:
    for name in REQUIRED_FILES:
        if name not in values:
            raise _fail(f"files does not list {name}")
    out: dict[str, FileEntry] = {}
    for name, entry in values.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise _fail(f"file name {name!r} is not a plain file name")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
            raise _fail(f"files[{name!r}] must be an object with a sha256 string")
        size = entry.get("bytes")
        if size is not None and (not _is_int(size) or size < 0):
            raise _fail(f"files[{name!r}].bytes must be a non-negative integer, got {size!r}")
        out[name] = FileEntry(entry["sha256"], size)
    return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> Manifest:
    """Read and check `manifest.json` of the bundle directory `path` (no file hashing).

    Raises:
        BundleError: no such directory, no manifest, not UTF-8 JSON, or a manifest `Manifest.from_json` refuses.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"missing file {MANIFEST} in {root}")
    try:
        values = json.loads(mpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise _fail(f"not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise _fail(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return Manifest.from_json(values)


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """Write `manifest.json` into the bundle directory `root`."""
    text = json.dumps(manifest.to_json(), indent=2)
    (Path(root) / MANIFEST).write_text(text + "\n", encoding="utf-8")
