"""The `unknown` verdict's pieces (no torch): the fitted threshold keeps the asked share of in-set scores, the
manifest's optional `calibration.unknown` round-trips, is refused when malformed and is absent from older
manifests, the service setting overrides it, and the verdict compares the rule's score with its threshold."""

from __future__ import annotations

import numpy as np
import pytest

from vlltr.model.runtime.manifest import Calibration, UnknownRule
from vlltr.model.runtime.unknown import (
    Nearness,
    Prototypes,
    effective_rule,
    fit_rule,
    fit_threshold,
    language_cosine,
    prototype_sample,
    score_values,
    vision_energy,
)
from vlltr.service.core import verdict


def test_the_threshold_keeps_the_asked_share_of_in_set_images() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    for keep in (0.5, 0.9, 0.95, 1.0):
        threshold = fit_threshold(scores, keep)
        assert keep <= np.mean(scores >= threshold) <= keep + 0.002
    assert fit_threshold(scores, 1.0) == scores.min()


@pytest.mark.parametrize("bad", [[], [0.1, float("nan")]])
def test_no_threshold_from_empty_or_non_finite_scores(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="in-set scores"):
        fit_threshold(bad)


def test_the_language_cosine_is_the_largest_language_logit_over_the_scale() -> None:
    z_lin = np.array([[1.0, 7.0, -2.0], [-3.0, -1.0, -2.0]], dtype=np.float32)
    np.testing.assert_allclose(language_cosine(z_lin, 10.0), [0.7, -0.1], rtol=1e-6)


def test_the_vision_energy_is_the_logsumexp_of_the_vision_logits() -> None:
    z_vis = np.array([[1.0, 2.0, 3.0], [800.0, 800.0, -5.0]], dtype=np.float32)  # large logits: no overflow
    expected = [np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0)), 800.0 + np.log(2.0)]
    np.testing.assert_allclose(vision_energy(z_vis), expected, rtol=1e-6)


def test_a_rule_is_fitted_on_the_score_it_names() -> None:
    cosine, probability = np.linspace(0.0, 1.0, 101), np.linspace(0.5, 1.0, 101)
    near = Nearness(cosine, -cosine)
    rule = fit_rule(near, probability, score="probability", keep=0.9, fitted_on="val")
    assert (rule.score, rule.keep, rule.fitted_on) == ("probability", 0.9, "val")
    kept = np.mean(probability >= rule.threshold)
    assert 0.9 <= kept <= 0.92  # on the probabilities, not the cosines (which would keep 0.9 at 0.09)
    assert fit_rule(near, probability, score="vision_energy", keep=1.0).threshold == pytest.approx(-1.0)
    assert fit_rule(near, probability, score="language_cosine", keep=1.0).threshold == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown score"):
        score_values("energy", near, probability)


