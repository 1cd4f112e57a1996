"""`vlltr pretrain` then `vlltr train --config shapes-lt-tiny --set model.pretrained=FILE`, as a user runs them,
at a tiny scale: the written checkpoint is the starting point of the trained run, and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.paths import REPO
from vlltr.model.networks.factory import create_clip
from vlltr.training.benchmarks import write_benchmark


def vlltr(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlltr.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    # The benchmark's quick scale, with black-and-white training sessions (the page's draw).
    write_benchmark(
        "shapes-lt", out, seed=0, imbalance=4.0, n_max=12, val_per_class=2, test_per_class=2, monochrome_prob=0.5
    )
    return out


@pytest.fixture(scope="module")
def pretrained(shapes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pretrained") / "clip.pt"
    proc = vlltr("pretrain", "--benchmark", str(shapes), "--out", str(path), "--epochs", "1", "--num-images", "128")
    assert proc.returncode == 0, proc.stderr
    assert f"--set model.arch=vlltr-tiny-rn64 --set model.pretrained={path}" in proc.stdout
    return path


def test_pretrain_writes_the_benchmarks_recipe(pretrained):
    meta = json.loads(pretrained.with_suffix(".json").read_text())
    # The recipe the long-tail benchmark's arms start from, with the two values the command line changed.
    assert meta["recipe"]["arch"] == "vlltr-tiny-rn64" and meta["recipe"]["source"] == "shapes"
    assert meta["recipe"]["epochs"] == 1 and meta["recipe"]["num_images"] == 128
    assert meta["recipe"]["monochrome_prob"] == 0.2  # the benchmark has black-and-white sessions
    assert meta["provenance"]["num_images"] == 128
    assert meta["environment"]["software"]["torch"] == torch.__version__.split("+")[0]
    state = torch.load(pretrained, weights_only=True)
    assert "logit_scale" in state and any(k.startswith("visual.") for k in state)


def test_train_starts_from_the_pretrained_checkpoint(shapes, pretrained, tmp_path):
    run = tmp_path / "run"
    proc = vlltr(
        "train",
        "--config",
        "shapes-lt-tiny",
        "--out",
        str(run),
        "--set",
        f"data.root={shapes}",
        "--set",
        "model.arch=vlltr-tiny-rn64",
        "--set",
        f"model.pretrained={pretrained}",
        # Stage 1 at lr 0 keeps the starting weights, so its output shows which weights the run started from.
        "--set",
        "stage1.lr=0",
        "--set",
        "stage1.warmup_epochs=0",
        "--set",
        "stage1.epochs=1",
        "--set",
        "stage1.batch_size=32",
        "--set",
        "stage2.epochs=1",
        "--set",
        "stage2.batch_size=32",
        "--set",
        "anss.num_anchors=4",
        "--set",
        "data.num_workers=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["branches"]["calibrated"]["top1"] <= 1.0
    start = torch.load(pretrained, weights_only=True)
    after_stage1 = torch.load(run / "stage1" / "clip.pt", weights_only=True)
    params = [name for name, _ in create_clip("vlltr-tiny-rn64").named_parameters()]
    assert params and all(torch.equal(after_stage1[n], start[n]) for n in params)
    # ... and a randomly initialised CLIP of the same architecture is not what it started from.
    random_init = create_clip("vlltr-tiny-rn64").state_dict()
    assert not all(torch.equal(random_init[n], start[n]) for n in params)


def test_bad_input_is_one_line(tmp_path, shapes):
    proc = vlltr("pretrain", "--benchmark", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and proc.stderr.startswith("vlltr pretrain: ") and proc.stderr.count("\n") == 1
    assert "meta.json is missing" in proc.stderr
    proc = vlltr("pretrain", "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and "give the benchmark" in proc.stderr
    proc = vlltr("pretrain", "--recipe", "digits-lt", "--benchmark", str(shapes), "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and "does not fit" in proc.stderr
    proc = vlltr("pretrain", "--recipe", "shapes-lt", "--epochs", "0", "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and "epochs must be >= 1" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
