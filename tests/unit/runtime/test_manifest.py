"""The typed manifest read by the loader (no torch): round trips, manifests without optional or with unknown keys,
wrong types refused, the shot thresholds, and the manifest the previous version's exporter wrote (the committed
bundle). tests/unit/training/test_manifest.py checks what this version's exporter writes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from support.manifests import minimal_manifest, rewrite_manifest
from vlltr.errors import BundleError
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.manifest import (
    MANIFEST,
    REQUIRED_FILES,
    Calibration,
    ExportCheck,
    FileEntry,
    Fp16Check,
    HeadInfo,
    Manifest,
    ModelInfo,
    ShotThresholds,
    TrainingInfo,
    Verification,
    pillow_mismatch,
    read_manifest,
    write_manifest,
)
from vlltr.model.runtime.preprocess import PreprocessSpec
from vlltr.model.runtime.tokenizer import TextSpec
from vlltr.service.core import DEFAULT_SHOT_THRESHOLDS, shot_thresholds


def _full_manifest() -> Manifest:
    return Manifest(
        bundle_id="vlltr-tiny-vit-0123456789ab-20250101T000000Z",
        created="2025-01-01T00:00:00+00:00",
        model=ModelInfo(embed_dim=64, arch="vlltr-tiny-vit", image_size=32, context_length=77, quick_gelu=True),
        text=TextSpec(context_length=77, sot_id=49406, eot_id=49407),
        preprocess=PreprocessSpec(32, 37, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", jpeg_draft=True),
        head=HeadInfo(num_classes=6, num_anchors=4, alpha=0.25, logit_scale=33.5, ln_eps=1e-6, v_detach=True),
        calibration=Calibration(0.6, 1.4, -0.75, "standardised", "val"),
        files={name: FileEntry("ab" * 32, 1000 + i) for i, name in enumerate(REQUIRED_FILES)},
        precision="fp16",
        fp16_check=Fp16Check(
            0.9995,
            0.9996,
            0.9995,
            1.0,
            0.001,
            {"min_cosine": 0.999, "top1_agreement": 0.99},
            ("LayerNormalization", "Softmax"),
            "12 images of the test split of d (12 images)",
        ),
        export_check=ExportCheck(1.5e-7, 2e-7, 1e-4),
        training=TrainingInfo(
            dataset="digits-lt",
            run_dir="/runs/a",
            config={"data": {"many_threshold": 50, "few_threshold": 10}, "run": {"seed": 0}},
            metrics={"test": {"overall": 0.5, "per_class": [0.1, 0.9]}},
            calibration={"tau": 0.6, "temperature": 1.4, "train_counts": [5, 3]},
            shot_thresholds=ShotThresholds(50, 10),
        ),
        verification=Verification("12 images of the test split", 1e-6, 1.0),
        software={"pillow": "13.0.0", "numpy": "2.4.6", "onnxruntime": "1.31.1"},
    )


def test_round_trip_write_read_is_equal(tmp_path):
    manifest = _full_manifest()
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    # The JSON is plain JSON: a second round trip through the text gives the same object.
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    bare = replace(
        manifest, fp16_check=None, export_check=None, training=None, verification=None, created=None, software=None
    )
    write_manifest(tmp_path, bare)
    assert read_manifest(tmp_path) == bare


@pytest.fixture
def bundle(bundle_v1, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle_v1, dst)
    return dst


def test_the_previous_versions_manifest_loads_with_what_it_lacks_filled_in(bundle):
    # Written by the exporter before the typed manifest existed: no `training.shot_thresholds` yet.
    written = json.loads((bundle / MANIFEST).read_text())
    assert "shot_thresholds" not in written["training"]
    b = load_bundle(bundle)
    assert b.manifest.bundle_id == written["bundle_id"] and b.manifest.training.shot_thresholds is None
    assert shot_thresholds(b.manifest) == (100, 20)  # from the run's data config it recorded
    assert b.calibration.added_class_vision == "none" and b.preprocess.jpeg_draft is False


def test_a_manifest_without_any_optional_key_loads(bundle):
    rewrite_manifest(bundle, minimal_manifest)
    b = load_bundle(bundle)
    m = b.manifest
    assert m.head.ln_eps == 1e-5 and m.head.v_detach is False and b.head.ln_eps == 1e-5
    assert m.model.arch == "" and m.model.image_size is None and m.model.quick_gelu is False
    assert m.calibration == Calibration() and m.precision == "fp32" and m.created is None
    assert (m.training, m.verification, m.fp16_check, m.export_check, m.software) == (None,) * 5
    assert all(entry.bytes is None for entry in m.files.values())
    assert shot_thresholds(m) == DEFAULT_SHOT_THRESHOLDS


def test_unknown_keys_are_ignored(bundle):
    def add_future_keys(m: dict) -> dict:
        m["signature"] = {"by": "someone"}
        m["head"]["dropout"] = 0.1
        m["training"]["hardware"] = "gpu"
        m["verification"]["seconds"] = 3
        return m

    rewrite_manifest(bundle, add_future_keys)
    assert load_bundle(bundle).manifest.head.num_classes == 6


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.__setitem__("precision", "bf16"), "precision must be 'fp32' or 'fp16', got 'bf16'"),
        (lambda m: m.__setitem__("created", 5), "created must be a string or null, got 5"),
        (lambda m: m["model"].__setitem__("image_size", "32"), "model.image_size must be an integer or null"),
        (lambda m: m["model"].__setitem__("embed_dim", True), "model.embed_dim must be a positive integer, got True"),
        (lambda m: m["head"].__setitem__("ln_eps", "small"), "head.ln_eps must be a finite number, got 'small'"),
        (lambda m: m["head"].__setitem__("num_anchors", 0), "head.num_anchors must be a positive integer, got 0"),
        (lambda m: m.__setitem__("training", []), "section 'training' must be an object"),
        (lambda m: m["training"].__setitem__("dataset", 3), "training.dataset must be a string or null, got 3"),
        (
            lambda m: m["training"].__setitem__("shot_thresholds", {"many": 10}),
            "training.shot_thresholds must be an object with integers many and few",
        ),
        (
            lambda m: m["verification"].__setitem__("top1_agreement", "all"),
            "verification.top1_agreement must be a finite number or null, got 'all'",
        ),
        (lambda m: m["files"]["head.npz"].__setitem__("bytes", -1), "files['head.npz'].bytes must be a non-negative"),
        (lambda m: m.__setitem__("software", ["pillow"]), "software must be an object or null"),
        (lambda m: m.__setitem__("software", {"pillow": 13}), "software.pillow must be a version string, got 13"),
    ],
)
def test_values_of_the_wrong_type_are_refused(bundle, edit, message):
    def apply(m: dict) -> dict:
        edit(m)
        return m

    rewrite_manifest(bundle, apply)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert str(info.value).startswith(f"{MANIFEST}: {message}")


def test_shot_thresholds_come_from_the_record_then_the_config_then_the_default():
    m = _full_manifest()
    assert shot_thresholds(m) == (50, 10)
    training = replace(m.training, shot_thresholds=None)
    assert shot_thresholds(replace(m, training=training)) == (50, 10)  # the run's data config
    assert shot_thresholds(replace(m, training=replace(training, config={}))) == DEFAULT_SHOT_THRESHOLDS
    assert shot_thresholds(replace(m, training=None)) == DEFAULT_SHOT_THRESHOLDS


def test_a_pillow_of_another_major_than_the_exporters_is_named_and_the_same_major_is_not():
    m = _full_manifest()  # exported with Pillow 13.0.0
    assert pillow_mismatch(m, "13.2.1") is None
    assert pillow_mismatch(replace(m, software=None), "12.0.0") is None  # nothing recorded: nothing to compare
    warning = pillow_mismatch(m, "12.1.0")
    assert warning is not None and "Pillow 13.0.0" in warning and "Pillow 12.1.0" in warning and "13.x" in warning


def test_the_service_warns_at_load_when_its_pillow_differs_from_the_exporters(bundle, tmp_path, caplog):
    import PIL

    from vlltr.service.core import ServingCore
    from vlltr.service.metrics import Metrics
    from vlltr.service.settings import Settings

    other = f"{int(PIL.__version__.split('.')[0]) + 1}.0.0"
    rewrite_manifest(bundle, lambda m: {**m, "software": {"pillow": other}})
    settings = Settings(bundle=bundle, class_store=tmp_path / "classes.jsonl")
    with caplog.at_level("WARNING", logger="vlltr.service.core"):
        core = ServingCore.load(settings, Metrics(redis_enabled=False))
    core.prep.close()
    assert any(f"exported with Pillow {other}" in r.getMessage() for r in caplog.records), caplog.text
