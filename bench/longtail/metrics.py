"""Long-tail accuracy metrics: per-class accuracy, shot groups, harmonic mean, and seed aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ShotGroups:
    """Class-id arrays of the many / medium / few groups, counted on the training set (OLTR rule)."""

    many: np.ndarray
    medium: np.ndarray
    few: np.ndarray
    # Further named class subsets reported beside the groups (e.g. the few-shot classes seen only in black and white).
    subsets: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def from_counts(train_counts: np.ndarray, many_threshold: int, few_threshold: int) -> ShotGroups:
        """many: count > many_threshold; few: count < few_threshold; medium: the rest."""
        counts = np.asarray(train_counts)
        ids = np.arange(len(counts))
        return ShotGroups(
            many=ids[counts > many_threshold],
            medium=ids[(counts <= many_threshold) & (counts >= few_threshold)],
            few=ids[counts < few_threshold],
        )


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of every class id in `0..num_classes-1` (NaN for a class with no test image)."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {pred.shape} and labels {labels.shape} differ in shape")
    hits = np.bincount(labels, weights=(pred == labels).astype(float), minlength=num_classes)
    totals = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)


def split_accuracies(pred: np.ndarray, labels: np.ndarray, groups: ShotGroups) -> dict[str, float]:
    """Overall / many / medium / few accuracy in percent, each the mean over its classes, and the same for every
    subset in `groups.subsets`."""
    num = int(max(groups.many.max(initial=-1), groups.medium.max(initial=-1), groups.few.max(initial=-1))) + 1
    acc = per_class_accuracy(pred, labels, num)

    def mean(ids: np.ndarray) -> float:
        vals = acc[ids]
        vals = vals[~np.isnan(vals)]
        return float(100.0 * vals.mean()) if len(vals) else float("nan")

    return {
        "overall": mean(np.arange(num)),
        "many": mean(groups.many),
        "medium": mean(groups.medium),
        "few": mean(groups.few),
        **{name: mean(ids) for name, ids in groups.subsets.items()},
    }


def harmonic_mean(a: float, b: float) -> float:
    """2ab/(a+b), 0 when both are 0 (the base-to-new H of seen and unseen accuracy)."""
    return 0.0 if a + b <= 0 else 2.0 * a * b / (a + b)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    arr = np.asarray(vals)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
