"""Adding classes by text alone, scored exactly as the service scores them.

Path (the one the service takes): description sentences ─► text encoder ─► `build_added_class_anchors`
(image-free anchor rule) ─► `ClassTable.with_added` ─► `calibrated_probabilities` with `added_class_bias` γ.
All scoring goes through `vlltr.model.runtime.head` (numpy) via `vlltr.training.added_classes`, so the numbers are the
service's numbers; this module adapts the benchmark's torch heads and tensors to it.

γ is chosen without held-out labels: some *trained* classes are treated as pseudo-new (here their head is
retrained without them, then they are added by text) and γ is picked on their validation images.
"""

from __future__ import annotations

import numpy as np
import torch

from vlltr.model.networks.head import LGRHead
from vlltr.model.runtime.head import ClassEntry, class_directions
from vlltr.training.added_classes import (  # noqa: F401  (re-exported for the runner)
    GAMMA_GRID,
    TableScores,
    choose_gamma,
    class_mean_accuracy,
    numpy_head,
    predict,
    text_entries,
)
from vlltr.training.added_classes import score_table as _score_arrays


def served_directions(head: LGRHead) -> np.ndarray:
    """`[C, D]` text directions of a head's classes, as the service keeps them for the anchor rule."""
    _, anchors, mask = numpy_head(head)
    return class_directions(anchors, mask)


def added_entries(
    sentence_feats: list[torch.Tensor],
    names: list[str],
    num_anchors: int,
    *,
    name_feats: torch.Tensor | None = None,
    served: np.ndarray | None = None,
) -> tuple[list[ClassEntry], list[np.ndarray]]:
    """`vlltr.training.added_classes.text_entries` on tensors: `name_feats` `[A, D]` holds one name-prompt feature
    per added class (None: the centroid rule), `served` the directions of the classes already served."""
    refs = None if name_feats is None else [name_feats[i : i + 1].numpy() for i in range(len(names))]
    return text_entries([f.numpy() for f in sentence_feats], names, num_anchors, references=refs, served=served)


def score_table(head: LGRHead, trained_names: list[str], entries: list[ClassEntry], feats: torch.Tensor) -> TableScores:
    """Vision and language logits of `feats` against a head's trained classes plus `entries`."""
    params, anchors, mask = numpy_head(head)
    return _score_arrays(params, anchors, mask, trained_names, entries, feats.numpy())
