"""vlltr.model.runtime.head on its own (numpy, no torch): chunked scoring, refusals, the anchor choice for
classes added by text, the fusion with added classes. tests/unit/networks/test_head_numpy_vs_torch.py checks it
against the torch head."""

from __future__ import annotations

import numpy as np
import pytest

import vlltr.model.runtime.head as H
from vlltr.model.runtime.head import (
    ClassEntry,
    ClassTable,
    HeadParams,
    build_added_class_anchors,
    calibrated_probabilities,
)


def random_head(c: int, m: int, d: int, seed: int = 0) -> tuple[HeadParams, ClassTable, np.ndarray, np.ndarray]:
    """Head parameters, the class table, its anchors and mask: `c` classes with 1..`m` anchors of dimension `d`."""
    rng = np.random.default_rng(seed)
    anchors = (rng.standard_normal((c, m, d)) * 2).astype(np.float32)
    mask = rng.random((c, m)) > 0.4
    mask[:, 0] = True
    anchors[~mask] = 0
    arrays = {
        "ln_q_weight": 1 + 0.2 * rng.standard_normal(d),
        "ln_q_bias": 0.2 * rng.standard_normal(d),
        "w_q": rng.standard_normal((d, d)) / np.sqrt(d),
        "ln_k_weight": 1 + 0.2 * rng.standard_normal(d),
        "ln_k_bias": 0.2 * rng.standard_normal(d),
        "w_k": rng.standard_normal((d, d)) / np.sqrt(d),
        "mlp_w1": 0.2 * rng.standard_normal((4 * d, d)),
        "mlp_b1": 0.2 * rng.standard_normal(4 * d),
        "mlp_w2": 0.2 * rng.standard_normal((c, 4 * d)),
        "mlp_b2": 0.2 * rng.standard_normal(c),
    }
    params = HeadParams.from_arrays(arrays, logit_scale=17.0)
    return params, ClassTable.build(anchors, mask, params, [f"c{i}" for i in range(c)]), anchors, mask


def test_chunked_scoring_equals_one_chunk(monkeypatch):
    params, table, _, _ = random_head(37, 6, 16, seed=1)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    whole = table.language_logits(params.queries(x), x)
    monkeypatch.setattr(H, "_CHUNK_ELEMENTS", 5 * 6 * 4)  # 4 classes per chunk
    np.testing.assert_allclose(table.language_logits(params.queries(x), x), whole, rtol=1e-6, atol=1e-6)


def test_table_refuses_bad_input():
    params, table, anchors, mask = random_head(4, 3, 8)
    with pytest.raises(ValueError, match="already in the table"):
        table.with_added([ClassEntry("c1", np.ones((3, 8), np.float32), np.ones(3, bool))], params)
    with pytest.raises(ValueError, match="expected"):
        table.with_added([ClassEntry("x", np.ones((2, 8), np.float32), np.ones(2, bool))], params)
    with pytest.raises(ValueError, match="no anchors"):
        table.with_added([ClassEntry("x", np.ones((3, 8), np.float32), np.zeros(3, bool))], params)
    with pytest.raises(ValueError, match="twice"):
        ClassTable.build(anchors, mask, params, ["a", "b", "a", "d"])
    arrays = params.arrays() | {"mlp_w2": np.zeros((4, 7), np.float32)}
    with pytest.raises(ValueError, match="mlp_w2"):
        HeadParams.from_arrays(arrays, logit_scale=10.0)
    assert table.with_added([], params) is table


def test_added_class_anchor_choice():
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(16)
    on_topic = centre + 0.1 * rng.standard_normal((6, 16))
    off_topic = rng.standard_normal((2, 16)) * 3
    feats = np.concatenate([on_topic[:3], off_topic[:1], on_topic[3:], off_topic[1:]]).astype(np.float32)
    anchors, mask, chosen = build_added_class_anchors(feats, 6)
    assert sorted(chosen.tolist()) == [0, 1, 2, 4, 5, 6]  # the two outliers (3, 7) are dropped
    np.testing.assert_array_equal(anchors, feats[chosen])
    assert mask.all()
    anchors, mask, chosen = build_added_class_anchors(feats[:2], 4)
    assert mask.tolist() == [True, True, False, False] and sorted(chosen.tolist()) == [0, 1]
    assert not anchors[2:].any()
    with pytest.raises(ValueError, match="zero norm"):
        build_added_class_anchors(np.zeros((2, 16), np.float32), 4)
    with pytest.raises(ValueError, match="at least one"):
        build_added_class_anchors(np.zeros((0, 16), np.float32), 4)


def test_standardised_vision_lets_an_added_class_win():
    # An image whose language logit for the added class is the row's best: with no vision mass the vision
    # branch's confident trained class wins the fusion; the standardised stand-in lets the added class win.
    z_vis = np.array([[8.0, 0.0, 0.0, 0.0]], np.float32)
    z_lin = np.array([[5.0, 1.0, 1.0, 1.0, 9.0]], np.float32)
    log_prior = np.log(np.full(4, 0.25, np.float32))
    none = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.6)
    std = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.6, added_class_vision="standardised")
    assert none.argmax() == 0 and std.argmax() == 4
    np.testing.assert_allclose(std.sum(1), 1.0, atol=1e-6)
    # The stand-in is the language logit on the vision scale: mean 2, std sqrt(12) vs mean 2, std sqrt(3).
    expected = 2.0 + (9.0 - 2.0) * np.sqrt(12.0) / np.sqrt(3.0)
    vis = np.exp(np.array([8.0, 0, 0, 0, expected]) - expected)
    np.testing.assert_allclose(
        std[0, 4], 0.6 * vis[4] / vis.sum() + 0.4 * np.exp(9 - 9) / np.exp(z_lin[0] - 9).sum(), rtol=1e-5
    )
    # Without added classes both modes are the published fusion.
    np.testing.assert_allclose(
        calibrated_probabilities(z_vis, z_lin[:, :4], log_prior, alpha=0.6, added_class_vision="standardised"),
        calibrated_probabilities(z_vis, z_lin[:, :4], log_prior, alpha=0.6),
        atol=1e-7,
    )
    with pytest.raises(ValueError, match="added_class_vision"):
        calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.6, added_class_vision="both")


def test_added_class_anchor_choice_by_name():
    # Class "a" is described by sentences near its name; a hard distractor sits between "a" and another
    # class "b" (it names b's words) and is closer to the centroid than one true description.
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    descriptive = a + 0.6 * rng.standard_normal((4, 16))
    distractor = (0.5 * a + b)[None] + 0.05 * rng.standard_normal((2, 16))
    feats = np.concatenate([descriptive, distractor]).astype(np.float32)
    _, _, chosen = build_added_class_anchors(
        feats, 4, reference=a[None].astype(np.float32), others=b[None].astype(np.float32)
    )
    assert sorted(chosen.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="reference"):
        build_added_class_anchors(feats, 4, reference=np.zeros((1, 16), np.float32))


def test_log_prior_refuses_empty_classes():
    with pytest.raises(ValueError, match="train_count"):
        H.log_prior_from_counts([3, 0, 2])
