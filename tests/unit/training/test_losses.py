"""Stage-1 and stage-2 losses against values computed by hand on tiny inputs.

Logit matrices are written as `log(E)` so that every softmax is a ratio of small integers; the expected
numbers below are worked out from those ratios (ln 2 = 0.6931472, ln 3 = 1.0986123, ln 4 = 1.3862944).
"""

from __future__ import annotations

import math

import pytest
import torch

from vlltr.training.losses import (
    classwise_contrastive_loss,
    classwise_targets,
    logit_distillation_loss,
    smoothed_soft_target_ce,
    soft_target_ce,
    stage1_loss,
    stage2_loss,
)


def log_of(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def test_smoothed_ce_single_row():
    # softmax([0, ln 3]) = [1/4, 3/4]; target class 1.
    # nll = -ln(3/4) = 0.2876821; uniform = (ln 4 + -ln(3/4)) / 2 = 0.8369882
    # 0.9 * 0.2876821 + 0.1 * 0.8369882 = 0.3426127
    z = torch.tensor([[0.0, math.log(3.0)]])
    loss = smoothed_soft_target_ce(z, torch.tensor([[0.0, 1.0]]), 0.1)
    assert loss.item() == pytest.approx(0.3426127, abs=1e-6)
    assert smoothed_soft_target_ce(z, torch.tensor([[0.0, 1.0]]), 0.0).item() == pytest.approx(0.2876821, abs=1e-6)


def test_classwise_targets_row_normalised_equality_mask():
    q = classwise_targets(torch.tensor([0, 0, 1]))
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(q, expected)


def test_classwise_contrastive_hand_computed():
    # Z = log E with E = [[1,1,2],[2,1,1],[1,1,2]], labels [0, 0, 1], smoothing 0.1.
    # image->text rows: softmax [1/4,1/4,1/2], [1/2,1/4,1/4], [1/4,1/4,1/2]; uniform term of each = 1.1552453
    #   row0 nll ln4 = 1.3862944 -> 1.3631895; row1 nll 1.0397208 -> 1.0512733; row2 nll ln2 -> 0.7393570
    #   mean = 1.0512733
    # text->image rows (columns of E): [1,2,1], [1,1,1], [2,1,2]
    #   row0 softmax [1/4,1/2,1/4], target [.5,.5,0]: 1.0512733
    #   row1 softmax [1/3,1/3,1/3]: nll = uniform = ln3 -> 1.0986123
    #   row2 softmax [2/5,1/5,2/5], target class 2: nll 0.9162907, uniform 1.1473398 -> 0.9393956
    #   mean = 1.0297604
    # contrastive = (1.0512733 + 1.0297604) / 2 = 1.0405169
    z = log_of([[1, 1, 2], [2, 1, 1], [1, 1, 2]])
    parts = classwise_contrastive_loss(z, torch.tensor([0, 0, 1]), smoothing=0.1)
    assert parts["img2txt_loss"].item() == pytest.approx(1.0512733, abs=1e-6)
    assert parts["txt2img_loss"].item() == pytest.approx(1.0297604, abs=1e-6)
    assert parts["contrastive_loss"].item() == pytest.approx(1.0405169, abs=1e-6)


def test_smoothing_is_uniform_over_global_batch_columns():
    # With all labels different the target is the identity; the smoothing term averages -log p over all B_g
    # columns, not over classes: for Z = 0 (B = 4) every term is ln 4.
    z = torch.zeros(4, 4)
    parts = classwise_contrastive_loss(z, torch.tensor([0, 1, 2, 3]), smoothing=0.3)
    assert parts["contrastive_loss"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_distillation_hand_computed():
    # student Z = log [[1,3],[1,1]], teacher Zt = log [[1,1],[1,3]]
    # rows: -(.5 ln 1/4 + .5 ln 3/4) = 0.8369882; -(ln 1/2) = 0.6931472 -> mean 0.7650677
    # cols: student [1/2,1/2] vs teacher [1/2,1/2] = 0.6931472; student [3/4,1/4] vs teacher [1/4,3/4]
    #   = -(1/4 ln 3/4 + 3/4 ln 1/4) = 1.1116413 -> mean 0.9023943
    # L_dis = (0.7650677 + 0.9023943) / 2 = 0.8337310
    student = log_of([[1, 3], [1, 1]])
    teacher = log_of([[1, 1], [1, 3]])
    assert logit_distillation_loss(student, teacher).item() == pytest.approx(0.8337310, abs=1e-6)


def test_stage1_total_mixes_contrastive_and_distillation():
    # Same matrices, labels [0, 1]: L_con = 1.0122555 (each direction: (1.3313637 + 0.6931472) / 2)
    # total = 0.5 * 1.0122555 + 0.5 * 0.8337310 = 0.9229933
    student = log_of([[1, 3], [1, 1]])
    teacher = log_of([[1, 1], [1, 3]])
    labels = torch.tensor([0, 1])
    parts = stage1_loss(student, labels, smoothing=0.1, distill_beta=0.5, teacher_logits=teacher)
    assert parts["contrastive_loss"].item() == pytest.approx(1.0122555, abs=1e-6)
    assert parts["distill_loss"].item() == pytest.approx(0.8337310, abs=1e-6)
    assert parts["total_loss"].item() == pytest.approx(0.9229933, abs=1e-6)
    no_teacher = stage1_loss(student, labels, smoothing=0.1, distill_beta=0.0)
    assert "distill_loss" not in no_teacher
    assert no_teacher["total_loss"].item() == pytest.approx(1.0122555, abs=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        stage1_loss(student, labels, distill_beta=0.5)


def test_distillation_gradient_does_not_reach_teacher():
    teacher = torch.randn(3, 3, requires_grad=True)
    student = torch.randn(3, 3, requires_grad=True)
    logit_distillation_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_stage2_ce_hand_computed():
    # z_vis softmax [1/4, 3/4], z_lin softmax [3/4, 1/4], target [1/4, 3/4]
    # vision: -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623352; language: -(1/4 ln 3/4 + 3/4 ln 1/4) = 1.1116413
    z_vis = torch.tensor([[0.0, math.log(3)]])
    z_lin = torch.tensor([[math.log(3), 0.0]])
    target = torch.tensor([[0.25, 0.75]])
    parts = stage2_loss(z_vis, z_lin, target)
    assert parts["vision_loss"].item() == pytest.approx(0.5623352, abs=1e-6)
    assert parts["language_loss"].item() == pytest.approx(1.1116413, abs=1e-6)
    assert parts["total_loss"].item() == pytest.approx(1.6739765, abs=1e-6)


def test_stage2_logit_adjusted_hand_computed():
    # prior [1/4, 3/4], tau = 1: vision z + log prior = log [1/4, 9/4] -> softmax [0.1, 0.9]
    #   -(1/4 ln 0.1 + 3/4 ln 0.9) = 0.6546662
    # language z + log prior = log [3 * 1/4, 1 * 3/4] -> [1/2, 1/2]: ln 2 = 0.6931472
    z_vis = torch.tensor([[0.0, math.log(3)]])
    z_lin = torch.tensor([[math.log(3), 0.0]])
    target = torch.tensor([[0.25, 0.75]])
    log_prior = torch.tensor([0.25, 0.75]).log()
    parts = stage2_loss(z_vis, z_lin, target, kind="logit_adjusted", log_prior=log_prior, tau=1.0)
    assert parts["vision_loss"].item() == pytest.approx(0.6546662, abs=1e-6)
    assert parts["language_loss"].item() == pytest.approx(0.6931472, abs=1e-6)
    with pytest.raises(ValueError, match="prior"):
        stage2_loss(z_vis, z_lin, target, kind="logit_adjusted")
    with pytest.raises(ValueError, match="must be"):
        stage2_loss(z_vis, z_lin, target, kind="focal")


def test_soft_target_ce_matches_cross_entropy_for_one_hot():
    torch.manual_seed(0)
    z = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    one_hot = torch.nn.functional.one_hot(y, 7).float()
    assert soft_target_ce(z, one_hot).item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), abs=1e-6)


def test_contrastive_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="contrastive logits"):
        classwise_contrastive_loss(torch.zeros(3, 2), torch.tensor([0, 1, 2]))


def test_stage2_language_weight_scales_only_the_language_loss():
    z_vis = torch.tensor([[2.0, 0.0, -1.0]])
    z_lin = torch.tensor([[0.0, 1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    full = stage2_loss(z_vis, z_lin, target)
    alone = stage2_loss(z_vis, z_lin, target, language_weight=0.0)
    half = stage2_loss(z_vis, z_lin, target, language_weight=0.5)
    assert torch.allclose(alone["total_loss"], full["vision_loss"])  # the image-only baseline's loss
    assert torch.allclose(half["total_loss"], full["vision_loss"] + 0.5 * full["language_loss"])
    assert torch.equal(alone["language_loss"], full["language_loss"])  # still reported
    with pytest.raises(ValueError, match=">= 0"):
        stage2_loss(z_vis, z_lin, target, language_weight=-1.0)
