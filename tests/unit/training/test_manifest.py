"""What this version's exporter writes: the typed manifest, all of it, and the same bundle with its manifest as
earlier exporters wrote it (without the keys added since) loads as it was made for."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from support.manifests import first_exporter_manifest, previous_exporter_manifest, rewrite_manifest
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.manifest import MANIFEST, ShotThresholds, read_manifest, write_manifest
from vlltr.service.core import shot_thresholds


def test_the_exporter_writes_the_typed_manifest(service_bundle, tmp_path):
    written = json.loads((service_bundle / MANIFEST).read_text())
    manifest = read_manifest(service_bundle)
    assert manifest.to_json() == written  # nothing the exporter wrote is outside the typed definition
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert manifest.training is not None and manifest.training.shot_thresholds == ShotThresholds(100, 20)
    assert manifest.verification is not None and manifest.verification.top1_agreement == 1.0
    bundle = load_bundle(service_bundle)
    assert bundle.manifest == manifest and bundle.arch == manifest.model.arch == "vlltr-tiny-vit"
    assert bundle.embed_dim == manifest.model.embed_dim and bundle.alpha == manifest.head.alpha


@pytest.fixture
def bundle(service_bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(service_bundle, dst)
    return dst


def test_a_manifest_of_the_previous_exporter_loads_the_same(bundle):
    current = load_bundle(bundle)
    rewrite_manifest(bundle, previous_exporter_manifest)
    old = load_bundle(bundle)
    assert old.manifest.training.shot_thresholds is None
    assert shot_thresholds(old.manifest) == shot_thresholds(current.manifest) == (100, 20)  # from its config
    assert replace(old.manifest, training=current.manifest.training) == current.manifest


def test_a_manifest_of_the_first_exporter_loads_with_the_defaults_it_was_made_for(bundle):
    rewrite_manifest(bundle, first_exporter_manifest)
    b = load_bundle(bundle)
    assert b.calibration.added_class_vision == "none" and b.preprocess.jpeg_draft is False
