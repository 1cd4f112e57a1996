"""Load and check a model bundle (docs/bundle.md): the one loader, used by the service and the exporter.

`load_bundle` refuses a bundle whose format version it does not read, whose manifest is malformed, whose
listed files are missing or differ (size, sha256), or whose arrays do not fit the manifest; every refusal is a
`BundleError` whose message starts with the file it is about.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlltr.errors import BundleError
from vlltr.model.runtime.head import ADDED_CLASS_VISION_MODES, ClassTable, HeadParams, log_prior_from_counts
from vlltr.model.runtime.preprocess import PreprocessSpec
from vlltr.model.runtime.tokenizer import ClipTokenizer, TextSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
TOKENIZER = "tokenizer.json"
HEAD = "head.npz"
ANCHORS = "anchors.npy"
ANCHOR_MASK = "anchor_mask.npy"
CLASSES = "classes.json"
REQUIRED_FILES = (IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER, HEAD, ANCHORS, ANCHOR_MASK, CLASSES)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Calibration:
    """The served calibration: logit adjustment `tau`, `temperature`, the added classes' bias, and how added
    classes enter the vision branch (`added_class_vision`, see `vlltr.model.runtime.head.calibrated_probabilities`).

    A manifest without `added_class_vision` (bundles written before it existed) reads as `"none"`, the
    scoring those bundles were calibrated for."""

    tau: float = 0.0
    temperature: float = 1.0
    added_class_bias: float = 0.0
    added_class_vision: str = "none"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Calibration:
        cal = cls(
            float(values.get("tau", 0.0)),
            float(values.get("temperature", 1.0)),
            float(values.get("added_class_bias", 0.0)),
            str(values.get("added_class_vision", "none")),
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
        return cal

    def to_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "temperature": self.temperature,
            "added_class_bias": self.added_class_bias,
            "added_class_vision": self.added_class_vision,
        }


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded, checked bundle. Arrays are read into memory; the ONNX files are given by path."""

    path: Path
    manifest: dict[str, Any]
    bundle_id: str
    arch: str
    embed_dim: int
    precision: str
    preprocess: PreprocessSpec
    text: TextSpec
    image_encoder_path: Path
    text_encoder_path: Path
    tokenizer_path: Path
    head: HeadParams
    alpha: float
    anchors: np.ndarray  # [C, M, D] float32
    anchor_mask: np.ndarray  # [C, M] bool
    classes: list[dict[str, Any]]
    calibration: Calibration
    log_prior: np.ndarray  # [C] float32

    @property
    def num_classes(self) -> int:
        return int(self.anchors.shape[0])

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[1])

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def class_table(self) -> ClassTable:
        """The trained classes' scoring table (precomputed keys and Gram matrices)."""
        return ClassTable.build(self.anchors, self.anchor_mask, self.head, self.class_names)

    def tokenizer(self) -> ClipTokenizer:
        """The text tokenizer (open_clip-identical ids) for the text encoder."""
        return ClipTokenizer(self.tokenizer_path, self.text)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | Path) -> dict[str, Any]:
    """The manifest's `files` entry of one file: `{"sha256", "bytes"}`."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and check the manifest's structure and format version (no file hashing)."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"missing file {MANIFEST} in {root}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{MANIFEST}: not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{MANIFEST}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version is None:
        raise BundleError(f"{MANIFEST}: format_version missing (this service reads {FORMAT_VERSION})")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(f"{MANIFEST}: format_version {version!r} not supported (this service reads {FORMAT_VERSION})")
    for section in ("bundle_id", "model", "text", "preprocess", "head", "calibration", "files"):
        if section not in manifest:
            raise BundleError(f"{MANIFEST}: missing section {section!r}")
    for section in ("model", "text", "preprocess", "head", "calibration", "files"):
        if not isinstance(manifest[section], dict):
            raise BundleError(f"{MANIFEST}: section {section!r} must be an object")
    if not isinstance(manifest["bundle_id"], str) or not manifest["bundle_id"]:
        raise BundleError(f"{MANIFEST}: bundle_id must be a non-empty string")
    return manifest


def verify_files(root: Path, manifest: Mapping[str, Any]) -> None:
    """Every required file is listed; every listed file exists with the listed size and sha256."""
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{MANIFEST}: files does not list {name}")
    for name, entry in files.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise BundleError(f"{MANIFEST}: file name {name!r} is not a plain file name")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{MANIFEST}: files[{name!r}] must be an object with a sha256 string")
        path = root / name
        if not path.is_file():
            raise BundleError(f"missing file {name}")
        size = path.stat().st_size
        if "bytes" in entry and entry["bytes"] != size:
            raise BundleError(f"{name}: size mismatch (expected {entry['bytes']} bytes, got {size})")
        actual = sha256_file(path)
        if actual != entry["sha256"].lower():
            raise BundleError(f"{name}: sha256 mismatch (expected {entry['sha256']}, got {actual})")


def _number(section: Mapping[str, Any], key: str, where: str) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BundleError(f"{MANIFEST}: {where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _load_npy(root: Path, name: str) -> np.ndarray:
    try:
        return np.load(root / name, allow_pickle=False)
    except Exception as exc:  # a corrupt header raises ValueError, a truncated file OSError/EOFError
        raise BundleError(f"{name}: cannot read ({exc})") from exc


def _load_classes(root: Path, num_classes: int) -> list[dict[str, Any]]:
    try:
        classes = json.loads((root / CLASSES).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{CLASSES}: malformed JSON ({exc})") from exc
    if not isinstance(classes, list):
        raise BundleError(f"{CLASSES}: expected a list of classes")
    if len(classes) != num_classes:
        raise BundleError(f"{CLASSES}: {len(classes)} classes, the manifest says {num_classes}")
    seen: set[str] = set()
    for i, entry in enumerate(classes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise BundleError(f"{CLASSES}: entry {i} lacks a non-empty 'name'")
        count = entry.get("train_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise BundleError(f"{CLASSES}: entry {i} ({entry['name']!r}) needs a positive integer 'train_count'")
        if entry["name"] in seen:
            raise BundleError(f"{CLASSES}: class name {entry['name']!r} appears twice")
        seen.add(entry["name"])
    return classes


def load_bundle(path: str | Path, *, verify_checksums: bool = True) -> Bundle:
    """Load and check a bundle directory.

    Args:
        path: the bundle directory.
        verify_checksums: hash every file against the manifest (on by default; the exporter and the service
            always verify).

    Raises:
        BundleError: the message names the file and the reason ("missing file head.npz",
            "image_encoder.onnx: sha256 mismatch (expected ..., got ...)", "manifest.json: format_version 7 not
            supported (this service reads 1)", ...).
    """
    root = Path(path)
    manifest = read_manifest(root)
    if verify_checksums:
        verify_files(root, manifest)
    model, head_cfg = manifest["model"], manifest["head"]
    try:
        preprocess = PreprocessSpec.from_dict(manifest["preprocess"])
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{MANIFEST}: preprocess: {exc}") from exc
    try:
        text = TextSpec.from_dict(manifest["text"])
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{MANIFEST}: text: {exc}") from exc
    try:
        calibration = Calibration.from_dict(manifest["calibration"])
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{MANIFEST}: calibration: {exc}") from exc
    for key in ("num_classes", "num_anchors"):
        if not isinstance(head_cfg.get(key), int) or head_cfg[key] < 1:
            raise BundleError(f"{MANIFEST}: head.{key} must be a positive integer, got {head_cfg.get(key)!r}")
    if not isinstance(model.get("embed_dim"), int) or model["embed_dim"] < 1:
        raise BundleError(f"{MANIFEST}: model.embed_dim must be a positive integer, got {model.get('embed_dim')!r}")
    alpha = _number(head_cfg, "alpha", "head")
    if not 0.0 <= alpha <= 1.0:
        raise BundleError(f"{MANIFEST}: head.alpha must lie in [0, 1], got {alpha}")
    logit_scale = _number(head_cfg, "logit_scale", "head")
    ln_eps = _number(head_cfg, "ln_eps", "head") if "ln_eps" in head_cfg else 1e-5
    c, m, d = head_cfg["num_classes"], head_cfg["num_anchors"], model["embed_dim"]

    anchors = _load_npy(root, ANCHORS)
    if anchors.shape != (c, m, d) or anchors.dtype != np.float32:
        raise BundleError(f"{ANCHORS}: {anchors.dtype} {anchors.shape}, the manifest says float32 {(c, m, d)}")
    mask = _load_npy(root, ANCHOR_MASK)
    if mask.shape != (c, m) or mask.dtype != np.bool_:
        raise BundleError(f"{ANCHOR_MASK}: {mask.dtype} {mask.shape}, the manifest says bool {(c, m)}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise BundleError(f"{ANCHOR_MASK}: classes {empty[:10].tolist()} have no anchors")
    if not np.all(np.isfinite(anchors)):
        raise BundleError(f"{ANCHORS}: non-finite values")
    try:
        with np.load(root / HEAD, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        head = HeadParams.from_arrays(arrays, logit_scale=logit_scale, ln_eps=ln_eps)
    except (KeyError, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{HEAD}: {exc}") from exc
    if head.embed_dim != d or head.num_trained != c:
        raise BundleError(
            f"{HEAD}: head is for D={head.embed_dim}, C={head.num_trained}; the manifest says D={d}, C={c}"
        )
    classes = _load_classes(root, c)
    log_prior = log_prior_from_counts([entry["train_count"] for entry in classes])
    tok_path = root / TOKENIZER
    try:
        ClipTokenizer(tok_path, text)
    except Exception as exc:  # tokenizers raises its own Exception type on malformed files
        raise BundleError(f"{TOKENIZER}: unusable ({exc})") from exc
    image_size = model.get("image_size")
    if image_size is not None and image_size != preprocess.size:
        raise BundleError(f"{MANIFEST}: preprocess.size {preprocess.size} differs from model.image_size {image_size}")
    return Bundle(
        path=root,
        manifest=manifest,
        bundle_id=manifest["bundle_id"],
        arch=str(model.get("arch", "")),
        embed_dim=d,
        precision=str(manifest.get("precision", "fp32")),
        preprocess=preprocess,
        text=text,
        image_encoder_path=root / IMAGE_ENCODER,
        text_encoder_path=root / TEXT_ENCODER,
        tokenizer_path=tok_path,
        head=head,
        alpha=alpha,
        anchors=anchors,
        anchor_mask=mask,
        classes=classes,
        calibration=calibration,
        log_prior=log_prior,
    )