def test_the_manifest_section_round_trips_and_older_manifests_have_none() -> None:
    rule = UnknownRule("language_cosine", 0.31, 0.95, "val")
    cal = Calibration(tau=0.5, temperature=1.5, unknown=rule)
    assert Calibration.from_dict(cal.to_dict()) == cal
    old = Calibration(tau=0.5).to_dict()
    assert "unknown" not in old
    assert Calibration.from_dict(old).unknown is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"score": "energy", "threshold": 0.1}, "unknown.score"),
        ({"score": "probability"}, "unknown.threshold"),
        ({"score": "probability", "threshold": float("inf")}, "unknown.threshold"),
        ({"score": "probability", "threshold": 0.2, "keep": 1.5}, "unknown.keep"),
        ("0.3", "must be an object"),
        ({"score": "typicality", "threshold": 0.02}, "unknown.components"),
        ({"score": "typicality", "threshold": 0.02, "components": {"typicality": [0, 1]}}, "not one of"),
        ({"score": "typicality", "threshold": 0.02, "components": {"probability": [1, 0]}}, "non-decreasing"),
        ({"score": "typicality", "threshold": 0.02, "components": {"probability": [0.5]}}, "at least two"),
    ],
)
def test_a_malformed_section_is_refused(section: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Calibration.from_dict({"unknown": section})


def test_the_setting_overrides_the_bundle_threshold_or_supplies_one() -> None:
    rule = UnknownRule("probability", 0.4, 0.95, "val")
    assert effective_rule(rule, None) is rule
    assert effective_rule(None, None) is None
    overridden = effective_rule(rule, 0.7)
    assert overridden is not None and (overridden.score, overridden.threshold) == ("probability", 0.7)
    supplied = effective_rule(None, 0.2)
    assert supplied is not None and (supplied.score, supplied.threshold) == ("vision_energy", 0.2)


def _near(cosine: float, energy: float) -> Nearness:
    return Nearness(np.array([cosine], dtype=np.float32), np.array([energy], dtype=np.float32))


def test_the_verdict_compares_the_rule_score_with_its_threshold() -> None:
    rule = UnknownRule("language_cosine", 0.3)
    assert verdict(rule, 0.9, _near(0.1, 9.0)).unknown is True
    assert verdict(rule, 0.2, _near(0.5, -9.0)).unknown is False
    assert verdict(rule, 0.2, _near(0.5, -9.0)).unknown_score == pytest.approx(0.5)
    energy = verdict(UnknownRule("vision_energy", 2.0), 0.9, _near(0.9, 1.5))
    assert (energy.unknown, energy.unknown_score) == (True, pytest.approx(1.5))
    by_probability = verdict(UnknownRule("probability", 0.5), 0.4, _near(0.9, 9.0))
    assert (by_probability.unknown, by_probability.unknown_score) == (True, pytest.approx(0.4))
    none = verdict(None, 0.8, _near(0.1, 0.0))
    assert (none.confidence, none.unknown, none.unknown_score) == (0.8, None, None)
    assert verdict(rule, 0.8, None).unknown is None  # ad-hoc labels: no class distance to judge by


def _blobs(
    rng: np.random.Generator, centres: np.ndarray, n: int, spread: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(centres)), n)
    return centres[labels] + spread * rng.standard_normal((len(labels), centres.shape[1])), labels


def test_the_mahalanobis_score_is_minus_the_distance_to_the_nearest_class_under_their_shared_covariance() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 5.0
    feats, labels = _blobs(rng, centres, 200, 0.3)
    proto = Prototypes.fit(feats, labels, 3, shrinkage=0.0)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(axis=0) for c in range(3)])
    within = unit - means[labels]
    precision = np.linalg.inv(within.T @ within / len(unit))
    x = rng.standard_normal((5, 4))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = -np.min([np.einsum("nd,de,ne->n", u - m, precision, u - m) for m in means], axis=0)
    np.testing.assert_allclose(proto.score(x), expected, rtol=1e-4)
    # The features' length does not matter (the score is on unit features) and nearer a class means larger.
    np.testing.assert_allclose(proto.score(3 * x), proto.score(x), rtol=1e-5)
    assert proto.score(centres[:1])[0] > proto.score(np.array([[1.0, 1.0, 1.0, 0.0]]))[0]
    assert score_values("mahalanobis", Nearness.of(x, x, 1.0, x, proto), np.zeros(5)).shape == (5,)


