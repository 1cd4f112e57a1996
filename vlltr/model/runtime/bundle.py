"""Load and check a model bundle (docs/bundle.md): the one loader, used by the service and the exporter.

`load_bundle` refuses a bundle whose format version it does not read, whose manifest is malformed (the typed
`vlltr.model.runtime.manifest.Manifest` checks it), whose listed files are missing or differ (size, sha256),
or whose arrays do not fit the manifest; every refusal is a `BundleError` whose message starts with the file
it is about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlltr.errors import BundleError
from vlltr.model.runtime.head import ClassTable, HeadParams, log_prior_from_counts
from vlltr.model.runtime.manifest import (
    ANCHOR_MASK,
    ANCHORS,
    CLASSES,
    FORMAT_VERSION,
    HEAD,
    IMAGE_ENCODER,
    MANIFEST,
    PROTOTYPES,
    REQUIRED_FILES,
    TEXT_ENCODER,
    TOKENIZER,
    Calibration,
    FileEntry,
    Manifest,
    read_manifest,
    sha256_file,
)
from vlltr.model.runtime.preprocess import PreprocessSpec
from vlltr.model.runtime.tokenizer import ClipTokenizer, TextSpec
from vlltr.model.runtime.unknown import Prototypes

__all__ = [
    "ANCHORS",
    "ANCHOR_MASK",
    "CLASSES",
    "FORMAT_VERSION",
    "HEAD",
    "IMAGE_ENCODER",
    "MANIFEST",
    "PROTOTYPES",
    "REQUIRED_FILES",
    "TEXT_ENCODER",
    "TOKENIZER",
    "Bundle",
    "Calibration",
    "Manifest",
    "file_entry",
    "load_bundle",
    "read_manifest",
    "sha256_file",
    "verify_files",
]


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded, checked bundle: its typed manifest, the arrays read into memory, the ONNX files by path."""

    path: Path
    manifest: Manifest
    head: HeadParams
    anchors: np.ndarray  # [C, M, D] float32
    anchor_mask: np.ndarray  # [C, M] bool
    classes: list[dict[str, Any]]
    log_prior: np.ndarray  # [C] float32
    prototypes: Prototypes | None = None  # prototypes.npz, where the bundle has one (the mahalanobis score)

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def arch(self) -> str:
        return self.manifest.model.arch

    @property
    def embed_dim(self) -> int:
        return self.manifest.model.embed_dim

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.manifest.preprocess

    @property
    def text(self) -> TextSpec:
        return self.manifest.text

    @property
    def alpha(self) -> float:
        return self.manifest.head.alpha

    @property
    def calibration(self) -> Calibration:
        return self.manifest.calibration

    @property
    def image_encoder_path(self) -> Path:
        return self.path / IMAGE_ENCODER

    @property
    def text_encoder_path(self) -> Path:
        return self.path / TEXT_ENCODER

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

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


def file_entry(path: str | Path) -> dict[str, Any]:
    """The manifest's `files` entry of one file as JSON: `{"sha256", "bytes"}`."""
    return FileEntry.of(path).to_json()


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file exists with the listed size and sha256 (`Manifest` checked that the required ones
    are listed)."""
    for name, entry in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"missing file {name}")
        size = path.stat().st_size
        if entry.bytes is not None and entry.bytes != size:
            raise BundleError(f"{name}: size mismatch (expected {entry.bytes} bytes, got {size})")
        actual = sha256_file(path)
        if actual != entry.sha256.lower():
            raise BundleError(f"{name}: sha256 mismatch (expected {entry.sha256}, got {actual})")


def _load_npy(root: Path, name: str) -> np.ndarray:
    try:
        # np.load is typed Any (it may return an NpzFile); a .npy file without pickles is one array.
        array: np.ndarray = np.load(root / name, allow_pickle=False)
        return array
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


def _load_prototypes(root: Path, head: HeadParams) -> Prototypes:
    try:
        with np.load(root / PROTOTYPES, allow_pickle=False) as data:
            prototypes = Prototypes.from_arrays({k: data[k] for k in data.files})
    except (KeyError, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{PROTOTYPES}: {exc}") from exc
    expected = (head.num_trained, head.embed_dim)
    if prototypes.means.shape != expected:
        raise BundleError(f"{PROTOTYPES}: means {prototypes.means.shape}, the head says {expected}")
    return prototypes


def load_bundle(path: str | Path, *, verify_checksums: bool = True) -> Bundle:
    """Load and check a bundle directory.

    Args:
        path: the bundle directory.
        verify_checksums: hash every file against the manifest (on by default; the exporter and the service
            always verify).

    Raises:
        BundleError: the message names the file and the reason ("missing file head.npz",
            "image_encoder.onnx: sha256 mismatch (expected ..., got ...)", "manifest.json: format_version 7 not
            supported (this service reads 1 and 2)", ...).
    """
    root = Path(path)
    manifest = read_manifest(root)
    if verify_checksums:
        verify_files(root, manifest)
    c, m, d = manifest.head.num_classes, manifest.head.num_anchors, manifest.model.embed_dim

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
        head = HeadParams.from_arrays(arrays, logit_scale=manifest.head.logit_scale, ln_eps=manifest.head.ln_eps)
    except (KeyError, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{HEAD}: {exc}") from exc
    if head.embed_dim != d or head.num_trained != c:
        raise BundleError(
            f"{HEAD}: head is for D={head.embed_dim}, C={head.num_trained}; the manifest says D={d}, C={c}"
        )
    classes = _load_classes(root, c)
    log_prior = log_prior_from_counts([entry["train_count"] for entry in classes])
    prototypes = _load_prototypes(root, head) if PROTOTYPES in manifest.files else None
    tok_path = root / TOKENIZER
    try:
        ClipTokenizer(tok_path, manifest.text)
    except Exception as exc:  # tokenizers raises its own Exception type on malformed files
        raise BundleError(f"{TOKENIZER}: unusable ({exc})") from exc
    return Bundle(
        path=root,
        manifest=manifest,
        head=head,
        anchors=anchors,
        anchor_mask=mask,
        classes=classes,
        log_prior=log_prior,
        prototypes=prototypes,
    )
