"""Anchor choice and its precision: AnSS (images rank sentences), the text-only rule and the image-free rule.

- AnSS: `vlltr.training.anss.score_sentences` over a labelled reference image set, the M lowest scores kept.
- Text-only / image-free rule: `vlltr.model.runtime.head.build_added_class_anchors`, the rule the service applies to a
  class added by text (centroid of the class's own sentence embeddings). For trained classes it is the
  text-only baseline AnSS must beat: it cannot tell a hard distractor (another class's visual words) from a
  description, because both look like descriptions to a text encoder.
- Precision: the share of chosen anchors whose sentence is flagged descriptive in `meta.json`; the base rate
  is the share of descriptive sentences in the class's whole pool (what random choice would get).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlltr.model.runtime.head import build_added_class_anchors
from vlltr.training.anss import score_sentences


@dataclass
class Anchors:
    """Per-class anchors `[C, M, D]`, mask `[C, M]` and the chosen sentence positions within each class."""

    tensor: torch.Tensor
    mask: torch.Tensor
    chosen: list[np.ndarray]


def _pack(per_class: list[torch.Tensor], chosen: list[np.ndarray], num_anchors: int) -> Anchors:
    dim = per_class[0].shape[1]
    tensor = torch.zeros(len(per_class), num_anchors, dim)
    mask = torch.zeros(len(per_class), num_anchors, dtype=torch.bool)
    for c, (feats, idx) in enumerate(zip(per_class, chosen)):
        tensor[c, : len(idx)] = feats[torch.as_tensor(idx, dtype=torch.long)]
        mask[c, : len(idx)] = True
    return Anchors(tensor, mask, chosen)


def anss_anchors(
    sent_feats: list[torch.Tensor],
    ref_feats: torch.Tensor,
    ref_labels: np.ndarray,
    logit_scale: float,
    num_anchors: int,
) -> tuple[Anchors, list[np.ndarray]]:
    """AnSS over a labelled reference set; `sent_feats[c]` are class c's raw sentence features (c = 0..C-1).

    Returns the anchors and every class's sentence scores (lower is better)."""
    flat = torch.cat(sent_feats)
    owner = torch.cat([torch.full((len(f),), c, dtype=torch.long) for c, f in enumerate(sent_feats)])
    scores = score_sentences(flat, owner, ref_feats, torch.as_tensor(ref_labels, dtype=torch.long), logit_scale)
    per_class, start = [], 0
    for f in sent_feats:
        per_class.append(scores[start : start + len(f)].numpy())
        start += len(f)
    chosen = [np.argsort(s, kind="stable")[:num_anchors] for s in per_class]
    return _pack(sent_feats, chosen, num_anchors), per_class


def image_free_anchors(sent_feats: list[torch.Tensor], num_anchors: int) -> Anchors:
    """The service's rule for classes added by text, applied to every class."""
    chosen = [build_added_class_anchors(f.numpy(), num_anchors)[2] for f in sent_feats]
    return _pack(sent_feats, chosen, num_anchors)


def precision(chosen: list[np.ndarray], descriptive: list[np.ndarray]) -> float:
    """Percent of chosen anchors that are descriptive, pooled over classes."""
    hits = sum(int(descriptive[c][idx].sum()) for c, idx in enumerate(chosen))
    total = sum(len(idx) for idx in chosen)
    return 100.0 * hits / max(1, total)


def base_rate(descriptive: list[np.ndarray], num_anchors: int) -> float:
    """Expected precision of choosing min(M, n) sentences at random: the pooled descriptive share, weighted
    like `precision` (classes contribute min(M, n) anchors)."""
    hits = sum(min(num_anchors, len(d)) * float(d.mean()) for d in descriptive)
    total = sum(min(num_anchors, len(d)) for d in descriptive)
    return 100.0 * hits / max(1, total)
