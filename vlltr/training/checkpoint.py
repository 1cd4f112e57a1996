"""The trained-run layout: what `vlltr train` leaves in its run directory and how to load it back.

    RUN/
      config.yaml        the resolved config (`vlltr.training.config.save_config`)
      model.pt           final model: see `save_final_model`
      classes.json       trained classes in model index order:
                         [{"name", "dataset_id", "train_count", "source": "trained", "anchors": [sentences]}]
      calibration.json   {"tau", "temperature", "temperature_on", "fitted_on", "added_class_bias", "added_class_vision",
                          "added_class_fit" (how γ was chosen, `vlltr.training.added_classes`), ...}
      metrics.json       evaluation results per split
      stage1/, anss/, stage2/   per-stage state (resumable checkpoints, AnSS scores)

`load_final_model` is the one way to get a trained classifier back (used by `vlltr eval` and the exporter).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlltr.errors import MissingFileError
from vlltr.model.networks.classifier import VLLTRClassifier
from vlltr.model.networks.factory import create_clip
from vlltr.model.networks.head import LGRHead
from vlltr.training.config import Config, load_config

MODEL_FILE = "model.pt"
CLASSES_FILE = "classes.json"
CALIBRATION_FILE = "calibration.json"
PROTOTYPES_FILE = "prototypes.npz"  # with eval.unknown_score: mahalanobis (vlltr.training.prototypes)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Save through a temporary file and rename, so an interrupted save never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write JSON through a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_final_model(run_dir: str | Path, classifier: VLLTRClassifier, arch: str, alpha: float) -> None:
    """Write `model.pt`: the whole CLIP (text tower included, for export) and the LGR head."""
    head = classifier.head
    atomic_torch_save(
        {
            "arch": arch,
            "alpha": float(alpha),
            "clip_state_dict": classifier.clip.state_dict(),
            "head_state_dict": head.state_dict(),
            "head_config": {
                "num_classes": head.num_classes,
                "num_anchors": int(head.anchors.shape[1]),
                "embed_dim": head.embed_dim,
                "v_detach": head.v_detach,
            },
        },
        Path(run_dir) / MODEL_FILE,
    )


@dataclass
class TrainedRun:
    """A finished run loaded back: config, classifier (eval mode), classes, calibration and fusion weight."""

    run_dir: Path
    config: Config
    classifier: VLLTRClassifier
    classes: list[dict[str, Any]]
    calibration: dict[str, Any]
    alpha: float
    arch: str


def load_final_model(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Load a finished run. Raises `MissingFileError` (a FileNotFoundError) naming the missing file when the run
    is incomplete or not there."""
    run_dir = Path(run_dir)
    for name in (MODEL_FILE, CLASSES_FILE, CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise MissingFileError(f"{run_dir / name} is missing: is {run_dir} a finished `vlltr train` run?")
    cfg = load_config(run_dir / CONFIG_FILE)
    state = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    clip = create_clip(state["arch"], None, quick_gelu=cfg.model.quick_gelu)
    clip.load_state_dict(state["clip_state_dict"])
    hc = state["head_config"]
    head_state = state["head_state_dict"]
    head = LGRHead(
        head_state["anchors"], head_state["anchor_mask"], float(head_state["logit_scale"]), v_detach=hc["v_detach"]
    )
    head.load_state_dict(head_state)
    classifier = VLLTRClassifier(clip, head).to(device).eval()
    classes = json.loads((run_dir / CLASSES_FILE).read_text())
    calib_path = run_dir / CALIBRATION_FILE
    calibration = (
        json.loads(calib_path.read_text())
        if calib_path.is_file()
        else {"tau": 0.0, "temperature": 1.0, "temperature_on": "fused", "added_class_bias": 0.0, "fitted_on": None}
    )
    return TrainedRun(run_dir, cfg, classifier, classes, calibration, float(state["alpha"]), state["arch"])
