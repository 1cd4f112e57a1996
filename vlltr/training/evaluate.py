"""Long-tail evaluation of a trained run: metrics JSON, per-class CSV and a per-class accuracy plot.

`evaluate_checkpoint` reloads the run through `vlltr.training.checkpoint.load_final_model` and is the same code the
training pipeline runs at its end, so `vlltr eval` reproduces the numbers written by `vlltr train`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlltr.model.networks.classifier import VLLTRClassifier
from vlltr.model.networks.factory import clip_dims
from vlltr.training.calibration import log_prior_from_counts
from vlltr.training.checkpoint import TrainedRun, atomic_write_json, load_final_model
from vlltr.training.config import DataCfg
from vlltr.training.data.datasets import ImageListDataset, build_split
from vlltr.training.data.transforms import eval_transform
from vlltr.training.distributed import resolve_device
from vlltr.training.features import encode_images
from vlltr.training.metrics import evaluate_logits, oltr_groups, original_groups, summary_line
from vlltr.training.runtime import eval_loader

log = logging.getLogger(__name__)

BRANCHES = ("vision", "language", "fused", "logit_sum", "calibrated")


def shot_thresholds(cfg: DataCfg) -> tuple[int, int, str]:
    """`(many_threshold, few_threshold, source)`: a benchmark's meta.json wins over the config keys."""
    meta_path = Path(cfg.root) / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable %s: %s", meta_path, exc)
            meta = {}
        found = _meta_thresholds(meta)
        if found is not None:
            return found[0], found[1], str(meta_path)
    return int(cfg.many_threshold), int(cfg.few_threshold), "config"


def _meta_thresholds(meta: dict[str, Any]) -> tuple[int, int] | None:
    block = meta.get("shot_thresholds") or meta.get("thresholds") or {}
    many = block.get("many", block.get("many_threshold"))
    few = block.get("few", block.get("few_threshold"))
    if many is None or few is None:
        return None
    return int(many), int(few)


