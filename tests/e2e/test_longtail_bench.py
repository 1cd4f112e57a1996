"""The long-tail benchmark harness end to end: a `python -m bench.longtail --quick` run, its page, plot and JSON
schema, and targets recomputed from its measurements."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.longtail.report import compute_targets
from support.paths import REPO
from vlltr.training.config import load_config

ARMS = (
    "zero_shot",
    "image_ce",
    "image_bs",
    "vlltr_faithful",
    "text_recommended",
    "control_shuffled",
    "control_distractors",
    "lift_style",
)
SPLITS = ("overall", "many", "medium", "few")
# Every arm is a full `vlltr train` run: the module's quick benchmark takes several minutes on a busy machine.
pytestmark = pytest.mark.timeout(900)


# One training seed (every arm is a full `vlltr train` run; two seeds double the test's time), seed 1 so that the
# per-seed pretraining build differs from the recipe's.
QUICK_ARGS = (
    "--dataset",
    "shapes-lt",
    "--quick",
    "--seeds",
    "1",
    "--text-lr-scale",
    "0.5",
    "--monochrome-sessions",
    "0.5",
    "--pretrain-epochs",
    "2",
    "--pretrain-seed",
    "7",
    "--pretrain-per-seed",
)


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "bench.longtail", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    cache = tmp_path_factory.mktemp("bench-cache")
    proc = _bench(*QUICK_ARGS, "--all-controls", "--out", str(out), "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "shapes-lt.json").read_text()), cache


def test_quick_run_writes_table_plot_and_json(quick_run):
    out, data, cache = quick_run
    md = (out / "shapes-lt.md").read_text()
    assert "python -m bench.longtail --dataset shapes-lt --quick" in md and "QUICK" in md
    assert (out / "shapes-lt.png").stat().st_size > 1000
    assert data["quick"] is True and data["seeds"] == [1]
    assert "torch " in data["machine"] and "kernels" in data["machine"]  # what pretraining builds depend on
    # The recipe's text-tower lr reaches the run, its page, and a separate published stage 1.
    assert data["config"]["seed"]["text_lr_scale"] == 0.5 and "0.5× that lr" in md
    assert "vlltr_faithful" in data["results"]["timings_s"]["1"]
    # Every trained arm is a `vlltr train` run of the bundled recipe: its run directory holds the product's files,
    # starting from the seed's pretraining build, on the protocol's training and selection lists.
    assert data["config"]["seed"]["recipe"]["config"] == "shapes-lt-pretrained" and "`vlltr train` run" in md
    for s, build in data["pretrain"]["builds"].items():
        runs = list((cache / "runs").glob(f"*-{Path(build['file']).stem}-select*/seed{s}"))
        assert len(runs) == 1
        for arm in (*ARMS[1:], "control_text_shuffled"):
            run = runs[0] / arm
            assert (run / "metrics.json").is_file() and (run / "calibration.json").is_file()
            cfg = load_config(run / "config.yaml")
            assert Path(cfg.model.pretrained).name == build["file"] and cfg.run.seed == int(s)
            assert (cfg.data.train, cfg.data.val) == ("fit.txt", "select.txt")
        # cRT starts from the cross-entropy arm's fine-tuned CLIP, through `model.pretrained`.
        crt = load_config(runs[0] / "image_crt" / "config.yaml")
        assert Path(crt.model.pretrained) == runs[0] / "image_ce-clip.pt"
        towers = [
            torch.load(runs[0] / a / "model.pt", weights_only=True)["clip_state_dict"]
            for a in ("image_ce", "image_crt")
        ]
        assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0] if k.startswith("visual."))
    protocol = data["protocol"]
    assert protocol["images"]["select"] >= data["num_trained"] and "select.txt" in protocol["rule"]
    # The stronger image-only baselines: post-hoc logit adjustment fitted on the selection images.
    for arm in ("image_ce_posthoc_la", "image_bs_posthoc_la", "image_crt_posthoc_la"):
        assert "tau" in data["results"]["arms"][arm]["per_seed"]["1"]
    # --monochrome-sessions reaches the data and the pretraining set.
    assert data["pretrain"]["recipe"]["monochrome_prob"] > 0 and "in black and white, their captions" in md
    # One pretraining build per training seed: the recipe's seed plus the training seed (the cache key holds the
    # recipe, tests/unit/training/test_pretrain.py).
    builds = data["pretrain"]["builds"]
    assert data["pretrain"]["recipe"]["seed"] == 7 and data["pretrain"]["per_seed_builds"] is True
    assert data["pretrain"]["recipe"]["epochs"] == 2 and "2 epochs" in md
    assert {s: b["pretrain_seed"] for s, b in builds.items()} == {"1": 8} and builds["1"]["file"] in md
    # The protocol is on the page: the selection split, and that data seed 0 is the design draw.
    assert "Protocol: every arm trains on fit.txt" in md and "Data seed 0 is the design draw" in md
    # The quick data (n_max 12) is one training session per class: the page counts the classes seen only in black
    # and white, all of them in its few-shot group.
    sessions = data["training_sessions"]
    assert sessions["size"] == 25 and sessions["monochrome_prob"] == 0.5
    greyed = sessions["classes_only_in_black_and_white"]
    assert greyed["many"] == greyed["medium"] == 0 and 0 < greyed["few"] < data["num_trained"]
    assert f"{greyed['few']} few." in md
    # ... and splits every arm's few-shot accuracy by what the training images showed.
    assert "trained only in black and white" in md
    for arm in ARMS:
        assert {"few_colour", "few_black_and_white"} <= set(data["results"]["arms"][arm]["mean"])
    for arm in ARMS:
        entry = data["results"]["arms"][arm]
        assert set(SPLITS) <= set(entry["per_seed"]["1"]) and set(SPLITS) <= set(entry["mean"])
        assert 0.0 <= entry["per_seed"]["1"]["overall"] <= 100.0
    anss = data["results"]["anss"]["per_seed"]["1"]
    assert {"anss_precision", "base_rate", "text_only_precision"} <= set(anss)
    added = data["results"]["added"]["per_seed"]["1"]
    assert added["num_added"] == 8
    for key in ("added_alone", "trained_before", "image_free_precision", "gamma"):
        assert isinstance(added[key], (int, float))
    for t in data["targets"].values():
        assert set(t) >= {"value", "goal", "met"} and isinstance(t["met"], bool)


def test_targets_are_computed_from_the_measurements(quick_run):
    _, data, _ = quick_run
    results = data["results"]
    recomputed = compute_targets(results)
    for name, t in recomputed.items():
        assert data["targets"][name]["value"] == pytest.approx(t["value"], abs=1e-3)
    # Move the measurements: the targets must follow.
    moved = copy.deepcopy(results)
    moved["arms"]["text_recommended"]["mean"]["few"] += 50.0
    moved["arms"]["control_shuffled"]["mean"]["few"] -= 10.0
    after = compute_targets(moved)
    assert after["few_shot_gain_over_best_image_only"]["value"] == pytest.approx(
        recomputed["few_shot_gain_over_best_image_only"]["value"] + 50.0, abs=1e-3
    )
    assert after["shuffled_text_few_shot_drop"]["value"] == pytest.approx(
        recomputed["shuffled_text_few_shot_drop"]["value"] + 60.0, abs=1e-3
    )
    assert after["few_shot_gain_over_best_image_only"]["met"] is True


def _render(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "bench.longtail", "--dataset", "shapes-lt", "--render-only", "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_other_draws_are_sections_of_the_page(quick_run, tmp_path):
    out, data, _ = quick_run
    page, draw = tmp_path / "page", tmp_path / "draw"
    for folder in (page, draw):
        folder.mkdir()
        for suffix in ("json", "png"):
            (folder / f"shapes-lt.{suffix}").write_bytes((out / f"shapes-lt.{suffix}").read_bytes())
    proc = _render(page, "--draw", f"Colour-only draw={draw / 'shapes-lt.json'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (page / "shapes-lt.md").read_text()
    section = md.split("## Other draws", 1)[1]
    assert "### Colour-only draw" in section and data["command"] in section
    # One seed: means without a spread; the draw's own targets are counted from its JSON.
    rec = data["results"]["arms"]["text_recommended"]["mean"]["overall"]
    assert f"| {rec:.1f} |" in section.split("Recommended", 1)[1].splitlines()[0]
    met = sum(t["met"] for t in data["targets"].values())
    assert f"Its own targets: {met} of {len(data['targets'])} met" in section
    # The list is kept in the page's JSON (relative to it), so a later render keeps the section.
    assert json.loads((page / "shapes-lt.json").read_text())["other_draws"] == [
        {"label": "Colour-only draw", "path": "../draw/shapes-lt.json"}
    ]
    assert _render(page).returncode == 0 and "### Colour-only draw" in (page / "shapes-lt.md").read_text()
    # A missing file is a one-line usage error, not a traceback.
    bad = _render(page, "--draw", f"x={tmp_path / 'none.json'}")
    assert bad.returncode == 2 and "--draw takes LABEL=JSON" in bad.stderr and "Traceback" not in bad.stderr


def test_an_ablation_runs_the_recipe_beside_itself_with_the_overrides(quick_run, tmp_path):
    out, data, cache = quick_run
    proc = _bench(*QUICK_ARGS, "--ablate", "data.augment=original", "--out", str(tmp_path), "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = tmp_path / "shapes-lt-ablation-data.augment-original.md"
    ablation = json.loads(page.with_suffix(".json").read_text())
    agg = ablation["results"]
    # The recipe's side is the benchmark's own run of it, found in the cache: the same numbers.
    recipe = agg["arms"]["text_recommended"]["per_seed"]["1"]
    benchmarked = data["results"]["arms"]["text_recommended"]["per_seed"]["1"]
    assert {k: recipe[k] for k in SPLITS} == {k: benchmarked[k] for k in SPLITS}
    ablated = ablation["ablated_arm"]
    runs = next((cache / "runs").glob("*/seed1"))
    assert load_config(runs / ablated / "config.yaml").data.augment == "original"
    assert load_config(runs / "text_recommended" / "config.yaml").data.augment == "light"
    other = agg["arms"][ablated]["per_seed"]["1"]
    assert agg["difference"]["per_seed"]["1"]["few"] == pytest.approx(other["few"] - recipe["few"], abs=1e-3)
    assert ablation["from_scratch_min"] > 0 and "Difference (with − without" in page.read_text()
    # The benchmark page, rendered again beside it, states the measured effect instead of "not measured".
    page_dir = tmp_path / "page"
    page_dir.mkdir()
    for suffix in ("json", "png"):
        (page_dir / f"shapes-lt.{suffix}").write_bytes((out / f"shapes-lt.{suffix}").read_bytes())
    for suffix in ("json", "md"):
        (page_dir / page.with_suffix(f".{suffix}").name).write_bytes(page.with_suffix(f".{suffix}").read_bytes())
    assert "not measured here" in (out / "shapes-lt.md").read_text()
    assert _render(page_dir).returncode == 0
    assert f"Measured ([{page.name}]" in (page_dir / "shapes-lt.md").read_text()


def test_an_ablation_with_an_unknown_key_stops_before_any_work(tmp_path):
    proc = _bench(*QUICK_ARGS, "--ablate", "data.augmentation=original", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--ablate" in proc.stderr and "data.augmentation" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
