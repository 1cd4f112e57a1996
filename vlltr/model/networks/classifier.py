"""The stage-2 classifier: the CLIP image tower feeding the LGR head."""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from vlltr.model.networks.head import LGRHead


class VLLTRClassifier(nn.Module):
    """Image -> (vision logits, language logits).

    The whole CLIP is kept (its text tower is exported for adding classes at serving time) but only
    `encode_image` runs here. As in the original, the image tower always runs in eval mode (BatchNorm frozen)
    even when its parameters train.
    """

    def __init__(self, clip: open_clip.CLIP, head: LGRHead, *, train_backbone: bool = False) -> None:
        super().__init__()
        self.clip = clip
        self.head = head
        self.train_backbone = train_backbone
        self.clip.requires_grad_(False)
        if train_backbone:
            self.clip.visual.requires_grad_(True)

    def train(self, mode: bool = True) -> VLLTRClassifier:
        super().train(mode)
        self.clip.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) projected image features, `[B, D]`."""
        features: torch.Tensor  # open_clip is untyped
        if self.train_backbone and self.training:
            features = self.clip.encode_image(images)
            return features
        with torch.no_grad():
            features = self.clip.encode_image(images)
            return features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits: tuple[torch.Tensor, torch.Tensor] = self.head(self.image_features(images))
        return logits
