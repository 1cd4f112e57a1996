"""A small finished run built without training, and a torch-free interpreter.

`make_run` writes what `vlltr train` leaves behind (config.yaml, model.pt, classes.json, calibration.json,
metrics.json) for a randomly initialised CLIP and an LGR head whose anchors are the CLIP's own text features
of each class's sentences, plus a list-file dataset of generated images whose test split the exporter reads.
It needs torch (imported when called); the image helpers do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from support.paths import PYTHON, REPO

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]


def draw_image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> Image.Image:
    """A noisy picture whose colour and shape depend on `label` (so classes differ visibly)."""
    w, h = size
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray((noise // 4 + 96).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    colour = COLOURS[label % len(COLOURS)]
    cx, cy, r = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), min(w, h) * rng.uniform(0.15, 0.35)
    if label % 2:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return img


def write_dataset(root: Path, num_classes: int, n_test: int, seed: int = 0) -> list[int]:
    """classes.txt, test.txt (and a tiny train.txt) over generated PNG/JPEG images; returns test labels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"class {i}" for i in range(num_classes)) + "\n")
    labels = []
    lines = []
    for i in range(n_test):
        label = int(rng.integers(num_classes))
        size = (int(rng.integers(24, 96)), int(rng.integers(24, 96)))
        ext = "png" if i % 3 == 0 else "jpg"
        name = f"images/{i:05d}.{ext}"
        draw_image(rng, label, size).save(root / name)
        lines.append(f"{name} {label}")
        labels.append(label)
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(lines[: max(1, n_test // 2)]) + "\n")
    return labels


def make_run(
    run_dir: Path,
    *,
    arch: str = "vlltr-tiny-vit",
    num_classes: int = 6,
    num_anchors: int = 4,
    n_test: int = 64,
    seed: int = 0,
    calibration: dict | None = None,
    alpha: float = 0.3,
) -> Path:
    """Write a finished-run directory (see the module docstring) and its dataset; returns `run_dir`."""
    import torch

    from vlltr.model.networks.classifier import VLLTRClassifier
    from vlltr.model.networks.factory import create_clip, get_tokenizer
    from vlltr.model.networks.head import LGRHead
    from vlltr.training.checkpoint import save_final_model
    from vlltr.training.config import Config, save_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_root = run_dir / "data"
    write_dataset(data_root, num_classes, n_test, seed)
    torch.manual_seed(seed)
    clip = create_clip(arch).eval()
    tokenizer = get_tokenizer(arch)
    sentences = []
    mask = torch.zeros(num_classes, num_anchors, dtype=torch.bool)
    for c in range(num_classes):
        k = 1 + (c % num_anchors)  # classes with 1..M anchors, so padding is exercised
        sentences.append([f"a photo of a {COLOURS[c % len(COLOURS)]} thing number {c}, view {j}." for j in range(k)])
        mask[c, :k] = True
    with torch.no_grad():
        flat = [s for group in sentences for s in group]
        feats = clip.encode_text(tokenizer(flat))
    anchors = torch.zeros(num_classes, num_anchors, feats.shape[1])
    pos = 0
    for c, group in enumerate(sentences):
        anchors[c, : len(group)] = feats[pos : pos + len(group)]
        pos += len(group)
    head = LGRHead(anchors, mask, logit_scale=float(clip.logit_scale.detach().exp()))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    classifier = VLLTRClassifier(clip, head).eval()
    save_final_model(run_dir, classifier, arch, alpha=alpha)
    cfg = Config()
    cfg.model.arch = arch
    cfg.data.name = "generated-test"
    cfg.data.root = str(data_root)
    cfg.data.val = None
    save_config(cfg, run_dir / "config.yaml")
    counts = [int(100 / (1 + c)) + 1 for c in range(num_classes)]
    classes = [
        {"name": f"class {c}", "dataset_id": c, "train_count": counts[c], "source": "trained", "anchors": sentences[c]}
        for c in range(num_classes)
    ]
    (run_dir / "classes.json").write_text(json.dumps(classes))
    cal = {
        "tau": 0.6,
        "temperature": 1.4,
        "temperature_on": "fused",
        "added_class_bias": 0.0,
        "fitted_on": "val",
        "log_prior": "train_counts",
        "train_counts": counts,
    }
    cal.update(calibration or {})
    (run_dir / "calibration.json").write_text(json.dumps(cal))
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"overall": 0.5}}))
    return run_dir


def run_without_torch(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter where importing torch (or open_clip, torchvision) raises ImportError.

    The script also fails unless none of them is in `sys.modules` when it ends.
    """
    prelude = textwrap.dedent("""
        import sys
        for _name in ("torch", "torchvision", "open_clip"):
            sys.modules[_name] = None  # any import of these now raises ImportError
    """)
    epilogue = textwrap.dedent("""
        _loaded = [m for m in ("torch", "torchvision", "open_clip") if sys.modules.get(m) is not None]
        assert not _loaded, f"torch-free path imported {_loaded}"
    """)
    code = prelude + textwrap.dedent(script) + epilogue
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [PYTHON, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
