"""The whole training pipeline on Digits-LT at a tiny scale: outputs, resume after interruptions to the same
result, `vlltr eval` reproducing the training-time metrics, and early failure on bad input."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch

from vlltr.model.networks.factory import UnknownArchitectureError
from vlltr.training.config import ConfigError, load_config
from vlltr.training.data.errors import DataError
from vlltr.training.evaluate import evaluate_checkpoint
from vlltr.training.pipeline import run_training

FAST = [
    "stage1.epochs=2",
    "stage1.warmup_epochs=1",
    "stage1.batch_size=32",
    "stage1.monitor_every=1",
    "stage2.epochs=2",
    "stage2.batch_size=32",
    "anss.num_anchors=4",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from vlltr.training.benchmarks import write_benchmark

    out = tmp_path_factory.mktemp("bench") / "digits"
    write_benchmark("digits-lt", out, seed=0)
    return out


def config(root: Path, *extra: str):
    return load_config("digits-lt-tiny", [f"data.root={root}", *FAST, *extra])


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "full"
    run_training(config(digits), run)
    return run


class Interrupt(RuntimeError):
    pass


def interrupt_at(stage: str, epoch: int):
    def hook(s: str, e: int) -> None:
        if (s, e) == (stage, epoch):
            raise Interrupt(f"{s} {e}")

    return hook


def test_run_writes_the_documented_layout(finished):
    for name in (
        "config.yaml",
        "model.pt",
        "classes.json",
        "calibration.json",
        "metrics.json",
        "per_class-test.csv",
        "per_class-test.png",
        "stage1/done.json",
        "stage1/text_features.pt",
        "anss/anchors.pt",
        "anss/anchors.json",
        "anss/done.json",
        "stage2/done.json",
    ):
        assert (finished / name).is_file(), name
    classes = json.loads((finished / "classes.json").read_text())
    assert len(classes) == 10 and sum(c["train_count"] for c in classes) == 318
    assert all(c["source"] == "trained" and 1 <= len(c["anchors"]) <= 4 for c in classes)
    calibration = json.loads((finished / "calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and 0.0 <= calibration["tau"] <= 2.0 and calibration["temperature"] > 0
    # γ for classes added by text, from two rare classes treated as new (a fifth of 10 classes).
    fit = calibration["added_class_fit"]
    assert calibration["added_class_vision"] == "standardised" and len(fit["pseudo_new"]) == 2
    assert calibration["added_class_bias"] in [c["gamma"] for c in fit["curve"]]
    assert fit["seen_before"] - fit["seen_after"] <= 1.5 or fit["rule"].startswith("no γ")
    metrics = json.loads((finished / "metrics.json").read_text())
    test = metrics["test"]
    assert test["num_images"] == 500 and test["thresholds"]["oltr"] == {"many_gt": 40, "few_lt": 15}
    assert set(test["branches"]) == {"vision", "language", "fused", "logit_sum", "calibrated"}
    assert "val" in metrics
    history = json.loads((finished / "stage1/history.json").read_text())
    assert len(history) == 2 and "val_nearest_sentence_acc" in history[-1]


def test_eval_checkpoint_reproduces_training_metrics(finished, tmp_path):
    metrics = evaluate_checkpoint(finished, split="test", out_dir=tmp_path)
    assert metrics == json.loads((finished / "metrics.json").read_text())["test"]
    assert (tmp_path / "metrics-test.json").is_file() and (tmp_path / "per_class-test.png").is_file()


def test_finished_run_is_not_retrained(finished, digits):
    stamp = (finished / "model.pt").stat().st_mtime_ns
    metrics = run_training(config(digits), finished)
    assert metrics == json.loads((finished / "metrics.json").read_text())
    assert (finished / "model.pt").stat().st_mtime_ns == stamp


def test_interrupted_run_resumes_to_the_same_result(finished, digits, tmp_path):
    run = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_training(config(digits), run, epoch_hook=interrupt_at("stage1", 0))
    assert (run / "stage1/checkpoint.pt").is_file() and not (run / "stage1/done.json").exists()
    with pytest.raises(Interrupt):
        run_training(config(digits), run, epoch_hook=interrupt_at("stage2", 0))
    assert (run / "stage1/done.json").is_file() and not (run / "stage2/done.json").exists()
    metrics = run_training(config(digits), run)
    assert metrics == json.loads((finished / "metrics.json").read_text())
    # Each of the three starts left its software and machine; the finished run's rerun adds none.
    starts = json.loads((run / "environment.json").read_text())
    run_training(config(digits), run)
    assert json.loads((run / "environment.json").read_text()) == starts
    assert len(starts) == 3
    for record in starts:
        assert record["software"]["torch"] == importlib.metadata.version("torch")
        assert record["device"] == "cpu" and record["torch_threads"] >= 1 and record["started"]
    a = torch.load(finished / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    for part in ("clip_state_dict", "head_state_dict"):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=1e-6), key


def test_resume_with_a_different_config_is_refused(finished, digits):
    with pytest.raises(ConfigError, match="stage2.lr"):
        run_training(config(digits, "stage2.lr=0.5"), finished)


def copy_bench(digits: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    shutil.copytree(digits, root)
    return root


def assert_fails_before_training(cfg, run: Path, error, match: str) -> None:
    with pytest.raises(error, match=match):
        run_training(cfg, run)
    assert not (run / "stage1").exists()


def test_missing_image_fails_early(digits, tmp_path):
    root = copy_bench(digits, tmp_path)
    (root / "images/train/3_0.png").unlink()
    assert_fails_before_training(config(root), tmp_path / "run", DataError, "3_0.png")


def test_label_out_of_range_fails_early(digits, tmp_path):
    root = copy_bench(digits, tmp_path)
    with (root / "val.txt").open("a") as fh:
        fh.write("images/val/0_0.png 17\n")
    assert_fails_before_training(config(root), tmp_path / "run", DataError, "outside")


def test_class_without_text_fails_early(digits, tmp_path):
    root = copy_bench(digits, tmp_path)
    (root / "text/desc_4.txt").unlink()
    assert_fails_before_training(config(root), tmp_path / "run", DataError, "class 4")


def test_unknown_architecture_fails_early(digits, tmp_path):
    cfg = config(digits, "model.arch=ViT-Q-99")
    with pytest.raises(UnknownArchitectureError, match="ViT-Q-99"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_by_bad_input_takes_the_corrected_config(digits, tmp_path):
    root = copy_bench(digits, tmp_path)
    text = root / "text/desc_4.txt"
    saved = text.read_bytes()
    text.unlink()
    run = tmp_path / "run"
    assert_fails_before_training(config(root), run, DataError, "class 4")
    assert (run / "config.yaml").is_file()
    # Rerun with changed settings: no stage began, so the new config is taken (and checked), not refused as "a
    # run with a different config"; it fails on its own bad setting instead.
    text.write_bytes(saved)
    assert_fails_before_training(
        config(root, "data.val=null", "anss.reference_split=train"), run, DataError, "calibration_split"
    )
    assert load_config(run / "config.yaml").data.val is None


def test_missing_calibration_split_fails_early(digits, tmp_path):
    cfg = config(digits, "data.val=null", "anss.reference_split=train")
    assert_fails_before_training(cfg, tmp_path / "run", DataError, "calibration_split")


def test_a_negative_language_weight_fails_early(digits, tmp_path):
    cfg = config(digits, "stage2.language_weight=-0.5")
    assert_fails_before_training(cfg, tmp_path / "run", ConfigError, "stage2.language_weight must be >= 0")
