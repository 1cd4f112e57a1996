"""The long-tail benchmark harness in-process: the default recipe is the published page's, the session split,
targets that follow the measured numbers (never constants), the split metrics.
tests/e2e/test_longtail_bench.py runs `python -m bench.longtail --quick` end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bench.longtail.metrics import ShotGroups, harmonic_mean, mean_std, split_accuracies
from bench.longtail.report import compute_targets
from support.paths import REPO


def test_default_recipe_is_the_pages():
    """The defaults are what docs/benchmarks/shapes-lt.md was measured with: black-and-white shoots at 1/3, the
    32-epoch pretraining build of `vlltr pretrain`, and the bundled recipe `shapes-lt-pretrained` unchanged, on a
    draw that was not used to design it."""
    from bench.longtail.__main__ import DESIGN_DATA_SEEDS, settings
    from bench.longtail.runner import SeedConfig
    from vlltr.training.config import load_config
    from vlltr.training.pretrain import PRETRAIN_MONOCHROME, PRETRAIN_RECIPES

    sizes, pre_cfg, seed_cfg = settings("shapes-lt", quick=False)
    assert sizes["monochrome_prob"] == pytest.approx(1 / 3) and pre_cfg == PRETRAIN_RECIPES["shapes-lt"]
    assert pre_cfg.epochs == 32 and seed_cfg.recipe.config == "shapes-lt-pretrained" and not seed_cfg.recipe.overrides
    page = json.loads((REPO / "docs/benchmarks/shapes-lt.json").read_text())
    # With black-and-white shoots the pretraining set gets its black-and-white share too (as `vlltr pretrain`).
    built = dataclasses.replace(pre_cfg, monochrome_prob=PRETRAIN_MONOCHROME)
    assert page["pretrain"]["recipe"] == json.loads(json.dumps(dataclasses.asdict(built)))
    assert page["training_sessions"]["monochrome_prob"] == pytest.approx(sizes["monochrome_prob"])
    # Every arm was the bundled recipe plus the arm's overrides, with the harness's defaults.
    assert page["config"]["seed"] == json.loads(json.dumps(dataclasses.asdict(SeedConfig())))
    assert page["data_seed"] not in DESIGN_DATA_SEEDS and not page["quick"]
    # α is frozen in the bundled config; the recommended arm's runs used it.
    cfg = load_config("shapes-lt-pretrained")
    assert {a["alpha"] for a in page["results"]["arms"]["text_recommended"]["per_seed"].values()} == {cfg.stage2.alpha}
    # Digits-LT has no colour to take away.
    assert "monochrome_prob" not in settings("digits-lt", quick=False)[0]


def test_colour_only_data_has_no_session_split(tmp_path):
    from types import SimpleNamespace

    from bench.longtail.__main__ import _sessions_summary
    from bench.longtail.runner import black_and_white_only

    meta = {
        "sessions": {"size": 25, "monochrome_prob": 0.0},
        "classes": [{"train_count": 3, "train_monochrome": 0}, {"train_count": 0, "train_monochrome": 0}],
    }
    bm = SimpleNamespace(meta=meta, many_threshold=100, few_threshold=20)
    assert black_and_white_only(bm) is None and _sessions_summary(bm) is None
    meta["sessions"]["monochrome_prob"] = 0.5
    meta["classes"][0]["train_monochrome"] = 3
    assert black_and_white_only(bm).tolist() == [True, False]
    assert _sessions_summary(bm)["classes_only_in_black_and_white"] == {"many": 0, "medium": 0, "few": 1}


def test_targets_use_seed_noise_and_the_best_image_only_arm():
    def arm(few: float, std: float, overall: float = 50.0) -> dict:
        return {
            "mean": {"overall": overall, "many": 0.0, "medium": 0.0, "few": few},
            "std": {"overall": 0.0, "many": 0.0, "medium": 0.0, "few": std},
        }

    results = {
        "arms": {
            "image_ce": arm(10, 1),
            "image_bs": arm(30, 2, overall=55.0),
            "text_recommended": arm(33, 1),
            "control_shuffled": arm(20, 1),
        }
    }
    t = compute_targets(results)
    assert t["few_shot_gain_over_best_image_only"]["value"] == pytest.approx(3.0)
    assert t["few_shot_gain_over_best_image_only"]["goal"] == pytest.approx(4.0)  # 2 x the larger std (image_bs)
    assert t["few_shot_gain_over_best_image_only"]["met"] is False
    assert t["overall_cost_vs_best_image_only"]["value"] == pytest.approx(5.0)
    assert t["overall_cost_vs_best_image_only"]["met"] is False
    assert t["shuffled_text_few_shot_drop"]["met"] is True


def test_split_metrics_and_helpers():
    counts = np.array([150, 50, 5])
    groups = ShotGroups.from_counts(counts, 100, 20)
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 0, 0])
    acc = split_accuracies(pred, labels, groups)
    assert acc == {"overall": pytest.approx(50.0), "many": 100.0, "medium": 50.0, "few": 0.0}
    sub = ShotGroups(groups.many, groups.medium, groups.few, subsets={"head_and_tail": np.array([0, 2])})
    assert split_accuracies(pred, labels, sub)["head_and_tail"] == pytest.approx(50.0)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(50.0, 100.0) == pytest.approx(66.667, abs=1e-3)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(1.4142, abs=1e-4))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_the_best_image_only_arm_includes_the_post_hoc_adjusted_baselines():
    def arm(few: float, overall: float = 50.0) -> dict:
        return {
            "mean": {"overall": overall, "many": 0.0, "medium": 0.0, "few": few},
            "std": {"overall": 0.0, "many": 0.0, "medium": 0.0, "few": 0.5},
        }

    arms = {"image_ce": arm(10), "image_bs": arm(30), "text_recommended": arm(33), "control_shuffled": arm(20)}
    before = compute_targets({"arms": arms})["few_shot_gain_over_best_image_only"]
    after = compute_targets({"arms": {**arms, "image_bs_posthoc_la": arm(32, overall=60.0)}})
    assert before["value"] == pytest.approx(3.0) and before["met"] is True
    assert after["few_shot_gain_over_best_image_only"]["value"] == pytest.approx(1.0)
    assert "image_bs_posthoc_la" in after["few_shot_gain_over_best_image_only"]["rule"]
    assert after["overall_cost_vs_best_image_only"]["value"] == pytest.approx(10.0)


def test_the_second_dataset_target_requires_its_own_targets():
    base = {
        "arms": {
            a: {"mean": {"overall": 1, "few": 1}, "std": {"overall": 0, "few": 0}}
            for a in ("image_ce", "image_bs", "text_recommended", "control_shuffled")
        }
    }
    other = {
        "name": "digits-lt",
        "path": "x.json",
        "complete": True,
        "targets_total": 5,
        "targets_met": 1,
        "missed": ["a", "b", "c", "d"],
    }
    t = compute_targets(base, other)["second_dataset_targets"]
    assert (t["value"], t["goal"], t["met"]) == (1.0, 5.0, False) and "missed: a, b, c, d" in t["rule"]
    assert compute_targets(base, {**other, "targets_met": 5, "missed": []})["second_dataset_targets"]["met"] is True
    assert (
        compute_targets(base, {**other, "targets_met": 5, "missed": [], "complete": False})["second_dataset_targets"][
            "met"
        ]
        is False
    )
