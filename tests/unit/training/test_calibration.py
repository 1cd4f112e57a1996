"""Post-hoc logit adjustment and temperature fitted through the served scoring formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlltr.model.networks.head import calibrated_probabilities
from vlltr.model.runtime.manifest import Calibration
from vlltr.training.calibration import (
    balanced_accuracy,
    fit_calibration,
    fit_tau,
    fit_temperature,
    fit_unknown,
    log_prior_from_counts,
    nll,
)


def test_log_prior_and_its_errors():
    assert torch.allclose(log_prior_from_counts([3, 1]), torch.tensor([math.log(0.75), math.log(0.25)]))
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        log_prior_from_counts([3, 0])


def test_balanced_accuracy_hand_computed():
    # class 0: 3 images, 2 right; class 1: 1 image, right -> (2/3 + 1) / 2 = 0.8333
    labels = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([0, 0, 1, 1])
    assert balanced_accuracy(pred, labels, 3) == pytest.approx(5 / 6)


def test_nll_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert nll(probs, torch.tensor([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


def biased_logits(n_per_class: int = 400, seed: int = 0):
    """Balanced eval labels; logits = signal + log prior, i.e. a model that absorbed the training prior."""
    gen = torch.Generator().manual_seed(seed)
    counts = np.array([700, 200, 100])
    log_prior = log_prior_from_counts(counts)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    signal = 1.5 * torch.nn.functional.one_hot(labels, 3).float() + torch.randn(labels.numel(), 3, generator=gen)
    z = signal + log_prior
    return z, labels, counts, log_prior


def test_tau_recovers_the_absorbed_prior():
    z, labels, counts, log_prior = biased_logits()
    tau, curve = fit_tau(z, z, labels, log_prior, alpha=0.5)
    assert 0.6 <= tau <= 1.4
    assert dict(curve)[tau] > dict(curve)[0.0]


def test_tau_prefers_zero_when_adjustment_does_not_help():
    # A prior-free model: no adjustment should win (ties go to the smallest tau).
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(200)
    z = 4.0 * torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(600, 3, generator=gen)
    tau, _ = fit_tau(z, z, labels, log_prior_from_counts([700, 200, 100]), alpha=0.5)
    assert tau == 0.0


def test_temperature_recovers_overconfidence():
    # Labels drawn from softmax(base); the model reports 3 * base, so the NLL-optimal temperature is ~3.
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(20000, 4, generator=gen)
    labels = torch.multinomial(base.softmax(1), 1, generator=gen).squeeze(1)
    z = 3.0 * base
    log_prior = torch.zeros(4)
    temperature = fit_temperature(z, z, labels, log_prior, alpha=1.0, tau=0.0)
    assert temperature == pytest.approx(3.0, rel=0.06)


def test_fit_calibration_content():
    z, labels, counts, _ = biased_logits()
    result = fit_calibration(z, z, labels, counts, 0.2, fitted_on="val", stage2_loss="logit_adjusted")
    for key in ("tau", "temperature", "added_class_bias", "fitted_on", "log_prior", "train_counts", "note"):
        assert key in result
    assert result["fitted_on"] == "val" and result["added_class_bias"] == 0.0 and result["temperature_on"] == "fused"
    assert result["balanced_accuracy_after"] >= result["balanced_accuracy_before"]
    assert result["nll_after"] <= result["nll_before"] + 1e-9


@pytest.mark.parametrize("score", ["vision_energy", "language_cosine", "probability", "mahalanobis", "typicality"])
def test_the_unknown_threshold_keeps_the_share_of_calibration_images_and_is_what_the_runtime_scores(score):
    from vlltr.model.runtime.head import calibrated_probabilities as served_probabilities
    from vlltr.model.runtime.manifest import Calibration
    from vlltr.model.runtime.unknown import Nearness, Prototypes, score_values

    g = torch.Generator().manual_seed(0)
    z_vis, z_lin = torch.randn(400, 5, generator=g) * 3, torch.randn(400, 5, generator=g) * 4
    feats = torch.randn(400, 8, generator=g).numpy()
    prototypes = Prototypes.fit(feats[:200], np.arange(200) % 5, 5)
    counts = [50, 30, 10, 5, 2]
    cal = {"alpha": 0.3, "tau": 0.5, "temperature": 1.4, "temperature_on": "fused"}
    section = fit_unknown(
        z_vis, z_lin, counts, cal, 10.0, score=score, keep=0.9, fitted_on="val", features=feats, prototypes=prototypes
    )
    rule = Calibration.from_dict(section).unknown
    assert rule is not None and (rule.score, rule.keep, rule.fitted_on) == (score, 0.9, "val")
    # The service's scores of the same logits (numpy runtime), judged by the fitted rule.
    probs = served_probabilities(
        z_vis.numpy(), z_lin.numpy(), np.log(np.array(counts) / sum(counts)), alpha=0.3, tau=0.5, temperature=1.4
    )
    near = Nearness.of(z_vis.numpy(), z_lin.numpy(), 10.0, feats, prototypes)
    values = score_values(score, near, probs.max(axis=1), rule)
    assert 0.9 <= np.mean(values >= rule.threshold) <= 0.905


def test_the_fitted_temperature_calibrates_confidence_without_changing_a_prediction():
    # Language confidently right on every image; vision mildly right on half, mildly wrong on the other half. At
    # T = 1 the language branch wins every mixture (alpha 0.6). Dividing both branches' logits by a T < 1 before
    # the mixture (format 1's rule) hands the conflicting half to the vision branch; tempering the mixture cannot.
    labels = torch.arange(400) % 4
    one_hot = torch.nn.functional.one_hot
    z_lin = one_hot(labels, 4).float() * 3.0
    shown = torch.where(torch.arange(400) % 2 == 0, (labels + 1) % 4, labels)
    z_vis = one_hot(shown, 4).float() * 1.0
    log_prior = log_prior_from_counts([100] * 4)
    branches = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.6, temperature=0.3, temperature_on="branches")
    assert balanced_accuracy(branches.argmax(1), labels, 4) == 0.5  # the old rule at this T moves predictions
    result = fit_calibration(z_vis, z_lin, labels, [100] * 4, 0.6, fitted_on="val")
    assert result["temperature_on"] == "fused" and result["temperature"] < 1.0  # the mixture was under-confident
    assert result["balanced_accuracy_before"] == result["balanced_accuracy_after"] == 1.0
    assert result["nll_after"] < result["nll_before"]
    options = Calibration.from_dict(result).scoring_options()
    served = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.6, **options)
    assert torch.equal(served.argmax(1), labels)
