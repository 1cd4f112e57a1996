"""Long-tail metrics on logits: top-1, shot groups under two boundary conventions, per-class accuracy, ECE.

Shot groups are defined by the training count n_c of each class:
- `oltr` (Liu et al., the usual convention; thresholds from the config or the benchmark's meta.json):
  many n_c > many_threshold, medium few_threshold <= n_c <= many_threshold, few n_c < few_threshold;
- `original` (VL-LTR's `shot_acc`): many n_c >= 100, medium 21..99, few n_c <= 20.
A group's accuracy is the mean per-class accuracy over its classes that have evaluation images (equal to
correct / total on a balanced evaluation set).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vlltr.model.networks.head import calibrated_probabilities, fuse_probabilities
from vlltr.model.runtime.manifest import Calibration


def oltr_groups(train_counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict[str, np.ndarray]:
    """Boolean class masks `many`, `medium`, `few` under OLTR-style boundaries."""
    n = np.asarray(train_counts)
    return {
        "many": n > many_threshold,
        "medium": (n >= few_threshold) & (n <= many_threshold),
        "few": n < few_threshold,
    }


def original_groups(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean class masks under the original code's boundaries (>= 100, 21..99, <= 20)."""
    n = np.asarray(train_counts)
    return {"many": n >= 100, "medium": (n > 20) & (n < 100), "few": n <= 20}


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`(accuracy [C] with NaN for classes without images, image counts [C])`."""
    total = torch.bincount(labels, minlength=num_classes).numpy()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
    return acc, total


def _group_means(acc: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, mask in groups.items():
        vals = acc[mask & ~np.isnan(acc)]
        out[name] = float(vals.mean()) if vals.size else None
    return out


def branch_metrics(
    pred: torch.Tensor, labels: torch.Tensor, train_counts: np.ndarray, many_threshold: int, few_threshold: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Top-1, balanced accuracy and both group conventions for one prediction vector, plus per-class acc."""
    num_classes = len(train_counts)
    acc, _ = per_class_accuracy(pred, labels, num_classes)
    metrics = {
        "top1": float((pred == labels).float().mean()),
        "balanced": float(np.nanmean(acc)),
        "oltr": _group_means(acc, oltr_groups(train_counts, many_threshold, few_threshold)),
        "original": _group_means(acc, original_groups(train_counts)),
    }
    return metrics, acc


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins: `sum_b |B_b|/N * |acc_b - conf_b|`."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


def branch_predictions(
    z_vis: torch.Tensor, z_lin: torch.Tensor, alpha: float, log_prior: torch.Tensor, calibration: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Probabilities (or scores) of every reported predictor, `[N, C]` each.

    `vision`, `language`: each branch alone; `fused`: the published alpha-softmax fusion; `logit_sum`: the
    original code's shot-metric predictor (argmax of z_vis + z_lin); `calibrated`: the served formula with
    the fitted tau and temperature.
    """
    options = Calibration.from_dict(calibration).scoring_options()
    return {
        "vision": z_vis.softmax(dim=1),
        "language": z_lin.softmax(dim=1),
        "fused": fuse_probabilities(z_vis, z_lin, alpha),
        "logit_sum": z_vis + z_lin,
        "calibrated": calibrated_probabilities(z_vis, z_lin, log_prior, alpha=alpha, **options),
    }


def evaluate_logits(
    z_vis: torch.Tensor,
    z_lin: torch.Tensor,
    labels: torch.Tensor,
    *,
    train_counts: np.ndarray,
    alpha: float,
    log_prior: torch.Tensor,
    calibration: dict[str, Any],
    many_threshold: int,
    few_threshold: int,
    ece_bins: int = 15,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All metrics of one split, and the per-class accuracy of each predictor."""
    preds = branch_predictions(z_vis, z_lin, alpha, log_prior, calibration)
    branches, per_class = {}, {}
    for name, scores in preds.items():
        branches[name], per_class[name] = branch_metrics(
            scores.argmax(dim=1), labels, train_counts, many_threshold, few_threshold
        )
    adjusted = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=alpha, tau=float(calibration.get("tau", 0.0)))
    ece = {
        "fused": expected_calibration_error(preds["fused"], labels, ece_bins),
        "adjusted_before_temperature": expected_calibration_error(adjusted, labels, ece_bins),
        "calibrated": expected_calibration_error(preds["calibrated"], labels, ece_bins),
        "bins": ece_bins,
    }
    groups = oltr_groups(train_counts, many_threshold, few_threshold)
    metrics = {
        "num_images": int(labels.numel()),
        "num_classes": int(len(train_counts)),
        "alpha": float(alpha),
        "thresholds": {
            "oltr": {"many_gt": many_threshold, "few_lt": few_threshold},
            "original": {"many_ge": 100, "few_le": 20},
        },
        "group_sizes": {
            "oltr": {k: int(v.sum()) for k, v in groups.items()},
            "original": {k: int(v.sum()) for k, v in original_groups(train_counts).items()},
        },
        "branches": branches,
        "ece": ece,
    }
    return metrics, per_class


def summary_line(metrics: dict[str, Any]) -> str:
    """One log line: overall and OLTR groups of the fused and calibrated predictors."""
    parts = []
    for name in ("vision", "language", "fused", "calibrated"):
        b = metrics["branches"][name]
        g = b["oltr"]
        parts.append(
            f"{name} {100 * b['top1']:.2f} ("
            + "/".join(
                "-" if g[k] is None or math.isnan(g[k]) else f"{100 * g[k]:.1f}" for k in ("many", "medium", "few")
            )
            + ")"
        )
    return "; ".join(parts)
