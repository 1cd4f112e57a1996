"""Cosine learning-rate schedule with linear warmup, as timm's `CosineLRScheduler` (the original's).

The original steps it once per epoch (`t` = epoch index) with `warmup_prefix=False`: during the first
`warmup` epochs the lr rises linearly from `warmup_lr`; afterwards it follows the cosine of the *unshifted*
epoch index over `total` epochs, so the first post-warmup epoch is already slightly below the base lr and the
last epoch never quite reaches `min_lr`. Per-iteration stepping uses a fractional `t = epoch + i / steps`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch


def cosine_lr(t: float, base_lr: float, total: float, warmup: float, warmup_lr: float, min_lr: float) -> float:
    """The lr at time `t` (epochs, possibly fractional)."""
    if warmup > 0 and t < warmup:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup
    if total <= 0:
        return base_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(t, total) / total))


class CosineSchedule:
    """Sets each param group's lr from its own base lr (`initial_lr`), the same shape for every group.

    Args:
        optimizer: its groups' current `lr` values are taken as the base lrs.
        epochs: schedule length in epochs.
        warmup_epochs: linear warmup length (0 = none).
        warmup_lr: lr at the start of warmup (shared by all groups, as timm does).
        min_lr: floor of the cosine.
        steps_per_epoch: iterations per epoch, needed when `unit == "iter"`.
        unit: `epoch` (the original) or `iter`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        *,
        warmup_epochs: int = 0,
        warmup_lr: float = 1e-6,
        min_lr: float = 0.0,
        steps_per_epoch: int = 1,
        unit: Literal["epoch", "iter"] = "epoch",
    ) -> None:
        if unit not in ("epoch", "iter"):
            raise ValueError(f"lr schedule unit must be 'epoch' or 'iter', got {unit!r}")
        self.optimizer = optimizer
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.unit = unit
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def time(self, epoch: int, step: int = 0) -> float:
        """The schedule time for iteration `step` of `epoch`."""
        return float(epoch) if self.unit == "epoch" else epoch + step / self.steps_per_epoch

    def lr_at(self, base_lr: float, epoch: int, step: int = 0) -> float:
        """The lr a group with base lr `base_lr` gets at (`epoch`, `step`)."""
        t = self.time(epoch, step)
        return cosine_lr(t, base_lr, self.epochs, self.warmup_epochs, self.warmup_lr, self.min_lr)

    def step(self, epoch: int, step: int = 0) -> None:
        """Set the lrs for (`epoch`, `step`); cheap to call every iteration in either unit."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(group["initial_lr"], epoch, step)
