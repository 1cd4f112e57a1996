"""Acceptance 1 on a really trained run: `vlltr data digits-lt` + training (digits-lt-tiny, one epoch per
stage) + `vlltr export`, then the whole Digits-LT test split (500 images) through the bundle in a process
that cannot import torch, against the PyTorch model on torchvision-preprocessed images."""

from __future__ import annotations

import json

from support.export_check import check_bundle_matches_torch
from vlltr.cli import main
from vlltr.training.config import load_config
from vlltr.training.pipeline import run_training


def test_trained_digits_lt_bundle_matches_torch(tmp_path):
    data = tmp_path / "digits-lt"
    assert main(["data", "digits-lt", "--out", str(data)]) == 0
    run = tmp_path / "run"
    cfg = load_config("digits-lt-tiny", [f"data.root={data}", "stage1.epochs=1", "stage2.epochs=1"])
    run_training(cfg, run)
    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(run), "--out", str(bundle)]) == 0
    numbers = check_bundle_matches_torch(run, bundle, data / "test.txt", data, tmp_path)
    assert numbers["images"] == 500
    # The shipped tiny configs decode large JPEGs at reduced size; the bundle tells the service to do the same,
    # and classes added later by text get the γ that training fitted.
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocess"]["jpeg_draft"] is True
    calibration = json.loads((run / "calibration.json").read_text())
    assert manifest["calibration"]["added_class_vision"] == "standardised"
    assert manifest["calibration"]["added_class_bias"] == calibration["added_class_bias"]
