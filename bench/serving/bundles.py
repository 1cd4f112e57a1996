"""The bundles the benchmark serves: the demo bundle, and a standard open_clip architecture with random weights
(realistic compute; no hub weights can be fetched here). Both come with the training run they were exported
from, which the hand-written PyTorch server loads."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.serving.images import photo_like

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BenchBundle:
    """A bundle and its run: `label` names it in the results."""

    label: str
    bundle: Path
    run: Path

    def manifest(self) -> dict:
        """The bundle's manifest.json."""
        return json.loads((self.bundle / MANIFEST).read_text())


def demo_bundle(work: Path) -> BenchBundle:
    """The demo bundle (Digits-LT, tiny config), built by `python -m training.demo` under `work` unless there."""
    out, run_work = work / "demo" / "bundle", work / "demo" / "work"
    if not (out / MANIFEST).is_file():
        log.info("building the demo bundle in %s", out)
        subprocess.run(
            [sys.executable, "-m", "vlltr.training.demo", "--out", str(out), "--work", str(run_work)], check=True
        )
    return BenchBundle("demo", out, run_work / "run")


def random_init_bundle(
    work: Path, arch: str, *, num_classes: int = 32, num_anchors: int = 4, fp16: bool = False, seed: int = 0
) -> BenchBundle:
    """A bundle of `arch` with random weights: a CLIP, an LGR head whose anchors are the CLIP's own text
    features of a few sentences per class, a calibration, and a few test images for the export's checks."""
    tag = f"{arch}{'-fp16' if fp16 else ''}"
    root = work / tag
    out, run = root / "bundle", root / "run"
    if not (out / MANIFEST).is_file():
        log.info("building a random-init %s bundle in %s", arch, out)
        _write_run(run, arch, num_classes=num_classes, num_anchors=num_anchors, seed=seed)
        from vlltr.training.export import export_bundle

        export_bundle(run, out, fp16=fp16, verify_images=4, fp16_images=16)
    return BenchBundle(tag, out, run)


def _write_dataset(root: Path, num_classes: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"class {i}" for i in range(num_classes)) + "\n")
    lines = []
    for i in range(n):
        name = f"images/{i:04d}.jpg"
        photo_like(rng, (320, 240)).save(root / name, quality=90)
        lines.append(f"{name} {i % num_classes}")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(lines) + "\n")


def _write_run(run_dir: Path, arch: str, *, num_classes: int, num_anchors: int, seed: int) -> None:
    """What `vlltr train` leaves behind (config, model, classes, calibration, metrics), without training."""
    import torch

    from vlltr.model.networks.classifier import VLLTRClassifier
    from vlltr.model.networks.factory import create_clip, get_tokenizer
    from vlltr.model.networks.head import LGRHead
    from vlltr.training.checkpoint import save_final_model
    from vlltr.training.config import Config, save_config

    run_dir.mkdir(parents=True, exist_ok=True)
    data_root = run_dir / "data"
    _write_dataset(data_root, num_classes, 8, seed)
    torch.manual_seed(seed)
    clip = create_clip(arch).eval()
    tokenizer = get_tokenizer(arch)
    sentences = [
        [f"a photo of a thing of kind {c}, seen from view {j}." for j in range(num_anchors)] for c in range(num_classes)
    ]
    with torch.no_grad():
        feats = torch.cat([clip.encode_text(tokenizer(group)) for group in sentences])
    anchors = feats.reshape(num_classes, num_anchors, -1)
    mask = torch.ones(num_classes, num_anchors, dtype=torch.bool)
    head = LGRHead(anchors, mask, logit_scale=float(clip.logit_scale.detach().exp()))
    classifier = VLLTRClassifier(clip, head).eval()
    save_final_model(run_dir, classifier, arch, alpha=0.3)
    cfg = Config()
    cfg.model.arch = arch
    cfg.data.name = "bench-random"
    cfg.data.root = str(data_root)
    cfg.data.val = None
    save_config(cfg, run_dir / "config.yaml")
    counts = [int(1000 / (1 + c)) + 1 for c in range(num_classes)]  # long-tailed prior
    classes = [
        {"name": f"class {c}", "dataset_id": c, "train_count": counts[c], "source": "trained", "anchors": sentences[c]}
        for c in range(num_classes)
    ]
    (run_dir / "classes.json").write_text(json.dumps(classes))
    cal = {
        "tau": 0.5,
        "temperature": 1.0,
        "temperature_on": "fused",
        "added_class_bias": 0.0,
        "fitted_on": "none (random weights)",
        "log_prior": "train_counts",
        "train_counts": counts,
    }
    (run_dir / "calibration.json").write_text(json.dumps(cal))
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"overall": None}}))
