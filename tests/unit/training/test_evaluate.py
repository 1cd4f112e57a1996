"""Long-tail metrics: shot-group boundaries (both conventions), per-class accuracy, ECE, report files."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from vlltr.training.config import DataCfg
from vlltr.training.evaluate import plot_per_class, shot_thresholds, write_per_class_csv
from vlltr.training.metrics import (
    branch_metrics,
    evaluate_logits,
    expected_calibration_error,
    oltr_groups,
    original_groups,
    per_class_accuracy,
)

COUNTS = np.array([100, 101, 20, 19, 21, 99])


def test_group_boundaries_differ_at_100_and_20():
    oltr = oltr_groups(COUNTS, 100, 20)
    assert oltr["many"].tolist() == [False, True, False, False, False, False]
    assert oltr["medium"].tolist() == [True, False, True, False, True, True]
    assert oltr["few"].tolist() == [False, False, False, True, False, False]
    orig = original_groups(COUNTS)
    assert orig["many"].tolist() == [True, True, False, False, False, False]
    assert orig["medium"].tolist() == [False, False, False, False, True, True]
    assert orig["few"].tolist() == [False, False, True, True, False, False]


def test_per_class_accuracy_and_group_means():
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    pred = torch.tensor([0, 1, 1, 1, 0, 3, 4, 0])
    acc, total = per_class_accuracy(pred, labels, 6)
    assert acc.tolist() == [0.5, 1.0, 0.0, 1.0, 1.0, 0.0] and total.tolist() == [2, 2, 1, 1, 1, 1]
    metrics, _ = branch_metrics(pred, labels, COUNTS, 100, 20)
    assert metrics["top1"] == pytest.approx(5 / 8)
    assert metrics["oltr"]["many"] == pytest.approx(1.0)  # class 1
    assert metrics["oltr"]["medium"] == pytest.approx((0.5 + 0.0 + 1.0 + 0.0) / 4)  # classes 0, 2, 4, 5
    assert metrics["oltr"]["few"] == pytest.approx(1.0)  # class 3
    assert metrics["original"]["many"] == pytest.approx(0.75)  # classes 0, 1
    assert metrics["original"]["few"] == pytest.approx(0.5)  # classes 2, 3


def test_ece_hand_computed():
    # two predictions at confidence 0.9 (one right) and two at 0.6 (both right), 15 bins:
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.4, abs=1e-6)


def test_evaluate_logits_reports_every_predictor():
    gen = torch.Generator().manual_seed(0)
    z_vis, z_lin = torch.randn(30, 6, generator=gen), torch.randn(30, 6, generator=gen)
    labels = torch.arange(30) % 6
    metrics, per_class = evaluate_logits(
        z_vis,
        z_lin,
        labels,
        train_counts=COUNTS,
        alpha=0.2,
        log_prior=torch.zeros(6),
        calibration={"tau": 0.0, "temperature": 1.0},
        many_threshold=100,
        few_threshold=20,
    )
    assert set(metrics["branches"]) == {"vision", "language", "fused", "logit_sum", "calibrated"}
    assert metrics["branches"]["vision"]["top1"] == pytest.approx(float((z_vis.argmax(1) == labels).float().mean()))
    # tau 0 and T 1: the calibrated predictor is the published fusion
    assert metrics["branches"]["calibrated"] == metrics["branches"]["fused"]
    assert metrics["group_sizes"]["oltr"] == {"many": 1, "medium": 4, "few": 1}
    assert per_class["fused"].shape == (6,)


def test_meta_thresholds_override_config(tmp_path):
    cfg = DataCfg(root=str(tmp_path))
    assert shot_thresholds(cfg) == (100, 20, "config")
    (tmp_path / "meta.json").write_text('{"shot_thresholds": {"many_threshold": 40, "few_threshold": 15}}')
    assert shot_thresholds(cfg)[:2] == (40, 15)


def test_csv_and_plot(tmp_path):
    classes = [{"name": f"c{i}", "dataset_id": i + 10, "train_count": int(n)} for i, n in enumerate(COUNTS)]
    acc = np.array([0.5, 1.0, 0.0, math.nan, 1.0, 0.25])
    per_class = {b: acc for b in ("vision", "language", "fused", "logit_sum", "calibrated")}
    write_per_class_csv(tmp_path / "pc.csv", classes, np.array([2, 2, 1, 0, 1, 4]), per_class, 100, 20, split="test")
    rows = list(csv.DictReader((tmp_path / "pc.csv").open()))
    assert rows[1]["group_oltr"] == "many" and rows[0]["group_original"] == "many"
    assert rows[3]["acc_fused"] == "" and rows[5]["test_count"] == "4"
    assert rows[3]["acc_fused"] == "" and rows[5]["acc_vision"] == "0.250000" and rows[0]["dataset_id"] == "10"
    plot_per_class(tmp_path / "pc.png", classes, per_class, "test")
    assert (tmp_path / "pc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