def test_a_new_combination_of_the_classes_attributes_is_far_for_mahalanobis_not_for_the_cosine() -> None:
    """What the score is for: classes that share attributes, whose images vary much in directions no class is
    told apart by. Each class is a shape and a colour (small offsets); a held-out pairing of a seen shape with a
    seen colour hides in that variation for the cosine to the nearest class mean, not for the Mahalanobis
    distance, which weighs each direction by how much the trained images vary in it."""
    rng = np.random.default_rng(1)
    spread = np.array([0.05] * 4 + [0.6] * 4)  # tight along the attributes, loose along the nuisances
    base, axis = 3 * np.eye(8)[0], np.eye(8) * 0.5
    shape, colour = (axis[1], -axis[1]), (axis[2], -axis[2])
    trained = np.stack([base + shape[0] + colour[0], base + shape[0] + colour[1], base + shape[1] + colour[0]])
    feats, labels = _blobs(rng, trained, 300, spread)
    proto = Prototypes.fit(feats, labels, 3)
    in_set, _ = _blobs(rng, trained, 100, spread)
    held_out, _ = _blobs(rng, (base + shape[1] + colour[1])[None], 100, spread)
    assert np.mean(proto.score(held_out) < fit_threshold(proto.score(in_set), 0.95)) > 0.9

    def cosine(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        centres = proto.means / np.linalg.norm(proto.means, axis=1, keepdims=True)
        return np.asarray((unit @ centres.T).max(axis=1))

    assert np.mean(cosine(held_out) < fit_threshold(cosine(in_set), 0.95)) < 0.5


def test_prototypes_need_every_class_and_fitting_shapes() -> None:
    feats, labels = np.ones((4, 3)), np.array([0, 0, 2, 2])
    with pytest.raises(ValueError, match=r"none for classes \[1\]"):
        Prototypes.fit(feats, labels, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        Prototypes.fit(feats, labels, 2)
    same = Prototypes.fit(feats, np.array([0, 0, 1, 1]), 2)  # no spread at all: still a usable score
    assert np.all(np.isfinite(same.score(np.array([[1.0, 0.0, 0.0]]))))
    with pytest.raises(ValueError, match="do not fit"):
        Prototypes(np.zeros((3, 4), np.float32), np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="needs the bundle's prototypes"):
        score_values("mahalanobis", _near(0.1, 1.0), np.zeros(1))


def test_the_prototype_sample_caps_each_class_and_keeps_all_of_a_smaller_one() -> None:
    labels = np.array([2] * 50 + [0] * 3 + [5] * 12 + [2] * 10)
    chosen = prototype_sample(labels, 10, np.random.default_rng(4))
    assert chosen == sorted(set(chosen))
    counts = np.bincount(labels[chosen], minlength=6)
    assert counts.tolist() == [3, 0, 10, 0, 0, 10]
    assert set(np.flatnonzero(labels == 0)) <= set(chosen)
    assert prototype_sample(labels, 10, np.random.default_rng(4)) == chosen
    assert prototype_sample(labels, 10, np.random.default_rng(5)) != chosen


def test_typicality_is_the_least_typical_place_among_the_in_set_images() -> None:
    components = {"vision_energy": (0.0, 10.0), "language_cosine": (0.2, 0.4, 0.6)}
    near = Nearness(cosine=np.array([0.5, 0.6, 0.1]), energy=np.array([5.0, 1.0, 20.0]))
    rule = UnknownRule("typicality", 0.05, 0.95, "val", components)
    # image 0: energy at 0.5 of its range, cosine at 0.75: 0.5; image 1: energy 0.1; image 2: cosine below all.
    np.testing.assert_allclose(score_values("typicality", near, np.zeros(3), rule), [0.5, 0.1, 0.0], atol=1e-6)
    assert verdict(rule, 0.9, near.row(2)).unknown is True and verdict(rule, 0.9, near.row(0)).unknown is False
    assert rule.uses == ("vision_energy", "language_cosine") and UnknownRule("probability", 0.1).uses == (
        "probability",
    )
    with pytest.raises(ValueError, match="components"):
        score_values("typicality", near, np.zeros(3))


def test_a_typicality_rule_flags_what_any_of_its_scores_finds_far_at_the_asked_share() -> None:
    rng = np.random.default_rng(0)
    energy, cosine = rng.normal(5, 1, 2000), rng.normal(0.5, 0.05, 2000)
    rule = fit_rule(
        Nearness(cosine, energy),
        np.zeros(2000),
        score="typicality",
        keep=0.95,
        fitted_on="val",
        components=("vision_energy", "language_cosine"),
    )
    assert rule.components is not None and set(rule.components) == {"vision_energy", "language_cosine"}
    assert all(len(q) == 101 for q in rule.components.values())
    kept = score_values("typicality", Nearness(cosine, energy), np.zeros(2000), rule) >= rule.threshold
    assert 0.95 <= kept.mean() <= 0.955
    # Far on one score alone is enough: low energy with a typical cosine, a low cosine with a typical energy.
    odd = Nearness(np.array([0.5, 0.2]), np.array([0.0, 5.0]))
    assert (score_values("typicality", odd, np.zeros(2), rule) < rule.threshold).all()
    # The manifest keeps the components; a threshold set by the service keeps them too.
    assert Calibration.from_dict(Calibration(unknown=rule).to_dict()).unknown == rule
    overridden = effective_rule(rule, 0.2)
    assert overridden is not None and overridden.components == rule.components and overridden.threshold == 0.2
