"""Manifests as earlier exporters wrote them, derived from a current one, and rewriting a bundle's manifest."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

from vlltr.model.runtime.manifest import MANIFEST


def rewrite_manifest(bundle: Path, edit: Callable[[dict], dict]) -> dict:
    """Replace `bundle`'s manifest.json by `edit(manifest)` (checksums untouched: the manifest is not listed)."""
    m = edit(json.loads((bundle / MANIFEST).read_text()))
    (bundle / MANIFEST).write_text(json.dumps(m))
    return m


def previous_exporter_manifest(current: dict) -> dict:
    """The manifest the exporter wrote before this version: the same, without `training.shot_thresholds`."""
    m = copy.deepcopy(current)
    del m["training"]["shot_thresholds"]
    return m


def first_exporter_manifest(current: dict) -> dict:
    """The manifest of the first format-1 exporter: no `added_class_vision`, no `jpeg_draft` either."""
    m = previous_exporter_manifest(current)
    del m["calibration"]["added_class_vision"]
    del m["preprocess"]["jpeg_draft"]
    return m


def minimal_manifest(current: dict) -> dict:
    """Only what the loader needs: every optional key left out."""
    m = {k: copy.deepcopy(current[k]) for k in ("format_version", "bundle_id", "files")}
    m["model"] = {"embed_dim": current["model"]["embed_dim"]}
    m["text"] = {k: current["text"][k] for k in ("context_length", "sot_id", "eot_id")}
    m["preprocess"] = {k: current["preprocess"][k] for k in ("size", "resize_size", "mean", "std")}
    m["head"] = {k: current["head"][k] for k in ("num_classes", "num_anchors", "alpha", "logit_scale")}
    m["calibration"] = {}
    for entry in m["files"].values():
        del entry["bytes"]
    return m
