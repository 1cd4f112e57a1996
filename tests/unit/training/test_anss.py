"""AnSS: sentence scores (hand-computed and brute force), chunking, selection, padding, ablation modes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlltr.training.anss import (
    check_sentence_counts,
    gather_anchors,
    load_selection,
    save_selection,
    score_sentences,
    select_anchors,
    sentence_labels,
)


def test_sentence_labels_from_offsets():
    assert sentence_labels(np.array([0, 2, 2, 5])).tolist() == [0, 0, 2, 2, 2]


def test_score_hand_computed():
    # One sentence of class 0, two images (class 0, class 1). Unit vectors with <u, g0> = 1, <u, g1> = 0 and
    # scale ln 3 give logits [ln 3, 0] over the images: score = -log(3 / 4) = 0.2876821.
    u = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    score = score_sentences(u, torch.tensor([0]), g, torch.tensor([0, 1]), math.log(3.0))
    assert score.item() == pytest.approx(0.2876821, abs=1e-6)


def brute_force(u, u_labels, g, g_labels, scale):
    u, g = F.normalize(u, dim=-1), F.normalize(g, dim=-1)
    out = []
    for s in range(u.shape[0]):
        logp = torch.log_softmax(scale * g @ u[s], dim=0)
        own = logp[g_labels == u_labels[s]]
        out.append(-own.mean() if own.numel() else torch.tensor(float("nan")))
    return torch.stack(out)


def test_scores_equal_brute_force_for_every_chunk_size():
    gen = torch.Generator().manual_seed(0)
    u, g = torch.randn(23, 6, generator=gen), torch.randn(17, 6, generator=gen)
    u_labels = torch.randint(0, 4, (23,), generator=gen)
    g_labels = torch.arange(17) % 4
    expected = brute_force(u, u_labels, g, g_labels, 20.0)
    for chunk in (1, 5, 1000):
        got = score_sentences(u, u_labels, g, g_labels, 20.0, chunk_size=chunk)
        assert torch.allclose(got, expected, atol=1e-5)


def test_class_without_reference_images_scores_nan():
    u = torch.randn(3, 4)
    scores = score_sentences(u, torch.tensor([0, 1, 2]), torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), 10.0)
    assert not scores[:2].isnan().any() and scores[2].isnan()


def test_select_lowest_scores_with_padding_and_mask():
    offsets = np.array([0, 4, 6])  # class 0: 4 sentences, class 1: 2 sentences
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    sel = select_anchors(offsets, 3, mode="anss", scores=scores)
    assert sel.indices.tolist() == [[1, 3, 0], [5, 4, -1]]
    assert sel.mask.tolist() == [[True, True, True], [True, True, False]]
    feats = torch.arange(12, dtype=torch.float32).view(6, 2)
    anchors = gather_anchors(feats, sel)
    assert torch.equal(anchors[0, 0], feats[1]) and torch.equal(anchors[1, 2], torch.zeros(2))


def test_first_and_rand_modes():
    offsets = np.array([0, 5, 8])
    first = select_anchors(offsets, 2, mode="first")
    assert first.indices.tolist() == [[0, 1], [5, 6]]
    rand_a = select_anchors(offsets, 2, mode="rand", seed=3)
    rand_b = select_anchors(offsets, 2, mode="rand", seed=3)
    assert torch.equal(rand_a.indices, rand_b.indices)
    assert all(0 <= i < 5 for i in rand_a.indices[0].tolist()) and all(5 <= i < 8 for i in rand_a.indices[1].tolist())
    with pytest.raises(ValueError, match="anss.mode"):
        select_anchors(offsets, 2, mode="best")
    with pytest.raises(ValueError, match="scores"):
        select_anchors(offsets, 2, mode="anss")


def test_nan_scores_fall_back_to_corpus_order():
    offsets = np.array([0, 2, 4])
    scores = torch.tensor([0.9, 0.1, float("nan"), float("nan")])
    sel = select_anchors(offsets, 2, mode="anss", scores=scores)
    assert sel.indices.tolist() == [[1, 0], [2, 3]] and sel.fallback_classes == [1]


def test_class_without_sentences_is_named():
    with pytest.raises(ValueError, match=r"1 \('zebra'\)"):
        check_sentence_counts(np.array([0, 3, 3, 5]), ["cat", "zebra", "dog"])


def test_save_and_load_selection(tmp_path):
    offsets = np.array([0, 2, 3])
    sel = select_anchors(offsets, 2, mode="first")
    feats = torch.randn(3, 4)
    save_selection(tmp_path, sel, gather_anchors(feats, sel), ["a", "b", "c"], ["x", "y"], None)
    back = load_selection(tmp_path)
    assert torch.equal(back["indices"], sel.indices) and back["mode"] == "first"
    report = json.loads((tmp_path / "anchors.json").read_text())
    assert report["classes"][1] == {"class": 1, "name": "y", "anchors": ["c"], "scores": None}


def test_precision_against_benchmark_sentence_kinds(tmp_path):
    from vlltr.training.anss import anss_precision, benchmark_sentence_kinds

    meta = {
        "classes": [
            {"id": 0, "sentences": [{"text": "red", "kind": "descriptive"}, {"text": "trivia", "kind": "distractor"}]},
            {"id": 1, "sentences": [{"text": "blue", "kind": "descriptive"}, {"text": "old", "kind": "distractor"}]},
        ]
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    # model class 0 = dataset class 1; a template sentence has no known kind
    kinds = benchmark_sentence_kinds(tmp_path, [1, 0], [["old", "blue", "a photo of b."], ["red", "trivia"]])
    assert kinds == ["distractor", "descriptive", None, "descriptive", "distractor"]
    sel = select_anchors(np.array([0, 3, 5]), 2, mode="anss", scores=torch.tensor([0.9, 0.1, 0.2, 0.1, 0.5]))
    # chosen: class 0 -> rows 1 (descriptive), 2 (template); class 1 -> rows 3 (descriptive), 4 (distractor)
    result = anss_precision(sel, kinds)
    assert result["precision"] == pytest.approx(2 / 3) and result["anchors_with_known_kind"] == 3
    assert result["corpus_descriptive_fraction"] == pytest.approx(0.5)
    assert benchmark_sentence_kinds(tmp_path / "none", [0], [["x"]]) is None
