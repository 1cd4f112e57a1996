"""The `unknown` verdict's pieces (no torch): the fitted threshold keeps the asked share of in-set scores, the
manifest's optional `calibration.unknown` round-trips, is refused when malformed and is absent from older
manifests, the service setting overrides it, and the verdict compares the rule's score with its threshold."""

from __future__ import annotations

import numpy as np
import pytest

from vlltr.model.runtime.manifest import Calibration, UnknownRule
from vlltr.model.runtime.unknown import (
    Nearness,
    effective_rule,
    fit_rule,
    fit_threshold,
    language_cosine,
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
