"""Feature extraction for the harness's scoring (inference only: every arm is trained by `vlltr train`, see
`bench.longtail.protocol`).

The benchmark's images are tiny and fit in memory as preprocessed float tensors `[N, 3, S, S]` (the service's
evaluation preprocessing), so the harness encodes them in batches without file loaders.
"""

from __future__ import annotations

import open_clip
import torch

from vlltr.training.features import encode_token_table


@torch.no_grad()
def encode_images(clip: open_clip.CLIP, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Raw (un-normalised) image features `[N, D]` of preprocessed images, eval mode."""
    clip.eval()
    out = [clip.encode_image(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, int(clip.text_projection.shape[1]))


def encode_tokens(clip: open_clip.CLIP, tokens: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Raw text features `[N, D]` of pre-tokenised sentences, eval mode."""
    clip.eval()
    return encode_token_table(clip, tokens, batch_size=batch_size, progress=False)
