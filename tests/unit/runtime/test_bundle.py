"""Bundle loading: a good bundle loads; tampered, incomplete or malformed bundles are refused precisely
(acceptance 4). On copies of the committed bundle the previous version exported (no torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlltr.errors import BundleError
from vlltr.model.runtime.bundle import FORMAT_VERSION, MANIFEST, REQUIRED_FILES, file_entry, load_bundle


@pytest.fixture
def bundle(bundle_v1, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle_v1, dst)
    return dst


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest))


def rehash(path: Path, name: str) -> None:
    """Make the manifest agree with a changed file (an exporter bug rather than tampering)."""
    m = manifest_of(path)
    m["files"][name] = file_entry(path / name)
    write_manifest(path, m)


def test_good_bundle_loads(bundle):
    b = load_bundle(bundle)
    m = manifest_of(bundle)
    assert b.bundle_id == m["bundle_id"] and b.bundle_id.startswith("vlltr-fixture-")
    assert b.num_classes == 6 and b.num_anchors == 4 and b.embed_dim == 16
    assert b.anchors.dtype == np.float32 and b.anchor_mask.dtype == np.bool_
    assert b.class_names == [f"class {i}" for i in range(6)]
    assert b.preprocess.size == 32 and b.preprocess.resize_size == 37
    assert b.calibration.tau == pytest.approx(0.6) and b.calibration.temperature == pytest.approx(1.4)
    assert b.precision == "fp32" and m["fp16_check"] is None
    assert m["verification"]["max_abs_prob_diff"] <= 1e-4
    assert set(m["files"]) == set(REQUIRED_FILES)
    counts = np.array([c["train_count"] for c in b.classes], dtype=np.float64)
    np.testing.assert_allclose(b.log_prior, np.log(counts / counts.sum()), rtol=1e-6)
    assert b.class_table().num_classes == 6
    assert b.tokenizer()(["a dog"]).shape == (1, 77)


def test_calibration_without_added_class_vision_reads_as_none(bundle):
    # Manifests written before `added_class_vision` existed keep loading, with the scoring they were fitted for.
    m = manifest_of(bundle)
    assert m["calibration"]["added_class_vision"] == "none"
    m["calibration"].pop("added_class_vision")
    write_manifest(bundle, m)
    assert load_bundle(bundle).calibration.added_class_vision == "none"
    m["calibration"]["added_class_vision"] = "standardised"
    write_manifest(bundle, m)
    assert load_bundle(bundle).calibration.added_class_vision == "standardised"


def test_a_format_1_bundle_keeps_its_temperature_rule(bundle):
    # Format 1 divided each branch's logits by T; format 2 tempers the fused distribution. A format-1 bundle is
    # served with the rule it was calibrated for, and a key this version does not know is refused by name.
    m = manifest_of(bundle)
    assert m["format_version"] == 1 and "temperature_on" not in m["calibration"]
    assert load_bundle(bundle).calibration.temperature_on == "branches"
    m["format_version"], m["calibration"]["temperature_on"] = 2, "fused"
    write_manifest(bundle, m)
    assert load_bundle(bundle).calibration.temperature_on == "fused"
    m["calibration"]["temperature_on"] = "logits"
    write_manifest(bundle, m)
    with pytest.raises(BundleError, match="calibration temperature_on must be one of"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_changed_bytes_are_refused(bundle, name):
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = manifest_of(bundle)["files"][name]["sha256"]
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert str(info.value).startswith(f"{name}: sha256 mismatch (expected {expected}, got ")


def test_grown_file_is_refused_by_size(bundle):
    with open(bundle / "head.npz", "ab") as fh:
        fh.write(b"extra")
    with pytest.raises(BundleError, match=r"^head\.npz: size mismatch \(expected \d+ bytes, got \d+\)"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", ["head.npz", "image_encoder.onnx", "tokenizer.json"])
def test_missing_file_is_refused(bundle, name):
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=f"^missing file {name}$"):
        load_bundle(bundle)


def test_missing_manifest_is_refused(bundle):
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="missing file manifest.json"):
        load_bundle(bundle)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "version,message",
    [
        (7, "format_version 7 not supported (this service reads 1 and 2)"),
        ("1", "format_version '1' not supported (this service reads 1 and 2)"),
        (True, "format_version True not supported"),
        (None, "format_version missing"),
    ],
)
def test_wrong_format_version_is_refused(bundle, version, message):
    m = manifest_of(bundle)
    if version is None:
        del m["format_version"]
    else:
        m["format_version"] = version
    write_manifest(bundle, m)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert str(info.value).startswith(f"{MANIFEST}: {message}")
    assert FORMAT_VERSION == 2


def test_malformed_manifest_json_is_refused(bundle):
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match=r"^manifest\.json: malformed JSON at line \d+ column \d+"):
        load_bundle(bundle)
    (bundle / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BundleError, match="expected a JSON object, got list"):
        load_bundle(bundle)
    (bundle / MANIFEST).write_bytes(b"\xff\xfe{")
    with pytest.raises(BundleError, match="not UTF-8"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("head"), "missing section 'head'"),
        (lambda m: m.__setitem__("files", []), "section 'files' must be an object"),
        (lambda m: m["files"].pop("anchors.npy"), "files does not list anchors.npy"),
        (lambda m: m["files"].__setitem__("../etc/passwd", {"sha256": "0"}), "is not a plain file name"),
        (lambda m: m["files"]["head.npz"].pop("sha256"), "must be an object with a sha256 string"),
        (lambda m: m["head"].__setitem__("alpha", "high"), "head.alpha must be a finite number"),
        (lambda m: m["head"].__setitem__("alpha", 1.5), "head.alpha must lie in [0, 1]"),
        (lambda m: m["head"].__setitem__("num_classes", 5), "anchors.npy"),
        (lambda m: m["calibration"].__setitem__("temperature", 0), "calibration temperature must be positive"),
        (
            lambda m: m["calibration"].__setitem__("added_class_vision", "both"),
            "calibration added_class_vision must be one of",
        ),
        (lambda m: m["preprocess"].__setitem__("crop", "random"), "preprocess crop='random' not supported"),
        (lambda m: m["preprocess"].__setitem__("size", 64), "preprocess.size 64 differs from model.image_size 32"),
        (lambda m: m["text"].__setitem__("sot_id", 5), "tokenizer.json: unusable"),
        (lambda m: m.__setitem__("bundle_id", ""), "bundle_id must be a non-empty string"),
    ],
)
def test_inconsistent_manifest_is_refused(bundle, edit, message):
    m = manifest_of(bundle)
    edit(m)
    write_manifest(bundle, m)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert message in str(info.value)


def test_inconsistent_arrays_are_refused_even_with_matching_hashes(bundle):
    anchors = np.load(bundle / "anchors.npy")
    np.save(bundle / "anchors.npy", anchors[:, :3])
    rehash(bundle, "anchors.npy")
    with pytest.raises(
        BundleError, match=r"^anchors\.npy: float32 \(6, 3, 16\), the manifest says float32 \(6, 4, 16\)"
    ):
        load_bundle(bundle)


def test_bad_classes_are_refused(bundle):
    classes = json.loads((bundle / "classes.json").read_text())
    classes[2]["train_count"] = 0
    (bundle / "classes.json").write_text(json.dumps(classes))
    rehash(bundle, "classes.json")
    with pytest.raises(BundleError, match=r"^classes\.json: entry 2 \('class 2'\) needs a positive integer"):
        load_bundle(bundle)
    classes[2]["train_count"] = 3
    classes[3]["name"] = "class 1"
    (bundle / "classes.json").write_text(json.dumps(classes))
    rehash(bundle, "classes.json")
    with pytest.raises(BundleError, match="appears twice"):
        load_bundle(bundle)


def test_head_npz_with_missing_array_is_refused(bundle):
    with np.load(bundle / "head.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "w_k"}
    np.savez(bundle / "head.npz", **arrays)
    rehash(bundle, "head.npz")
    with pytest.raises(BundleError, match=r"^head\.npz: .*w_k"):
        load_bundle(bundle)


def test_pickled_array_is_refused(bundle):
    np.save(bundle / "anchor_mask.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    rehash(bundle, "anchor_mask.npy")
    with pytest.raises(BundleError, match=r"^anchor_mask\.npy: cannot read"):
        load_bundle(bundle)


def _add_prototypes(bundle: Path, means: np.ndarray, *, rule: bool = True) -> None:
    np.savez(bundle / "prototypes.npz", means=means, whitening=np.eye(means.shape[1], dtype=np.float32))
    m = manifest_of(bundle)
    m["files"]["prototypes.npz"] = file_entry(bundle / "prototypes.npz")
    if rule:
        m["calibration"]["unknown"] = {"score": "mahalanobis", "threshold": -2.0, "keep": 0.95, "fitted_on": "val"}
    write_manifest(bundle, m)


def test_prototypes_load_with_the_bundle_and_must_fit_its_head(bundle):
    assert load_bundle(bundle).prototypes is None  # optional: a bundle whose rule needs none has none
    _add_prototypes(bundle, np.ones((6, 16), dtype=np.float32))
    b = load_bundle(bundle)
    assert b.prototypes is not None and b.prototypes.means.shape == (6, 16)
    assert b.calibration.unknown is not None and b.calibration.unknown.score == "mahalanobis"
    _add_prototypes(bundle, np.ones((5, 16), dtype=np.float32))
    with pytest.raises(BundleError, match=r"^prototypes\.npz: means \(5, 16\), the head says \(6, 16\)"):
        load_bundle(bundle)
    (bundle / "prototypes.npz").write_bytes(b"not an npz")
    rehash(bundle, "prototypes.npz")
    with pytest.raises(BundleError, match=r"^prototypes\.npz: "):
        load_bundle(bundle)


@pytest.mark.parametrize(
    "rule",
    [
        {"score": "mahalanobis", "threshold": -2.0},
        {"score": "typicality", "threshold": 0.02, "components": {"vision_energy": [0, 1], "mahalanobis": [-9, 0]}},
    ],
)
def test_a_rule_reading_the_mahalanobis_score_without_prototypes_is_refused(bundle, rule):
    m = manifest_of(bundle)
    m["calibration"]["unknown"] = rule
    write_manifest(bundle, m)
    with pytest.raises(BundleError, match="uses the mahalanobis score, but files does not list prototypes.npz"):
        load_bundle(bundle)
