"""`vlltr export`: the bundle predicts like the PyTorch model in a process that never imports torch
(acceptance 1), the text path matches, and a failed or refused export leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export_support import make_run, run_without_torch
from torchvision import transforms as T

from vlltr.model.networks.factory import get_tokenizer
from vlltr.model.networks.head import calibrated_probabilities
from vlltr.training.calibration import log_prior_from_counts
from vlltr.training.checkpoint import load_final_model
from vlltr.training.export import ExportError, export_bundle

PREDICT_SCRIPT = """
import json
from pathlib import Path
import numpy as np
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.head import ClassEntry, build_added_class_anchors
from vlltr.model.runtime.predictor import BundlePredictor
from vlltr.model.runtime.preprocess import decode_image

bundle_dir, list_file, image_root, out_dir = sys.argv[1:5]
bundle = load_bundle(bundle_dir)
predictor = BundlePredictor(bundle, provider="cpu")
assert predictor.provider == "cpu"
lines = [l for l in Path(list_file).read_text().splitlines() if l.strip()]
images = [decode_image((Path(image_root) / l.rsplit(None, 1)[0]).read_bytes(), max_pixels=10**8) for l in lines]
probs = np.concatenate([predictor.predict_images(images[i:i + 64]) for i in range(0, len(images), 64)])
np.save(Path(out_dir) / "probs.npy", probs)
texts = json.loads((Path(out_dir) / "texts.json").read_text())
feats = predictor.text_encoder.encode_texts(texts)
np.save(Path(out_dir) / "text_features.npy", feats)
# A class added by text alone: anchors chosen from its descriptions, a new table, scores over C + 1 classes.
anchors, mask, chosen = build_added_class_anchors(feats, bundle.num_anchors)
predictor.table = predictor.table.with_added([ClassEntry("added by text", anchors, mask)], bundle.head)
added = predictor.predict_images(images[:5])
assert added.shape == (5, bundle.num_classes + 1), added.shape
assert np.allclose(added.sum(1), 1.0, atol=1e-5)
print(json.dumps({"top": [p.label for p in predictor.top_k(images[:1], k=3)[0]]}))
"""


def torch_reference(run_dir: Path, list_file: Path, image_root: Path) -> np.ndarray:
    """Calibrated probabilities of the PyTorch model on torchvision-preprocessed images."""
    run = load_final_model(run_dir)
    data = run.config.data
    size = run.classifier.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    transform = T.Compose(
        [
            T.Resize(round(size * data.resize_ratio), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(data.mean, data.std),
        ]
    )
    tensors = []
    for line in list_file.read_text().splitlines():
        if line.strip():
            with Image.open(image_root / line.rsplit(None, 1)[0]) as img:
                tensors.append(transform(img.convert("RGB")))
    counts = [c["train_count"] for c in run.classes]
    cal = run.calibration
    out = []
    with torch.no_grad():
        for i in range(0, len(tensors), 64):
            z_vis, z_lin = run.classifier(torch.stack(tensors[i : i + 64]))
            out.append(
                calibrated_probabilities(
                    z_vis,
                    z_lin,
                    log_prior_from_counts(counts),
                    alpha=run.alpha,
                    tau=cal["tau"],
                    temperature=cal["temperature"],
                ).numpy()
            )
    return np.concatenate(out)


def check_bundle_matches_torch(run_dir: Path, bundle: Path, list_file: Path, image_root: Path, tmp: Path) -> dict:
    """Acceptance 1 on a whole test split; returns the measured numbers."""
    run = load_final_model(run_dir)
    texts = [s for c in run.classes for s in c["anchors"]][:40] + ["x " * 200, ""]
    (tmp / "texts.json").write_text(json.dumps(texts))
    proc = run_without_torch(PREDICT_SCRIPT, str(bundle), str(list_file), str(image_root), str(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp / "probs.npy")
    expected = torch_reference(run_dir, list_file, image_root)
    assert served.shape == expected.shape
    agreement = float(np.mean(served.argmax(1) == expected.argmax(1)))
    max_diff = float(np.max(np.abs(served - expected)))
    assert agreement >= 0.999, agreement
    assert max_diff <= 1e-4, max_diff
    with torch.no_grad():
        ref_text = run.classifier.clip.encode_text(get_tokenizer(run.arch)(texts)).numpy()
    text_diff = float(np.max(np.abs(np.load(tmp / "text_features.npy") - ref_text)) / max(1.0, np.abs(ref_text).max()))
    assert text_diff <= 1e-4, text_diff
    return {
        "images": len(served),
        "top1_agreement": agreement,
        "max_abs_prob_diff": max_diff,
        "text_rel_diff": text_diff,
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "run", n_test=300, num_classes=8)
    return run, export_bundle(run, root / "bundle")


def test_bundle_matches_torch_without_torch(exported, tmp_path):
    run, bundle = exported
    numbers = check_bundle_matches_torch(run, bundle, run / "data" / "test.txt", run / "data", tmp_path)
    assert numbers["images"] == 300


def test_manifest_records_provenance_and_checks(exported):
    run, bundle = exported
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["precision"] == "fp32"
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
    assert m["preprocess"]["size"] == 32 and m["preprocess"]["resize_size"] == 37
    assert m["export_check"]["image_max_rel_diff"] <= 1e-5 and m["export_check"]["text_max_rel_diff"] <= 1e-5
    assert m["verification"]["top1_agreement"] == 1.0
    classes = json.loads((bundle / "classes.json").read_text())
    assert [c["train_count"] for c in classes] == json.loads((run / "calibration.json").read_text())["train_counts"]
    assert all(c["source"] == "trained" and c["anchors"] for c in classes)
    assert oct((bundle).stat().st_mode & 0o777) == oct(0o755)


def test_service_modules_never_import_torch(exported):
    proc = run_without_torch("""
import importlib
for name in ("vlltr.errors", "vlltr.model.runtime.preprocess", "vlltr.model.runtime.tokenizer",
             "vlltr.model.runtime.head", "vlltr.model.runtime.bundle", "vlltr.model.runtime.sessions",
             "vlltr.model.runtime.predictor", "vlltr.service.app"):
    importlib.import_module(name)
""")
    assert proc.returncode == 0, proc.stderr[-2000:]


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
