"""`bench.unknown`'s pieces: the AUROC, the split reader and the table it prints."""

from __future__ import annotations

import numpy as np
import pytest

from bench.unknown import SCORES, auroc, kth_nearest_cosine, markdown, read_split, sample


def test_auroc_counts_in_set_images_above_out_of_set_ones_and_ties_half() -> None:
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5


def test_a_split_file_reads_as_paths_and_labels(tmp_path) -> None:
    (tmp_path / "val.txt").write_text("images/a b.png 3\nimages/c.png 0\n\n")
    assert read_split(tmp_path, "val") == [(tmp_path / "images/a b.png", 3), (tmp_path / "images/c.png", 0)]
    assert read_split(tmp_path, "val_heldout") == []
    items = list(range(10))
    drawn = sample(items, 4, np.random.default_rng(0))
    assert len(drawn) == 4 and drawn == sorted(drawn) and set(drawn) <= set(items)
    assert sample(items, 20, np.random.default_rng(0)) == items


def test_the_table_has_a_row_per_group_and_a_column_per_score() -> None:
    group = {"images": 10, **{f"flagged_{s}": 0.25 for s in SCORES}, **{f"auroc_{s}": 0.75 for s in SCORES}}
    table = markdown({"groups": {"noise": {**group, "flagged_bundle_rule": 0.5}, "val": group}})
    lines = table.splitlines()
    assert len(lines) == 4 and all(f"`{s}`" in lines[0] for s in SCORES)
    assert lines[2] == "| noise | 10 | " + " | ".join(["25.0% (0.75)"] * len(SCORES)) + " | 50.0% |"
    assert lines[3].endswith("| - |")


@pytest.mark.parametrize("n", [0, 3])
def test_sample_never_draws_more_than_there_is(n: int) -> None:
    assert len(sample(list(range(n)), 5, np.random.default_rng(1))) == n


def test_a_typicality_combination_names_distinct_scores_a_bundle_computes() -> None:
    import argparse

    from bench.unknown import _combination

    assert _combination("vision_energy+language_cosine") == ("vision_energy", "language_cosine")
    for bad in ("vision_energy+vision_energy", "energy", "typicality+mahalanobis"):
        with pytest.raises(argparse.ArgumentTypeError):
            _combination(bad)


def test_the_knn_score_is_the_cosine_to_the_kth_nearest_training_image() -> None:
    angles = np.radians([0.0, 10.0, 20.0, 90.0])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    image = np.array([[3.0, 0.0]])  # unnormalised: the score is a cosine
    np.testing.assert_allclose(kth_nearest_cosine(image, train, 1), [1.0])
    np.testing.assert_allclose(kth_nearest_cosine(image, train, 2), [np.cos(np.radians(10.0))])
    np.testing.assert_allclose(kth_nearest_cosine(image, train, 10), [0.0], atol=1e-12)
