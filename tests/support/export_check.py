"""A bundle against the PyTorch model it was exported from: the bundle's predictions in a process that cannot
import torch, the model's on torchvision-preprocessed images (acceptance 1). Imports torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from support.runs import run_without_torch
from vlltr.model.networks.factory import get_tokenizer
from vlltr.model.networks.head import calibrated_probabilities
from vlltr.training.calibration import log_prior_from_counts
from vlltr.training.checkpoint import load_final_model

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
                    temperature_on=cal["temperature_on"],
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
