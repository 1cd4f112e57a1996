"""The long-tail benchmark harness in-process: the default recipe is the published page's, the session split,
targets that follow the measured numbers (never constants), the split metrics, the stage-1 text-tower lr.
tests/e2e/test_longtail_bench.py runs `python -m bench.longtail --quick` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.longtail.metrics import ShotGroups, harmonic_mean, mean_std, split_accuracies
from bench.longtail.report import compute_targets
from support.paths import REPO


def test_default_recipe_is_the_pages():
    """The defaults are what docs/benchmarks/shapes-lt.md was measured with: black-and-white shoots at 1/3, a
    32-epoch pretraining build with black-and-white pictures, and the recommended head with fixed anchors."""
    from bench.longtail.__main__ import settings
    from bench.longtail.runner import FAITHFUL, RECOMMENDED

    sizes, pre_cfg, seed_cfg = settings("shapes-lt", quick=False)
    assert sizes["monochrome_prob"] == pytest.approx(1 / 3) and pre_cfg.epochs == 32
    assert seed_cfg.recommended == RECOMMENDED and RECOMMENDED.anchor_lr == 0.0
    assert RECOMMENDED.attn_lr == FAITHFUL.attn_lr and RECOMMENDED.loss == "logit_adjusted"
    page = json.loads((REPO / "docs/benchmarks/shapes-lt.json").read_text())
    assert page["config"]["recommended_head"]["anchor_lr"] == 0.0
    assert page["pretrain"]["recipe"]["epochs"] == pre_cfg.epochs
    assert page["training_sessions"]["monochrome_prob"] == pytest.approx(sizes["monochrome_prob"])
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


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_stage1_text_lr_scale_slows_or_freezes_only_the_text_tower(scale):
    import torch

    from bench.longtail.backbone import Budget, train_stage1
    from vlltr.model.networks.factory import clip_dims, create_clip

    torch.manual_seed(0)
    clip = create_clip("vlltr-tiny-vit")
    size, ctx = clip_dims(clip).image_size, int(clip.positional_embedding.shape[0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    tokens = [torch.randint(1, 100, (2, ctx)) for _ in range(3)]
    kwargs = dict(budget=Budget(epochs=2, batch_size=8, warmup_frac=0.0), seed=0)
    images = torch.randn(len(labels), 3, size, size)
    scaled = train_stage1(clip, images, labels, np.bincount(labels), tokens, text_lr_scale=scale, **kwargs)
    full = train_stage1(clip, images, labels, np.bincount(labels), tokens, **kwargs)

    def moved(model, text: bool) -> float:
        return sum(
            float((p - q).abs().sum())
            for (k, p), q in zip(model.named_parameters(), clip.parameters())
            if k.startswith("visual.") != text and k != "logit_scale"
        )

    assert moved(scaled, text=False) > 0
    if scale == 0.0:
        assert moved(scaled, text=True) == 0.0
    else:
        assert 0.0 < moved(scaled, text=True) < moved(full, text=True)
