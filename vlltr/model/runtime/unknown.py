"""Knowing when nothing fits: the score that says how near an image is to the nearest class, the threshold
training fits on it, and the verdict the service gives (see `vlltr.model.runtime.manifest.UnknownRule`).

Every score grows as the image nears a class:
- `vision_energy`: `logsumexp` of the vision branch's raw logits over the trained classes (the negative free
  energy of Liu et al., 2020, "Energy-based out-of-distribution detection"): the branch trained on the
  images, large when the image excites some class's logit, whatever the softmax makes of it;
- `language_cosine`: the largest cosine between the image feature and any class's attended anchor text (the
  language branch's logit over the head's logit scale), a distance in the joint image-text space;
- `probability`: the top calibrated fused probability, which a softmax keeps high for an image far from
  every class as long as one class is less far than the others;
- `mahalanobis`: minus the squared Mahalanobis distance of the unit image feature to the nearest trained class's
  mean training feature, under the classes' shared covariance (Lee et al., 2018, "A simple unified framework for
  detecting out-of-distribution samples and adversarial attacks"): where images of the trained classes lie,
  direction by direction, so that a new combination of attributes the classes share stands out. It needs the
  bundle's `prototypes.npz` (`Prototypes`), which `vlltr train` fits on training images;
- `typicality`: the smallest, over some of the scores above (`DEFAULT_COMPONENTS`), of the image's place among
  the in-set validation images on that score (the interpolated share of them scoring below it): an image is as
  typical as its least typical score, so one threshold flags what any of them finds far, at the share of
  in-set images the rule asks for. No one score flagged every kind of out-of-set image on the benchmark's models
  (the logits' energy misses noise that the distance to the training images catches, and the other way round
  for another dataset).
Which flags out-of-set images best is measured in `bench/unknown.py` (docs/benchmarks/unknown.md).
`vision_energy` and `mahalanobis` know only the trained classes: an image of a class added by text, which has no
vision logit and no training images, is judged by how near it is to the trained ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from vlltr.model.runtime.manifest import UNKNOWN_SCORES, UnknownRule

DEFAULT_UNKNOWN_SCORE = "vision_energy"  # what a threshold given without a bundle rule applies to
# `typicality`'s, as `vlltr train` fits it by default: on the benchmark's models one catches another dataset where
# the other misses it, and the other way round for noise; adding `language_cosine` dilutes both on a weak model
# (docs/benchmarks/unknown.md).
DEFAULT_COMPONENTS = ("vision_energy", "mahalanobis")
TYPICALITY_LEVELS = 101  # quantiles kept per component: every percent of the in-set images
DEFAULT_KEEP = 0.95  # the share of in-set validation images the fitted threshold keeps
# Shrinkage of the shared covariance toward its mean variance: few-shot classes give few residuals, and a
# direction the training images never vary in would otherwise make any image off it infinitely far.
PROTOTYPE_SHRINKAGE = 0.1


def unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` (float64) with each row scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit


def prototype_sample(labels: Sequence[int] | np.ndarray, per_class: int, rng: np.random.Generator) -> list[int]:
    """Sorted indices of at most `per_class` images of each class in `labels`, drawn with `rng` (all of a smaller
    class): what `Prototypes.fit` is fitted on, so the many-shot classes do not set the shared covariance alone
    and a large training set costs a bounded pass."""
    labels = np.asarray(labels)
    chosen: list[int] = []
    for c in np.unique(labels).tolist():
        idx = np.flatnonzero(labels == c)
        chosen.extend((idx if len(idx) <= per_class else rng.choice(idx, size=per_class, replace=False)).tolist())
    return sorted(chosen)


@dataclass(frozen=True)
class Prototypes:
    """What the `mahalanobis` score measures against: each trained class's mean unit training-image feature
    (`means`, `[S, D]`, the vision branch's class order) and a whitening of their shared within-class covariance
    (`whitening`, `[D, D]`: `W` with `W @ W.T` its inverse), as the bundle's `prototypes.npz` holds them."""

    means: np.ndarray
    whitening: np.ndarray
    _whitened: np.ndarray = field(init=False, repr=False, compare=False)
    _whitened_sq: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        means, whitening = np.asarray(self.means), np.asarray(self.whitening)
        if means.ndim != 2 or whitening.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"prototypes: means {means.shape} and whitening {whitening.shape} do not fit")
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(whitening))):
            raise ValueError("prototypes: non-finite values")
        # Whitened once here, so scoring a batch is one [B, D] x [D, D] product and one [B, D] x [D, S] (float32:
        # the distances are of the order of D, far above float32's rounding of the expanded square).
        whitened = (means.astype(np.float64) @ whitening.astype(np.float64)).astype(np.float32)
        object.__setattr__(self, "_whitened", whitened)
        object.__setattr__(self, "_whitened_sq", (whitened.astype(np.float64) ** 2).sum(axis=1).astype(np.float32))

    @classmethod
    def fit(
        cls, features: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = PROTOTYPE_SHRINKAGE
    ) -> Prototypes:
        """From raw training-image features `[N, D]` and their class indices `[N]` (every class in
        `range(num_classes)` needs at least one image)."""
        unit, labels = unit_rows(features), np.asarray(labels)
        if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
            raise ValueError(f"prototypes: labels must lie in [0, {num_classes})")
        counts = np.bincount(labels, minlength=num_classes)
        if np.any(counts == 0):
            missing = np.flatnonzero(counts == 0)[:10].tolist()
            raise ValueError(f"prototypes need images of every class; none for classes {missing}")
        means = np.zeros((num_classes, unit.shape[1]))
        np.add.at(means, labels, unit)
        means /= counts[:, None]
        within = unit - means[labels]
        cov = within.T @ within / len(unit)
        dim = cov.shape[0]
        # (Identical features, a degenerate case, still give an invertible matrix.)
        shrunk = (1 - shrinkage) * cov + shrinkage * max(np.trace(cov) / dim, 1e-12) * np.eye(dim)
        whitening = np.linalg.cholesky(np.linalg.inv(shrunk))
        return cls(means.astype(np.float32), whitening.astype(np.float32))

    def score(self, features: np.ndarray) -> np.ndarray:
        """`[B]` minus each image's squared Mahalanobis distance to the nearest class mean."""
        g = unit_rows(features).astype(np.float32) @ np.asarray(self.whitening, dtype=np.float32)
        distances = (g * g).sum(axis=1, keepdims=True) - 2.0 * (g @ self._whitened.T) + self._whitened_sq
        nearest: np.ndarray = (-np.maximum(distances.min(axis=1), 0.0)).astype(np.float32)
        return nearest

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of `prototypes.npz`."""
        return {"means": np.asarray(self.means, np.float32), "whitening": np.asarray(self.whitening, np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Prototypes:
        """Read `prototypes.npz`'s arrays; KeyError or ValueError when unusable."""
        return cls(np.asarray(arrays["means"], np.float32), np.asarray(arrays["whitening"], np.float32))


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
    """The scores of a batch of images that the logits and features give, `[B]` each (the probability comes
    with the answer); `distance` (`mahalanobis`) is None without prototypes."""

    cosine: np.ndarray
    energy: np.ndarray
    distance: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        z_vis: np.ndarray,
        z_lin: np.ndarray,
        logit_scale: float,
        features: np.ndarray | None = None,
        prototypes: Prototypes | None = None,
    ) -> Nearness:
        """From the vision logits `[B, S]`, the language logits `[B, C]` and, for `mahalanobis`, the raw image
        features `[B, D]` with the bundle's prototypes."""
        distance = None if prototypes is None or features is None else prototypes.score(features)
        return cls(language_cosine(z_lin, logit_scale), vision_energy(z_vis), distance)

    def row(self, i: int) -> Nearness:
        """Image `i` alone."""
        distance = None if self.distance is None else self.distance[i : i + 1]
        return Nearness(self.cosine[i : i + 1], self.energy[i : i + 1], distance)


