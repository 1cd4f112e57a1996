"""Mixup / CutMix in timm's batch mode, with smoothed soft targets (the original's hidden stage-2 defaults).

One mixing decision per batch: with probability `prob` the batch is mixed; CutMix is chosen with
probability `switch_prob` when both are enabled. Images are mixed with the batch in reverse order
(`x.flip(0)`); CutMix's lambda is corrected to the pasted box's true area. Randomness comes from an explicit
numpy Generator so a resumed run draws the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's `one_hot`: `1 - eps + eps / C` on the label, `eps / C` elsewhere."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((labels.numel(), num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1).long(), on)


def mix_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """`lam * onehot(y) + (1 - lam) * onehot(y.flip(0))`, both smoothed."""
    y1 = smoothed_one_hot(labels, num_classes, smoothing)
    y2 = smoothed_one_hot(labels.flip(0), num_classes, smoothing)
    return y1 * lam + y2 * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's `rand_bbox`: a box of side `sqrt(1 - lam)` times the image, centred uniformly, clipped."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return yl, yh, xl, xh


@dataclass
class Mixer:
    """Batch-mode mixup/cutmix producing `(mixed images, soft targets)`.

    With `mixup_alpha == cutmix_alpha == 0` it only smooths the labels.
    """

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    prob: float = 1.0
    smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """Lambda and whether to cut (timm's `_params_per_batch`)."""
        if not self.active or rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        else:
            use_cutmix = self.cutmix_alpha > 0
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.active and images.shape[0] % 2 != 0:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {images.shape[0]}")
        lam, use_cutmix = self.draw(rng)
        if lam < 1.0:
            images = images.clone()
            if use_cutmix:
                h, w = images.shape[-2:]
                yl, yh, xl, xh = cutmix_box(h, w, lam, rng)
                images[:, :, yl:yh, xl:xh] = images.flip(0)[:, :, yl:yh, xl:xh]
                lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        return images, mix_targets(labels, self.num_classes, lam, self.smoothing)