@torch.no_grad()
def collect_features(
    classifier: VLLTRClassifier,
    dataset: ImageListDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    desc: str = "evaluate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(raw image features [N, D], labels [N])` of a dataset, in fp32 on CPU."""
    classifier.eval()
    loader = eval_loader(dataset, batch_size, num_workers)
    return encode_images(classifier.image_features, loader, device=device, desc=desc, total=len(loader))


@torch.no_grad()
def head_logits(
    classifier: VLLTRClassifier, feats: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(z_vis [N, C], z_lin [N, C])` of raw image features, in fp32 on CPU."""
    z_vis, z_lin = [], []
    for start in range(0, feats.shape[0], 4096):
        zv, zl = classifier.head(feats[start : start + 4096].to(device))
        z_vis.append(zv.float().cpu())
        z_lin.append(zl.float().cpu())
    return torch.cat(z_vis), torch.cat(z_lin)


def collect_logits(
    classifier: VLLTRClassifier,
    dataset: ImageListDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    desc: str = "evaluate",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(z_vis [N, C], z_lin [N, C], labels [N])` of a dataset, in fp32 on CPU."""
    feats, labels = collect_features(
        classifier, dataset, batch_size=batch_size, num_workers=num_workers, device=device, desc=desc
    )
    return (*head_logits(classifier, feats, device), labels)


def build_eval_split(run: TrainedRun, split: str) -> ImageListDataset:
    """The split's dataset over the run's trained classes, with the serving (eval) preprocessing."""
    cfg = run.config.data
    class_ids = [int(c["dataset_id"]) for c in run.classes]
    size = clip_dims(run.classifier.clip).image_size
    return build_split(cfg, split, eval_transform(cfg, size), class_ids=class_ids)


def evaluate_run(
    run: TrainedRun, split: str = "test", out_dir: str | Path | None = None, *, device: torch.device | None = None
) -> dict[str, Any]:
    """Evaluate a loaded run on `split`; with `out_dir`, also write metrics JSON, per-class CSV and plot."""
    cfg = run.config
    device = device or resolve_device(cfg.run.device)
    run.classifier.to(device)
    dataset = build_eval_split(run, split)
    z_vis, z_lin, labels = collect_logits(
        run.classifier,
        dataset,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        device=device,
        desc=f"evaluate {split}",
    )
    train_counts = np.asarray([int(c["train_count"]) for c in run.classes])
    many, few, source = shot_thresholds(cfg.data)
    metrics, per_class = evaluate_logits(
        z_vis,
        z_lin,
        labels,
        train_counts=train_counts,
        alpha=run.alpha,
        log_prior=log_prior_from_counts(train_counts),
        calibration=run.calibration,
        many_threshold=many,
        few_threshold=few,
        ece_bins=cfg.eval.ece_bins,
    )
    metrics.update(
        {
            "split": split,
            "dataset": cfg.data.name,
            "threshold_source": source,
            "calibration": {k: run.calibration.get(k) for k in ("tau", "temperature", "temperature_on", "fitted_on")},
        }
    )
    log.info("%s: %s", split, summary_line(metrics))
    if out_dir is not None:
        write_reports(Path(out_dir), split, metrics, per_class, run.classes, labels, many, few)
    return metrics


def write_reports(
    out_dir: Path,
    split: str,
    metrics: dict[str, Any],
    per_class: dict[str, np.ndarray],
    classes: list[dict[str, Any]],
    labels: torch.Tensor,
    many: int,
    few: int,
) -> None:
    """`metrics-<split>.json`, `per_class-<split>.csv` and `per_class-<split>.png` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics, out_dir / f"metrics-{split}.json")
    counts = np.bincount(labels.numpy(), minlength=len(classes))
    write_per_class_csv(out_dir / f"per_class-{split}.csv", classes, counts, per_class, many, few, split=split)
    plot_per_class(out_dir / f"per_class-{split}.png", classes, per_class, f"{metrics['dataset']} {split}")


def _group_name(masks: dict[str, np.ndarray], index: int) -> str:
    return next((name for name, mask in masks.items() if mask[index]), "")


def write_per_class_csv(
    path: Path,
    classes: list[dict[str, Any]],
    eval_counts: np.ndarray,
    per_class: dict[str, np.ndarray],
    many: int,
    few: int,
    *,
    split: str = "test",
) -> None:
    """One row per trained class: ids, name, train and `<split>` image counts, shot groups, the accuracy of
    every predictor."""
    train_counts = np.asarray([int(c["train_count"]) for c in classes])
    oltr, orig = oltr_groups(train_counts, many, few), original_groups(train_counts)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["class", "dataset_id", "name", "train_count", f"{split}_count", "group_oltr", "group_original"]
            + [f"acc_{b}" for b in BRANCHES]
        )
        for i, c in enumerate(classes):
            accs = ["" if math.isnan(per_class[b][i]) else f"{per_class[b][i]:.6f}" for b in BRANCHES]
            writer.writerow(
                [
                    i,
                    c["dataset_id"],
                    c["name"],
                    int(c["train_count"]),
                    int(eval_counts[i]),
                    _group_name(oltr, i),
                    _group_name(orig, i),
                ]
                + accs
            )


def plot_per_class(path: Path, classes: list[dict[str, Any]], per_class: dict[str, np.ndarray], title: str) -> None:
    """Per-class accuracy against training count (log x), one marker series per predictor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_counts = np.asarray([max(1, int(c["train_count"])) for c in classes])
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, marker in (("vision", "x"), ("language", "+"), ("fused", "o"), ("calibrated", ".")):
        acc = per_class[name]
        ok = ~np.isnan(acc)
        ax.scatter(train_counts[ok], acc[ok], marker=marker, s=18, alpha=0.7, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("per-class top-1 accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_checkpoint(run_dir: str | Path, split: str = "test", out_dir: str | Path | None = None) -> dict[str, Any]:
    """Reload a finished run and evaluate it on `split` (default output: RUN/eval-<split>/).

    Returns the metrics dict that `metrics-<split>.json` holds.
    """
    run = load_final_model(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"eval-{split}"
    return evaluate_run(run, split, out)
