"""Stage 1 (CVLP): a trainable CLIP plus an optional frozen teacher copy for logit distillation."""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


class CVLP(nn.Module):
    """Class-wise visual-linguistic pretraining wrapper.

    The student's `logit_scale` is learnable and deliberately never clamped (the original does not clamp it;
    open_clip's own training loop does). The teacher, when given, is frozen and always in eval mode.

    Args:
        clip: the CLIP model to fine-tune.
        teacher: the frozen original CLIP for distillation, or None to switch distillation off.
        bn_train_mode: False runs the student's image tower in eval mode while training (the original's
            `train_mode=False`, which freezes BatchNorm statistics of ResNets); parameters still update.
    """

    def __init__(self, clip: open_clip.CLIP, teacher: open_clip.CLIP | None = None, *, bn_train_mode: bool = True):
        super().__init__()
        self.clip = clip
        self.bn_train_mode = bn_train_mode
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    @staticmethod
    def frozen_copy(clip: open_clip.CLIP) -> open_clip.CLIP:
        """A deep, frozen, eval-mode copy of `clip` to serve as the teacher."""
        teacher = copy.deepcopy(clip)
        teacher.requires_grad_(False)
        return teacher.eval()

    def train(self, mode: bool = True) -> CVLP:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if mode and not self.bn_train_mode:
            self.clip.eval()
        return self

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised student features and scale, plus the teacher's when distillation is on."""
        out = {
            "image_features": F.normalize(self.clip.encode_image(images), dim=-1),
            "text_features": F.normalize(self.clip.encode_text(tokens), dim=-1),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if self.teacher is not None:
            with torch.no_grad():
                out["teacher_image_features"] = F.normalize(self.teacher.encode_image(images), dim=-1)
                out["teacher_text_features"] = F.normalize(self.teacher.encode_text(tokens), dim=-1)
                out["teacher_logit_scale"] = self.teacher.logit_scale.exp()
        return out
