"""Knowing when nothing fits: the score that says how near an image is to the nearest class, the threshold
training fits on it, and the verdict the service gives (see `vlltr.model.runtime.manifest.UnknownRule`).

Every score grows as the image nears a class:
- `vision_energy`: `logsumexp` of the vision branch's raw logits over the trained classes (the negative free
  energy of Liu et al., 2020, "Energy-based out-of-distribution detection"): the branch trained on the
  images, large when the image excites some class's logit, whatever the softmax makes of it;
- `language_cosine`: the largest cosine between the image feature and any class's attended anchor text (the
  language branch's logit over the head's logit scale), a distance in the joint image-text space;
- `probability`: the top calibrated fused probability, which a softmax keeps high for an image far from
  every class as long as one class is less far than the others.
Which flags out-of-set images best is measured in `bench/unknown.py` (docs/benchmarks/unknown.md).
`vision_energy` knows only the trained classes: an image of a class added by text, which has no vision
logit, is judged by how near it is to the trained ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlltr.model.runtime.manifest import UNKNOWN_SCORES, UnknownRule

DEFAULT_UNKNOWN_SCORE = "vision_energy"
DEFAULT_KEEP = 0.95  # the share of in-set validation images the fitted threshold keeps


def language_cosine(z_lin: np.ndarray, logit_scale: float) -> np.ndarray:
    """`[B]` largest cosine of each image to a class's attended text, from the language logits `[B, C]`."""
    best: np.ndarray = (np.max(np.asarray(z_lin, dtype=np.float32), axis=1) / np.float32(logit_scale)).astype(
        np.float32
    )
    return best


def vision_energy(z_vis: np.ndarray) -> np.ndarray:
    """`[B]` `logsumexp` of each image's raw vision logits `[B, S]` (the trained classes)."""
    z = np.asarray(z_vis, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    energy: np.ndarray = (top[:, 0] + np.log(np.exp(z - top).sum(axis=1))).astype(np.float32)
    return energy


@dataclass(frozen=True)
class Nearness:
    """The logit-based scores of a batch of images, `[B]` each (the probability comes with the answer)."""

    cosine: np.ndarray
    energy: np.ndarray

    @classmethod
    def of(cls, z_vis: np.ndarray, z_lin: np.ndarray, logit_scale: float) -> Nearness:
        """From the vision logits `[B, S]` and the language logits `[B, C]`."""
        return cls(language_cosine(z_lin, logit_scale), vision_energy(z_vis))

    def row(self, i: int) -> Nearness:
        """Image `i` alone."""
        return Nearness(self.cosine[i : i + 1], self.energy[i : i + 1])


def score_values(score: str, near: Nearness, top_probability: np.ndarray) -> np.ndarray:
    """The values of score `score` (one of `UNKNOWN_SCORES`), `[B]`."""
    if score == "vision_energy":
        return np.asarray(near.energy, dtype=np.float32)
    if score == "language_cosine":
        return np.asarray(near.cosine, dtype=np.float32)
    if score == "probability":
        return np.asarray(top_probability, dtype=np.float32)
    raise ValueError(f"unknown score {score!r}; use one of {UNKNOWN_SCORES}")


def fit_threshold(in_set_scores: Sequence[float] | np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """The threshold that keeps the fraction `keep` of in-set images (those scoring at or above it): the
    `1 - keep` quantile of their scores."""
    values = np.asarray(in_set_scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("need a non-empty list of finite in-set scores to fit an unknown threshold")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    return float(np.quantile(values, 1.0 - keep, method="lower"))


def fit_rule(
    near: Nearness,
    top_probability: np.ndarray,
    *,
    score: str = DEFAULT_UNKNOWN_SCORE,
    keep: float = DEFAULT_KEEP,
    fitted_on: str | None = None,
) -> UnknownRule:
    """The rule for score `score` fitted on in-set images' scores (see `fit_threshold`)."""
    return UnknownRule(score, fit_threshold(score_values(score, near, top_probability), keep), keep, fitted_on)


def effective_rule(bundle_rule: UnknownRule | None, threshold: float | None) -> UnknownRule | None:
    """The rule a service applies: the bundle's, its threshold replaced by `threshold` when one is set; with a
    threshold and no rule in the bundle, that threshold on `DEFAULT_UNKNOWN_SCORE`; None (no verdict) when
    neither is there."""
    if threshold is None:
        return bundle_rule
    if bundle_rule is None:
        return UnknownRule(DEFAULT_UNKNOWN_SCORE, float(threshold), None, "setting")
    return UnknownRule(bundle_rule.score, float(threshold), bundle_rule.keep, "setting")
