"""`vlltr export` in-process: the manifest records provenance and checks, fp16 is checked, and a failed or
refused export leaves nothing behind. tests/integration/test_export.py runs the bundle in a process that cannot
import torch against the PyTorch model (acceptance 1)."""

from __future__ import annotations

import json

import pytest

from vlltr.training.export import ExportError, export_bundle


def test_manifest_records_provenance_and_checks(exported):
    run, bundle = exported
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["precision"] == "fp32"
    assert m["training"]["dataset"] == "generated-test"
    assert m["training"]["metrics"] == {"test": {"overall": 0.5}}
    assert m["training"]["config"]["model"]["arch"] == "vlltr-tiny-vit"
    assert m["head"] == {
        "num_anchors": 4,
        "alpha": 0.3,
        "logit_scale": pytest.approx(14.2857, rel=1e-4),
        "num_classes": 8,
        "ln_eps": 1e-5,
        "v_detach": False,
    }
    assert m["calibration"]["tau"] == 0.6 and m["calibration"]["temperature"] == 1.4
    assert m["calibration"]["temperature_on"] == "fused"
    assert m["preprocess"]["size"] == 32 and m["preprocess"]["resize_size"] == 37
    assert m["export_check"]["image_max_rel_diff"] <= 1e-5 and m["export_check"]["text_max_rel_diff"] <= 1e-5
    assert m["verification"]["top1_agreement"] == 1.0
    classes = json.loads((bundle / "classes.json").read_text())
    assert [c["train_count"] for c in classes] == json.loads((run / "calibration.json").read_text())["train_counts"]
    assert all(c["source"] == "trained" and c["anchors"] for c in classes)
    assert oct((bundle).stat().st_mode & 0o777) == oct(0o755)


def test_export_replaces_a_bundle_and_refuses_other_directories(exported, tmp_path):
    run, _ = exported
    out = tmp_path / "b"
    export_bundle(run, out, verify_images=2)
    first = json.loads((out / "manifest.json").read_text())["bundle_id"]
    export_bundle(run, out, verify_images=2)
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "temporary directories left behind"
    other = tmp_path / "not-a-bundle"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a bundle directory"):
        export_bundle(run, other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert first.startswith("vlltr-tiny-vit-")


def test_failed_export_leaves_nothing(exported, tmp_path):
    run, _ = exported
    broken = tmp_path / "run"
    broken.mkdir()
    for name in ("model.pt", "config.yaml", "calibration.json"):
        (broken / name).write_bytes((run / name).read_bytes())
    classes = json.loads((run / "classes.json").read_text())
    (broken / "classes.json").write_text(json.dumps(classes[:-1]))
    with pytest.raises(ExportError, match="classes.json lists 7 classes, the model has 8"):
        export_bundle(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_without_evaluation_images(exported, tmp_path):
    run, _ = exported
    moved = tmp_path / "run"
    moved.mkdir()
    for name in ("model.pt", "config.yaml", "calibration.json", "classes.json"):
        (moved / name).write_bytes((run / name).read_bytes())
    (moved / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace(str(run / "data"), str(tmp_path / "gone"))
    )
    bundle = export_bundle(moved, tmp_path / "b", verify_images=4)
    verification = json.loads((bundle / "manifest.json").read_text())["verification"]
    assert verification["inputs"].startswith("8 random-pixel inputs")
    assert verification["max_abs_prob_diff"] <= 1e-4
    with pytest.raises(ExportError, match="--fp16 needs evaluation images"):
        export_bundle(moved, tmp_path / "b16", fp16=True)
    assert not (tmp_path / "b16").exists()


def test_fp16_export_is_checked(exported, tmp_path):
    run, _ = exported
    try:
        bundle = export_bundle(run, tmp_path / "fp16", fp16=True, fp16_images=100)
    except ExportError as exc:
        message = str(exc)
        assert "--fp16" in message
        assert not (tmp_path / "fp16").exists()
        pytest.fail(f"tiny model fp16 export refused: {message}")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["precision"] == "fp16"
    check = m["fp16_check"]
    assert check["min_cosine"] >= 0.999 and check["top1_agreement"] >= 0.99
    assert check["thresholds"] == {"min_cosine": 0.999, "top1_agreement": 0.99}
    assert (bundle / "image_encoder.onnx").stat().st_size < (
        run.parent / "bundle" / "image_encoder.onnx"
    ).stat().st_size


def test_cli_export(exported, tmp_path):
    from vlltr.cli import main

    run, _ = exported
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "manifest.json").is_file()