def typicality(components: Mapping[str, Sequence[float]], values: Mapping[str, np.ndarray]) -> np.ndarray:
    """`[B]`: for each image, the smallest over `components` (score name -> its in-set quantiles at evenly spaced
    levels) of its place among the in-set images on that score, `values[name]` (0 below all, 1 above all)."""
    places = []
    for name, quantiles in components.items():
        q = np.asarray(quantiles, dtype=np.float64)
        places.append(np.interp(np.asarray(values[name], dtype=np.float64), q, np.linspace(0.0, 1.0, len(q))))
    least: np.ndarray = np.min(places, axis=0).astype(np.float32)
    return least


def score_values(
    score: str, near: Nearness, top_probability: np.ndarray, rule: UnknownRule | None = None
) -> np.ndarray:
    """The values of score `score` (one of `UNKNOWN_SCORES`), `[B]`; `typicality` needs its `rule` (the
    components' quantiles)."""
    if score == "typicality":
        if rule is None or not rule.components:
            raise ValueError("the typicality score needs its rule's components")
        return typicality(
            rule.components, {name: score_values(name, near, top_probability) for name in rule.components}
        )
    if score == "vision_energy":
        return np.asarray(near.energy, dtype=np.float32)
    if score == "language_cosine":
        return np.asarray(near.cosine, dtype=np.float32)
    if score == "probability":
        return np.asarray(top_probability, dtype=np.float32)
    if score == "mahalanobis":
        if near.distance is None:
            raise ValueError("the mahalanobis score needs the bundle's prototypes (prototypes.npz)")
        return np.asarray(near.distance, dtype=np.float32)
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
    components: Sequence[str] = DEFAULT_COMPONENTS,
) -> UnknownRule:
    """The rule for score `score` fitted on in-set images' scores (see `fit_threshold`); for `typicality`, first
    the quantiles of each of `components` over the same images."""
    if score != "typicality":
        return UnknownRule(score, fit_threshold(score_values(score, near, top_probability), keep), keep, fitted_on)
    levels = np.linspace(0.0, 1.0, TYPICALITY_LEVELS)
    quantiles = {
        name: tuple(float(q) for q in np.quantile(score_values(name, near, top_probability), levels))
        for name in components
    }
    shell = UnknownRule(score, 0.0, keep, fitted_on, quantiles)
    return replace(shell, threshold=fit_threshold(score_values(score, near, top_probability, shell), keep))


def effective_rule(bundle_rule: UnknownRule | None, threshold: float | None) -> UnknownRule | None:
    """The rule a service applies: the bundle's, its threshold replaced by `threshold` when one is set; with a
    threshold and no rule in the bundle, that threshold on `DEFAULT_UNKNOWN_SCORE`; None (no verdict) when
    neither is there."""
    if threshold is None:
        return bundle_rule
    if bundle_rule is None:
        return UnknownRule(DEFAULT_UNKNOWN_SCORE, float(threshold), None, "setting")
    return replace(bundle_rule, threshold=float(threshold), fitted_on="setting")
