"""Fitting γ for classes added by text (training/added_classes.py) on a model whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from vlltr.model.runtime.head import HeadParams
from vlltr.training.added_classes import GAMMA_GRID, fit_added_class_calibration, pick_pseudo_new

D, M, C = 24, 4, 20


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    """A head whose vision branch is a cosine classifier on class directions and whose anchors scatter around
    them; images lie near their class's direction; some classes are rare."""
    rng = np.random.default_rng(0)
    dirs = _unit(rng.standard_normal((C, D)))
    eye = np.eye(D, dtype=np.float32)
    arrays = {
        "ln_q_weight": np.ones(D),
        "ln_q_bias": np.zeros(D),
        "w_q": eye,
        "ln_k_weight": np.ones(D),
        "ln_k_bias": np.zeros(D),
        "w_k": eye,
        # relu([f, -f]) split back into f: vision logits = 10 * dirs . f
        "mlp_w1": np.concatenate([eye, -eye, np.zeros((2 * D, D))]),
        "mlp_b1": np.zeros(4 * D),
        "mlp_w2": 10 * np.concatenate([dirs, -dirs, np.zeros((C, 2 * D))], axis=1),
        "mlp_b2": np.zeros(C),
    }
    params = HeadParams.from_arrays(arrays, logit_scale=20.0)
    anchors = dirs[:, None, :] + 0.3 * rng.standard_normal((C, M, D)).astype(np.float32) / np.sqrt(D)
    mask = np.ones((C, M), dtype=bool)
    labels = np.repeat(np.arange(C), 10)
    feats = _unit(dirs[labels] + 0.6 * rng.standard_normal((len(labels), D)).astype(np.float32) / np.sqrt(D))
    counts = np.array([200] * 10 + [5] * 10)
    # Each class's descriptions: three about it, two about other classes (distractors); its name prompts.
    descriptions, prompts = {}, {}
    for c in range(C):
        own = dirs[c] + 0.4 * rng.standard_normal((3, D)) / np.sqrt(D)
        other = dirs[(c + np.array([3, 7])) % C] + 0.2 * rng.standard_normal((2, D)) / np.sqrt(D)
        descriptions[c] = np.concatenate([own, other]).astype(np.float32)
        prompts[c] = (dirs[c] + 0.2 * rng.standard_normal((3, D)) / np.sqrt(D)).astype(np.float32)
    names = [f"class {c}" for c in range(C)]
    return params, anchors.astype(np.float32), mask, feats, labels, counts, descriptions, prompts, names


def test_pseudo_new_classes_are_rare_and_bounded():
    counts = np.array([500, 300, 100, 50, 20, 10, 5, 5, 3, 2])
    labels = np.repeat(np.arange(10), 3)
    picked = pick_pseudo_new(counts, labels, count=8, seed=0)
    assert len(picked) == 2 and set(picked) <= {6, 7, 8, 9}  # a fifth of the classes, from the rarest third
    assert list(picked) == sorted(picked)
    assert len(pick_pseudo_new(counts, np.repeat(np.arange(2), 3), count=8, seed=0)) == 1  # one class kept
    assert len(pick_pseudo_new(counts[:4], labels[:12], count=8, seed=0)) == 0  # too few classes


def test_gamma_recognises_pseudo_new_classes_within_the_cost_bound(model):
    params, anchors, mask, feats, labels, counts, descriptions, prompts, names = model
    pseudo = pick_pseudo_new(counts, labels, count=4, seed=1)
    assert len(pseudo) == 4 and np.all(counts[pseudo] == 5)
    out = fit_added_class_calibration(
        feats,
        labels,
        params,
        anchors,
        mask,
        names,
        counts,
        descriptions,
        prompts,
        alpha=0.5,
        tau=0.0,
        pseudo=pseudo,
        max_seen_drop=1.5,
    )
    fit = out["added_class_fit"]
    assert out["added_class_vision"] == "standardised" and out["added_class_bias"] in GAMMA_GRID
    assert fit["pseudo_new"] == [names[c] for c in pseudo]
    assert fit["seen_before"] - fit["seen_after"] <= 1.5
    curve = {c["gamma"]: c for c in fit["curve"]}
    # Here γ = 0 already costs the other classes more than allowed, so a negative γ is chosen, and it still
    # finds most of the pseudo-new classes' images.
    assert fit["seen_before"] - curve[0.0]["seen"] > 1.5 and out["added_class_bias"] < 0
    assert fit["seen_before"] - curve[16.0]["seen"] > 50  # a large bias takes the other classes' images
    assert fit["pseudo_new_accuracy"] >= 50.0
    assert fit["pseudo_new_accuracy"] == max(c["new"] for c in fit["curve"] if fit["seen_before"] - c["seen"] <= 1.5)
