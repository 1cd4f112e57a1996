"""The cosine schedule with linear warmup (timm's CosineLRScheduler as the original steps it)."""

from __future__ import annotations

import math

import pytest
import torch

from vlltr.training.schedule import CosineSchedule, cosine_lr


def test_warmup_then_unshifted_cosine():
    # 50 epochs, 5 warmup epochs from 1e-6 to 5e-5.
    base, warm = 5e-5, 1e-6
    assert cosine_lr(0, base, 50, 5, warm, 0.0) == pytest.approx(1e-6)
    assert cosine_lr(2, base, 50, 5, warm, 0.0) == pytest.approx(1e-6 + 2 * (5e-5 - 1e-6) / 5)
    # after warmup the cosine uses the unshifted epoch index: 0.5 * base * (1 + cos(pi * 5 / 50))
    assert cosine_lr(5, base, 50, 5, warm, 0.0) == pytest.approx(0.5 * base * (1 + math.cos(math.pi / 10)))
    assert cosine_lr(49, base, 50, 5, warm, 1e-5) > 1e-5  # the last epoch never reaches min_lr


def test_no_warmup_starts_at_base():
    assert cosine_lr(0, 1e-3, 50, 0, 1e-6, 0.0) == pytest.approx(1e-3)
    assert cosine_lr(25, 1e-3, 50, 0, 1e-6, 0.0) == pytest.approx(0.5e-3)


def _optimizer() -> torch.optim.Optimizer:
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.AdamW([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 1e-6}])


def test_groups_keep_their_own_base_lr():
    opt = _optimizer()
    sched = CosineSchedule(opt, 10, warmup_epochs=0, min_lr=0.0)
    sched.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5e-6)


def test_epoch_unit_ignores_iterations_and_iter_unit_uses_them():
    opt = _optimizer()
    per_epoch = CosineSchedule(opt, 10, steps_per_epoch=4, unit="epoch")
    per_epoch.step(2, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(2, 1e-3, 10, 0, 1e-6, 0.0))
    opt2 = _optimizer()
    per_iter = CosineSchedule(opt2, 10, steps_per_epoch=4, unit="iter")
    per_iter.step(2, 3)
    assert opt2.param_groups[0]["lr"] == pytest.approx(cosine_lr(2.75, 1e-3, 10, 0, 1e-6, 0.0))
    with pytest.raises(ValueError, match="unit"):
        CosineSchedule(_optimizer(), 10, unit="step")
